/** Predictions: a form made from the chosen model's signature; the reply as one table per output. */
import { ConnectError } from "@connectrpc/connect";

import { TensorEncoding, type Tensor } from "../../gen/ts/mds/v1/tensor_pb.js";
import type { Model } from "../../gen/ts/mds/v1/model_service_pb.js";
import { inference, jobs, withAuth } from "./api.js";
import { $, h, say } from "./dom.js";
import { describe, fromJson, valuesOf } from "./tensors.js";

let choices: Model[] = [];

const chosen = (): Model | undefined => choices[Number($<HTMLSelectElement>("#predict-model").value)];

/** One textarea per input of the chosen model. */
function renderInputs(): void {
  const model = chosen();
  const fields = (model?.inputs ?? []).map((spec) =>
    h(
      "label",
      {},
      `${spec.name} — ${describe(spec)}`,
      h("textarea", { name: spec.name, rows: 2, required: true, placeholder: "JSON: 1.5 or [[1, 2], [3, 4]]" }),
    ),
  );
  $("#predict-inputs").replaceChildren(...fields);
}

/** Offers every model version (latest first) in the form. */
export function setPredictModels(list: Model[]): void {
  const select = $<HTMLSelectElement>("#predict-model");
  const before = select.selectedOptions[0]?.textContent;
  choices = [...list].sort((a, b) => a.name.localeCompare(b.name) || Number(b.version - a.version));
  select.replaceChildren(...choices.map((m, i) => h("option", { value: i }, `${m.name} v${m.version}`)));
  const again = choices.findIndex((m) => `${m.name} v${m.version}` === before);
  if (again >= 0) select.value = String(again);
  else renderInputs(); // the same version stays chosen with what was typed for it
}

function inputs(model: Model) {
  const form = $<HTMLFormElement>("#predict-form");
  return model.inputs.map((spec) => fromJson(spec, (form.elements.namedItem(spec.name) as HTMLTextAreaElement).value));
}

/** A tensor as a table: one row per entry of its first dimension. */
function table(tensor: Tensor): HTMLTableElement {
  const values = valuesOf(tensor);
  const rows = tensor.shape.length ? Number(tensor.shape[0]) : 1;
  const width = rows ? values.length / rows : 0;
  return h(
    "table",
    { class: "output" },
    h("caption", {}, `${tensor.name} — ${describe(tensor)}`),
    h("tbody", {}, Array.from({ length: rows }, (_, r) =>
      h("tr", {}, h("th", { scope: "row" }, r), values.slice(r * width, (r + 1) * width).map((v) => h("td", {}, String(v)))),
    )),
  );
}

async function predict(model: Model): Promise<void> {
  const request = { model: model.name, version: model.version, inputs: inputs(model), outputEncoding: TensorEncoding.CONTENTS };
  const reply = await withAuth(() => inference.predict(request));
  const structured = Object.entries(reply.structuredOutputs).map(([name, value]) =>
    h("figure", {}, h("figcaption", {}, name), h("pre", {}, JSON.stringify(value, null, 1))),
  );
  $("#predict-result").replaceChildren(...reply.outputs.map(table), ...structured);
  say(`${model.name} v${reply.version} answered`);
}

async function startJob(model: Model, onStarted: () => void): Promise<void> {
  const batchRows = BigInt($<HTMLInputElement>("#job-batch-rows").value || 0);
  const job = await withAuth(() => jobs.createJob({ model: model.name, version: model.version, inputs: inputs(model), batchRows }));
  say(`Job ${job.id} queued`);
  onStarted();
}

/** Wires the form: Predict runs at once, "Run as job" queues the same inputs as a job. */
export function setUpPredictions(onJobStarted: () => void): void {
  $("#predict-model").addEventListener("change", renderInputs);
  $("#predict-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const model = chosen();
    const job = (e as SubmitEvent).submitter?.id === "run-as-job";
    if (!model) return;
    (job ? startJob(model, onJobStarted) : predict(model)).catch((error: Error) => {
      if (!(error instanceof ConnectError)) say(error.message, true);  // withAuth reported the server's errors
    });
  });
}
