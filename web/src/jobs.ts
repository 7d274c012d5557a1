/** The job queue: jobs by state with live progress (WatchJob), cancel, and result download. */
import { timestampDate } from "@bufbuild/protobuf/wkt";

import { DataType } from "../../gen/ts/mds/v1/tensor_pb.js";
import { JobState, type Job } from "../../gen/ts/mds/v1/job_service_pb.js";
import { authorization, jobs, withAuth } from "./api.js";
import { $, download, h, say } from "./dom.js";
import { valuesOf } from "./tensors.js";

const watching = new Map<string, AbortController>();
const active = (job: Job) => job.state === JobState.QUEUED || job.state === JobState.RUNNING;

function percent(job: Job): number {
  return job.rowsTotal ? Math.floor((Number(job.rowsDone) * 100) / Number(job.rowsTotal)) : 0;
}

function row(job: Job): HTMLTableRowElement {
  return h(
    "tr",
    { id: `job-${job.id}`, "data-state": JobState[job.state] },
    h("td", {}, h("code", {}, job.id)),
    h("td", {}, `${job.model} v${job.version}`),
    h("td", { class: "state" }, JobState[job.state], job.error ? h("div", { class: "error" }, job.error) : null),
    h(
      "td",
      {},
      h("progress", { max: 100, value: percent(job), "aria-label": `Progress of job ${job.id}` }),
      ` ${percent(job)}% (${job.rowsDone}/${job.rowsTotal} rows)`,
    ),
    h("td", {}, job.createdAt ? timestampDate(job.createdAt).toLocaleString() : ""),
    h(
      "td",
      {},
      active(job) && h("button", { type: "button", "aria-label": `Cancel job ${job.id}`, onclick: () => void cancel(job.id) }, "Cancel"),
      job.state === JobState.SUCCEEDED && [
        h("button", { type: "button", "aria-label": `Download results of job ${job.id}`, onclick: () => void results(job) }, "Results (JSON)"),
        job.outputNames.map((name) =>
          h("button", { type: "button", "aria-label": `Download ${name}.npy of job ${job.id}`, onclick: () => void npy(job, name) }, `${name}.npy`),
        ),
      ],
    ),
  );
}

function show(job: Job): void {
  document.getElementById(`job-${job.id}`)?.replaceWith(row(job));
}

/** Follows a job's WatchJob stream until it ends, updating its row message by message. */
async function watch(id: string): Promise<void> {
  if (watching.has(id)) return;
  const abort = new AbortController();
  watching.set(id, abort);
  try {
    for await (const job of jobs.watchJob({ id }, { signal: abort.signal })) show(job);
  } catch {
    // cancelled by a new listing, or the stream broke: the next listing shows the state
  } finally {
    watching.delete(id);
  }
}

async function cancel(id: string): Promise<void> {
  show(await withAuth(() => jobs.cancelJob({ id })));
  say(`Job ${id} cancelled`);
}

/** Saves the job's results as JSON: per output, its dtype, full shape and values in row order. */
async function results(job: Job): Promise<void> {
  const outputs: Record<string, { dtype: string; shape: number[]; values: unknown[] }> = {};
  await withAuth(async () => {
    for await (const batch of jobs.getJobResults({ id: job.id })) {
      for (const tensor of batch.outputs) {
        const out = (outputs[tensor.name] ??= { dtype: DataType[tensor.dtype], shape: [0, ...tensor.shape.slice(1).map(Number)], values: [] });
        out.shape[0] += Number(tensor.shape[0]);
        out.values.push(...valuesOf(tensor));
      }
    }
  });
  const file = { job: job.id, model: job.model, version: String(job.version), outputs };
  download(`job-${job.id}-results.json`, JSON.stringify(file), "application/json");
  say(`Saved the results of job ${job.id}`);
}

/** Saves one output of the job as an .npy file (GET /v1/jobs/{id}/results?format=npy&output=NAME). */
async function npy(job: Job, output: string): Promise<void> {
  const url = `/v1/jobs/${job.id}/results?format=npy&output=${encodeURIComponent(output)}`;
  const reply = await fetch(url, { headers: authorization() ? { authorization: authorization() } : {} });
  if (!reply.ok) return say(`Download failed (HTTP ${reply.status}): ${await reply.text()}`, true);
  download(`job-${job.id}-${output}.npy`, await reply.blob());
}

/** Uploads the chosen .npy files (each named after its input) as a job input, then queues a job on it. */
async function startFromFiles(): Promise<void> {
  const form = new FormData();
  for (const file of $<HTMLInputElement>("#npy-files").files ?? []) form.append(file.name.replace(/\.npy$/, ""), file, file.name);
  const headers = authorization() ? { authorization: authorization() } : undefined;
  const reply = await fetch("/v1/jobInputs:upload", { method: "POST", body: form, headers });
  const input = await reply.json().catch(() => ({ message: reply.statusText }));
  if (!reply.ok) return say(`Job input upload failed (HTTP ${reply.status}): ${input.message}`, true);
  const model = $<HTMLSelectElement>("#npy-model").value;
  const batchRows = BigInt($<HTMLInputElement>("#npy-batch-rows").value || 0);
  const job = await withAuth(() => jobs.createJob({ model, inputId: input.id, batchRows }));
  say(`Job ${job.id} queued on ${input.rows} rows`);
  await refreshJobs();
}

/** Offers the model names for jobs started from files (each runs the latest version). */
export function setJobModels(names: string[]): void {
  const select = $<HTMLSelectElement>("#npy-model");
  const before = select.value;
  select.replaceChildren(...names.map((name) => h("option", {}, name)));
  if (names.includes(before)) select.value = before;
}

/** Lists the jobs (newest first) in the chosen state, and watches those queued or running. */
export async function refreshJobs(): Promise<void> {
  const state = Number($<HTMLSelectElement>("#job-state").value) as JobState;
  const reply = await withAuth(() => jobs.listJobs({ pageSize: 100, state }));
  $("#jobs tbody").replaceChildren(...reply.jobs.map(row));
  $("#jobs-empty").hidden = reply.jobs.length > 0;
  for (const job of reply.jobs) if (active(job)) void watch(job.id);
}

/** Wires the state filter and the refresh button. */
export function setUpJobs(): void {
  const select = $<HTMLSelectElement>("#job-state");
  const states = [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED];
  select.append(...states.map((s) => h("option", { value: s }, JobState[s].toLowerCase())));
  select.addEventListener("change", () => void refreshJobs().catch(() => undefined));
  $("#jobs-refresh").addEventListener("click", () => void refreshJobs().catch(() => undefined));
  $("#npy-form").addEventListener("submit", (e) => {
    e.preventDefault();
    startFromFiles().catch(() => undefined);
  });
}
