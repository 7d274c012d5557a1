/** Models: every stored version with its signature, labels, metadata and aliases; deleting a version. */
import { timestampDate } from "@bufbuild/protobuf/wkt";

import type { Model } from "../../gen/ts/mds/v1/model_service_pb.js";
import { models, withAuth } from "./api.js";
import { $, h, say } from "./dom.js";
import { describe } from "./tensors.js";

/** Every version of every model, following the pages of ListModels. */
export async function listModels(): Promise<Model[]> {
  const all: Model[] = [];
  let pageToken = "";
  do {
    const page = await withAuth(() => models.listModels({ pageSize: 1000, pageToken }));
    all.push(...page.models);
    pageToken = page.nextPageToken;
  } while (pageToken);
  return all;
}

const signature = (model: Model) =>
  h(
    "ul",
    { class: "plain" },
    ...model.inputs.map((s) => h("li", {}, "in ", h("code", {}, s.name), " ", describe(s))),
    ...model.outputs.map((s) => h("li", {}, "out ", h("code", {}, s.name), " ", describe(s))),
  );

const details = (model: Model) =>
  h(
    "details",
    {},
    h("summary", {}, "details"),
    h("dl", {},
      h("dt", {}, "description"), h("dd", {}, model.description || "—"),
      h("dt", {}, "metadata"), h("dd", {}, h("pre", {}, JSON.stringify(model.metadata ?? {}, null, 1))),
      h("dt", {}, "files"), h("dd", {}, model.files.map((f) => `${f.path} (${f.sizeBytes} B)`).join(", ")),
      h("dt", {}, "sha256"), h("dd", {}, h("code", {}, model.sha256)),
      h("dt", {}, "producer"), h("dd", {}, `${model.producerName} ${model.producerVersion}`),
      h("dt", {}, "runs on"), h("dd", {}, model.executionProviders.join(", ") || "no provider of this server"),
    ),
  );

async function remove(model: Model, refresh: () => void): Promise<void> {
  if (!confirm(`Delete ${model.name} version ${model.version}?`)) return;
  const reply = await withAuth(() => models.deleteModel({ name: model.name, version: model.version }));
  say(`Deleted ${reply.name} version ${reply.deletedVersions.join(", ")}`);
  refresh();
}

/** Fills the models table. */
export function renderModels(list: Model[], refresh: () => void): void {
  const rows = list.map((m) =>
    h(
      "tr",
      {},
      h("td", {}, h("strong", {}, m.name)),
      h("td", {}, String(m.version)),
      h("td", {}, signature(m)),
      h("td", {}, Object.entries(m.labels).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`))),
      h("td", {}, m.aliases.map((a) => h("span", { class: "tag alias" }, a))),
      h("td", {}, m.createdAt ? timestampDate(m.createdAt).toLocaleString() : ""),
      h("td", {}, details(m)),
      h("td", {}, h("button", { type: "button", "aria-label": `Delete ${m.name} version ${m.version}`, onclick: () => void remove(m, refresh) }, "Delete")),
    ),
  );
  $("#models tbody").replaceChildren(...rows);
  $("#models-empty").hidden = list.length > 0;
}
