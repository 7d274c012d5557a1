/** The MDS console: wires the page's sections and keeps the models and jobs listings fresh. */
import { $, say } from "./dom.js";
import { refreshJobs, setJobModels, setUpJobs } from "./jobs.js";
import { listModels, renderModels } from "./models.js";
import { setPredictModels, setUpPredictions } from "./predict.js";
import { watchServer } from "./server.js";
import { setUpUploads } from "./upload.js";

async function refreshModels(): Promise<void> {
  const list = await listModels();
  renderModels(list, () => void refreshModels().catch(() => undefined));
  setPredictModels(list);
  setJobModels([...new Set(list.map((m) => m.name))].sort());
}

const refreshAll = () => Promise.all([refreshModels(), refreshJobs()]).catch(() => undefined);

$("#models-refresh").addEventListener("click", () => void refreshModels().catch(() => undefined));
$("#key-button").addEventListener("click", () => {
  const dialog = $<HTMLDialogElement>("#key-dialog");
  dialog.addEventListener("close", () => void refreshAll(), { once: true });
  dialog.showModal();
});
setUpUploads(() => void refreshModels().catch(() => undefined));
setUpPredictions(() => void refreshJobs().catch(() => undefined));
setUpJobs();
say("Loading…");
void refreshAll().then(() => say("Ready"));
watchServer();
setInterval(() => document.hidden || void refreshJobs().catch(() => undefined), 5000);  // jobs started elsewhere
