// A page in headless Chromium streams predictions over a WebSocket through Envoy
// (tests/test_websocket.py starts both). Environment: MDS_WS_URL (ws://…/v1/predictions:ws),
// MDS_KEY (an API key for models starting with "ws-"), MDS_MODEL_NAME (z = a + b).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

const url = process.env.MDS_WS_URL;
const key = process.env.MDS_KEY;
const model = process.env.MDS_MODEL_NAME;
let browser, page;

before(async () => {
  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
  page = await browser.newPage();
  // A page of Envoy's own origin: Chromium blocks pages of other origins from reaching loopback addresses.
  await page.goto(`http://${new URL(url).host}/docs/`);
});

after(async () => browser?.close());

// Runs in the page: send `count` requests as the socket opens, resolve with every reply (parsed) or the close.
function stream({ url, protocols, model, count }) {
  const tensor = (name, value) => ({ name, dtype: "DATA_TYPE_FP32", shape: [1], contents: { fp32Contents: [value] } });
  const request = (i) => {
    if (i === 500) return { model: "other-model", inputs: [tensor("a", i), tensor("b", 1)], requestId: `r${i}` };
    if (i === 600) return { model, inputs: [tensor("a", i)], requestId: `r${i}` };
    return { model, inputs: [tensor("a", i), tensor("b", 1)], requestId: `r${i}` };
  };
  return new Promise((resolve) => {
    const socket = new WebSocket(url, protocols);
    const replies = [];
    socket.onopen = () => {
      for (let i = 0; i < count; i++) socket.send(JSON.stringify(request(i)));
    };
    socket.onmessage = (event) => {
      replies.push(JSON.parse(event.data));
      if (replies.length === count) {
        socket.close(1000);
        resolve({ protocol: socket.protocol, replies });
      }
    };
    socket.onclose = (event) => resolve({ code: event.code, reason: event.reason, replies });
  });
}

test("a thousand requests come back in order, with per-message errors", async () => {
  const protocols = ["mds.v1.json", `mds.v1.bearer.${key}`];
  const { protocol, replies } = await page.evaluate(stream, { url, protocols, model, count: 1000 });
  assert.equal(protocol, "mds.v1.json");
  assert.deepEqual(
    replies.map((r) => r.requestId),
    Array.from({ length: 1000 }, (_, i) => `r${i}`),
  );
  assert.equal(replies[500].error.code, 7); // PERMISSION_DENIED: the key is for models starting with "ws-"
  assert.match(replies[500].error.message, /may not use model 'other-model'/);
  assert.equal(replies[600].error.code, 3); // INVALID_ARGUMENT
  assert.match(replies[600].error.message, /missing input 'b'/);
  replies.forEach((reply, i) => {
    if (i !== 500 && i !== 600) assert.deepEqual(reply.response.outputs[0].contents.fp32Contents, [i + 1], `r${i}`);
  });
});

test("without a key the connection closes with UNAUTHENTICATED and a reason", async () => {
  const closed = await page.evaluate(stream, { url, protocols: ["mds.v1.json"], model, count: 1 });
  assert.equal(closed.code, 4016);
  assert.match(closed.reason, /missing API key/);
});
