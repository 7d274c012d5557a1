// A Node backend using the generated stubs in gen/ts (protobuf-es + Connect's gRPC
// transport) against a live MDS server. The Python test harness starts the server and
// passes, in MDS_FIXTURES, a model and the outputs in-process onnxruntime gives.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";

import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { InferenceService, PredictRequestSchema } from "../../gen/ts/mds/v1/inference_service_pb.js";
import { ModelService } from "../../gen/ts/mds/v1/model_service_pb.js";
import { DataType } from "../../gen/ts/mds/v1/tensor_pb.js";

const fixtures = process.env.MDS_FIXTURES;
const expected = JSON.parse(readFileSync(join(fixtures, "expected.json"), "utf8"));
const model = readFileSync(join(fixtures, "model.onnx"));
const name = process.env.MDS_MODEL_NAME;
const transport = createGrpcTransport({ baseUrl: `http://${process.env.MDS_ADDRESS}` });
const models = createClient(ModelService, transport);
const inference = createClient(InferenceService, transport);

const shape = [BigInt(expected.rows), BigInt(expected.features)];
const rawInput = {
  name: "x", dtype: DataType.FP32, shape,
  rawData: new Uint8Array(new Float32Array(expected.x).buffer),
};
const typedInput = { name: "x", dtype: DataType.FP32, shape, contents: { fp32Contents: expected.x } };

function checkOutputs(outputs) {
  assert.deepEqual(outputs.map((o) => o.name), ["scores", "label"]);
  const [scores, label] = outputs;
  const scoreValues = scores.rawData.length
    ? Array.from(new Float32Array(scores.rawData.slice().buffer)) : scores.contents.fp32Contents;
  const labelValues = label.rawData.length
    ? Array.from(new BigInt64Array(label.rawData.slice().buffer)) : label.contents.int64Contents;
  assert.deepEqual(scoreValues, expected.scores.map(Math.fround));
  assert.deepEqual(labelValues, expected.label.map(BigInt));
}

// Stores the model as the next version of `modelName`, in chunks over the client stream.
async function upload(modelName) {
  async function* chunks() {
    yield { payload: { case: "header", value: { name: modelName, labels: { client: "node" } } } };
    for (let offset = 0; offset < model.length; offset += 100) {
      yield { payload: { case: "chunk", value: model.subarray(offset, offset + 100) } };
    }
  }
  return models.uploadModel(chunks());
}

function assertNotFound(fragment) {
  return (error) => {
    assert.ok(error instanceof ConnectError);
    assert.equal(error.code, Code.NotFound);
    assert.match(error.rawMessage, fragment);
    return true;
  };
}

test("upload, predict, stream and errors from Node", async () => {
  const stored = await upload(name);
  assert.equal(stored.version, 1n);
  assert.equal(stored.labels.client, "node");

  for (const input of [rawInput, typedInput]) {
    const reply = await inference.predict({ model: name, inputs: [input] });
    checkOutputs(reply.outputs);
  }

  // Six requests in flight on one stream; the fourth misses its input.
  async function* requests() {
    for (let i = 0; i < 6; i++) {
      yield create(PredictRequestSchema, { model: name, requestId: String(i), inputs: i === 3 ? [] : [rawInput] });
    }
  }
  const replies = [];
  for await (const reply of inference.predictStream(requests())) replies.push(reply);
  assert.deepEqual(replies.map((r) => r.requestId), ["0", "1", "2", "3", "4", "5"]);
  for (const [i, reply] of replies.entries()) {
    if (i === 3) {
      assert.equal(reply.result.case, "error");
      assert.equal(reply.result.value.code, Code.InvalidArgument);
      assert.match(reply.result.value.message, /missing input 'x'/);
    } else {
      checkOutputs(reply.result.value.outputs);
    }
  }

  await assert.rejects(models.getModel({ name: `${name}-missing` }), assertNotFound(/does not exist/));
});

test("an alias selects a version from Node", async () => {
  // prod points at version 1 while version 2 is the latest.
  const aliased = `${name}-aliases`;
  assert.equal((await upload(aliased)).version, 1n);
  assert.equal((await upload(aliased)).version, 2n);
  const alias = await models.setAlias({ model: aliased, alias: "prod", version: 1n });
  assert.deepEqual([alias.model, alias.alias, alias.version, alias.canaryVersion], [aliased, "prod", 1n, 0n]);
  assert.ok(alias.updatedAt.seconds > 0n);

  const predict = (through) => inference.predict({ model: aliased, alias: through, inputs: [rawInput] });
  const reply = await predict("prod");
  assert.equal(reply.version, 1n);
  checkOutputs(reply.outputs);

  const { aliases } = await models.listAliases({ model: aliased });
  assert.deepEqual(aliases.map((a) => [a.alias, a.version]), [["prod", 1n]]);
  await assert.rejects(predict("staging"), assertNotFound(/'staging'/));

  const deleted = await models.deleteAlias({ model: aliased, alias: "prod" });
  assert.deepEqual([deleted.alias, deleted.version], ["prod", 1n]);
  await assert.rejects(predict("prod"), assertNotFound(/'prod'/));
});
