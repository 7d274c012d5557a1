// What a web app does with MDS over gRPC-Web, run the same way from Node and from a page in
// Chromium: every unary and server-streaming RPC of mds.v1, through the clients of the docs'
// snippet (docs/browsers.md). It returns what came back, as plain JSON, for the caller to check.
import { ConnectError } from "@connectrpc/connect";

import { InferenceService } from "../../gen/ts/mds/v1/inference_service_pb.js";
import { JobService, JobState } from "../../gen/ts/mds/v1/job_service_pb.js";
import { ModelService } from "../../gen/ts/mds/v1/model_service_pb.js";
import { DataType } from "../../gen/ts/mds/v1/tensor_pb.js";

const SERVICES = { models: ModelService, inference: InferenceService, jobs: JobService };

// The methods a browser can call: gRPC-Web has no client or bidirectional streaming.
export function browserMethods() {
  return Object.entries(SERVICES).flatMap(([client, service]) =>
    service.methods
      .filter((m) => m.methodKind === "unary" || m.methodKind === "server_streaming")
      .map((m) => `${client}.${m.localName}`),
  ).sort();
}

// The clients, noting each method called.
function recording(clients, called) {
  const wrap = (name, client) =>
    new Proxy(client, { get: (target, method) => (called.add(`${name}.${String(method)}`), target[method]) });
  return Object.fromEntries(Object.entries(clients).map(([name, client]) => [name, wrap(name, client)]));
}

function rows(values, features) {
  return {
    name: "x", dtype: DataType.FP32, shape: [BigInt(values.length / features), BigInt(features)],
    rawData: new Uint8Array(new Float32Array(values).buffer),
  };
}

// The dense model's outputs as numbers: scores (float32) and label (int64).
function outputs(tensors) {
  const bytes = (name) => tensors.find((t) => t.name === name).rawData.slice().buffer;
  return {
    scores: Array.from(new Float32Array(bytes("scores"))),
    label: Array.from(new BigInt64Array(bytes("label")), Number),
  };
}

const progress = (job) =>
  ({ state: JobState[job.state], rowsDone: Number(job.rowsDone), rowsTotal: Number(job.rowsTotal) });

async function failure(call) {
  try {
    await call();
  } catch (error) {
    const e = ConnectError.from(error);
    return { code: e.code, message: e.rawMessage };
  }
  return null;
}

// f: the model (versions 1 and 2 uploaded), an adder, the rows to predict and the job's rows (test_grpc_web.py).
export async function exercise(snippet, baseUrl, apiKey, f) {
  const called = new Set();
  const { models, inference, jobs } = recording(snippet.mdsClients(baseUrl, apiKey), called);
  const result = {};

  const listed = await models.listModels({ name: f.model }, { timeoutMs: 60_000 });  // sends grpc-timeout too
  result.listed = listed.models.map((m) => Number(m.version));
  result.latest = Number((await models.getModel({ name: f.model })).version);
  result.predicted = outputs((await inference.predict({ model: f.model, inputs: [rows(f.x, f.features)] })).outputs);
  const typed = await inference.predict({ model: f.adder, inputs: [  // as in docs/browsers.md
    { name: "a", dtype: DataType.FP32, shape: [2n], contents: { fp32Contents: [1, 2] } },
    { name: "b", dtype: DataType.FP32, shape: [2n], contents: { fp32Contents: [10, 20] } },
  ] });
  result.typed = typed.outputs[0].contents.fp32Contents;

  await models.setAlias({ model: f.model, alias: "web", version: 1n });
  result.aliases = (await models.listAliases({ model: f.model })).aliases.map((a) => [a.alias, Number(a.version)]);
  const throughAlias = await inference.predict({ model: f.model, alias: "web", inputs: [rows(f.x, f.features)] });
  result.throughAlias = Number(throughAlias.version);
  result.history = (await models.listAliasHistory({ model: f.model, alias: "web" })).changes.map((c) => c.action);
  result.aliasDeleted = (await models.deleteAlias({ model: f.model, alias: "web" })).alias;

  // A job over many batches: its progress as each message arrives, then its results.
  const jobRequest = {
    model: f.model, version: 1n, inputs: [rows(f.jobX, f.features)], batchRows: BigInt(f.batchRows),
  };
  const job = await jobs.createJob(jobRequest);
  result.updates = [];
  await snippet.followJob(jobs, job.id, (update) => result.updates.push(progress(update)));
  result.fetched = progress(await jobs.getJob({ id: job.id }));
  result.listedJob = (await jobs.listJobs({ model: f.model })).jobs.some((j) => j.id === job.id);
  const batches = [];
  for await (const batch of jobs.getJobResults({ id: job.id })) batches.push(outputs(batch.outputs));
  result.jobOutputs = { scores: batches.flatMap((b) => b.scores), label: batches.flatMap((b) => b.label) };

  // Cancelled when its first progress arrives: proof that it arrived while the job ran.
  const second = await jobs.createJob(jobRequest);
  result.cancelUpdates = [];
  await snippet.followJob(jobs, second.id, async (update) => {
    result.cancelUpdates.push(progress(update));
    if (update.state === JobState.RUNNING && update.rowsDone > 0n && !result.cancelled) {
      result.cancelled = progress(await jobs.cancelJob({ id: second.id }));
    }
  });

  result.notFound = await failure(() => models.getModel({ name: `${f.model}-missing` }));
  result.noKey = await failure(() => snippet.mdsClients(baseUrl, "").models.listModels({}));
  result.deleted = (await models.deleteModel({ name: f.model, version: 2n })).deletedVersions.map(Number);
  result.called = [...called].sort();
  return result;
}
