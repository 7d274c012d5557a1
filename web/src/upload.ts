/** Uploads: dropped or picked files go to POST /v1/models/{name}:upload as multipart, streamed, with progress. */
import { authorization } from "./api.js";
import { $, say } from "./dom.js";

let files: File[] = [];

function choose(chosen: FileList | null): void {
  files = Array.from(chosen ?? []);
  const main = files.find((f) => f.name.endsWith(".onnx"));
  $("#upload-files").textContent = files.map((f) => `${f.name} (${f.size} B)`).join(", ");
  const name = $<HTMLInputElement>("#upload-name");
  if (main && !name.value) name.value = main.name.replace(/\.onnx$/, "").toLowerCase().replace(/[^a-z0-9._-]+/g, "-");
}

/** Labels typed as "team=vision, stage=dev". */
function labels(text: string): Record<string, string> {
  const pairs = text.split(",").map((p) => p.split("=").map((s) => s.trim())).filter(([k]) => k);
  return Object.fromEntries(pairs.map(([k, v]) => [k, v ?? ""]));
}

/** The multipart body: `header` (ModelHeader JSON), `model` (the .onnx file), each side file under its name. */
function body(main: File): FormData {
  const form = new FormData();
  const header = { description: $<HTMLInputElement>("#upload-description").value, labels: labels($<HTMLInputElement>("#upload-labels").value) };
  form.append("header", new Blob([JSON.stringify(header)], { type: "application/json" }));
  form.append("model", main, main.name);
  for (const file of files) if (file !== main) form.append(file.name, file, file.name);
  return form;
}

function send(name: string, form: FormData, onDone: () => void): void {
  const progress = $<HTMLProgressElement>("#upload-progress");
  const xhr = new XMLHttpRequest();
  xhr.open("POST", `/v1/models/${encodeURIComponent(name)}:upload`);
  if (authorization()) xhr.setRequestHeader("authorization", authorization());
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) progress.value = e.loaded / e.total;
  };
  xhr.onload = () => {
    let reply: { version?: string; message?: string } = {};
    try {
      reply = JSON.parse(xhr.responseText);
    } catch {
      reply = { message: xhr.responseText };
    }
    if (xhr.status === 200) {
      progress.value = 1;
      say(`Uploaded ${name} version ${reply.version}`);
      onDone();
    } else if (xhr.status === 401) {
      say(`HTTP 401: ${reply.message}. Set an API key (Key button) and upload again.`, true);
    } else {
      say(`Upload failed (HTTP ${xhr.status}): ${reply.message}`, true);
    }
  };
  xhr.onerror = () => say("Upload failed: the connection to the server broke", true);
  progress.value = 0;
  xhr.send(form);
}

/** Wires the drop zone, the file picker and the form. */
export function setUpUploads(onDone: () => void): void {
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    choose(e.dataTransfer?.files ?? null);
  });
  $<HTMLInputElement>("#upload-picker").addEventListener("change", (e) => choose((e.target as HTMLInputElement).files));
  $("#upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const main = files.find((f) => f.name.endsWith(".onnx"));
    if (!main) return say("Choose a .onnx file (and its external-data files, if any)", true);
    send($<HTMLInputElement>("#upload-name").value.trim(), body(main), onDone);
  });
}
