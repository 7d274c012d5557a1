// gRPC-Web through Envoy with connect-web: the calls of grpc_web_calls.mjs from Node (fetch), and
// from a page in headless Chromium served from an allowed origin, then from an origin not allowed.
// tests/test_grpc_web.py starts the server, Envoy and the pages' web servers, and passes:
// MDS_ENVOY_URL, MDS_API_KEY, MDS_SNIPPET (the docs' module), MDS_FIXTURES (fixtures.json),
// MDS_PAGE_ALLOWED and MDS_PAGE_REFUSED (the test page from two origins).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { pathToFileURL } from "node:url";

import { Code } from "@connectrpc/connect";
import { chromium } from "playwright-core";

import { browserMethods, exercise } from "./grpc_web_calls.mjs";

const env = process.env;
const fixtures = JSON.parse(readFileSync(env.MDS_FIXTURES, "utf8"));

function check(result, name) {
  const f = fixtures[name];
  assert.deepEqual(result.called, browserMethods(), "every unary and server-streaming RPC is called");
  assert.deepEqual([result.listed, result.latest], [[1, 2], 2]);
  assert.deepEqual(result.predicted, { scores: f.scores.map(Math.fround), label: f.label });
  assert.deepEqual(result.typed, [11, 22]);
  assert.deepEqual(
    [result.aliases, result.throughAlias, result.history, result.aliasDeleted], [[["web", 1]], 1, ["set"], "web"],
  );

  // Several progress messages, each further on, before the final one.
  const total = f.jobX.length / f.features;
  const final = result.updates.at(-1);
  assert.deepEqual(final, { state: "SUCCEEDED", rowsDone: total, rowsTotal: total });
  const done = result.updates.map((u) => u.rowsDone);
  assert.deepEqual(done, [...done].sort((a, b) => a - b), "progress never goes back");
  const partial = new Set(done.filter((rows) => 0 < rows && rows < total));
  assert.ok(partial.size >= 3, `progress before the end: ${JSON.stringify(result.updates)}`);
  assert.deepEqual([result.fetched, result.listedJob], [final, true]);
  assert.deepEqual(result.jobOutputs, { scores: f.jobScores.map(Math.fround), label: f.jobLabel });

  // Cancelled on its first progress message, so that message came while the job was running.
  assert.equal(result.cancelled.state, "CANCELLED");
  const ended = result.cancelUpdates.at(-1);
  assert.ok(ended.state === "CANCELLED" && ended.rowsDone < total, JSON.stringify(result.cancelUpdates));

  assert.deepEqual(result.notFound, { code: Code.NotFound, message: `model '${f.model}-missing' does not exist` });
  assert.equal(result.noKey.code, Code.Unauthenticated);
  assert.match(result.noKey.message, /authorization/);
  assert.deepEqual(result.deleted, [2]);
}

test("from Node", async () => {
  const snippet = await import(pathToFileURL(env.MDS_SNIPPET));
  check(await exercise(snippet, env.MDS_ENVOY_URL, env.MDS_API_KEY, fixtures.node), "node");
});

test("from a page in Chromium, on another origin", async (t) => {
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
  t.after(() => browser.close());
  const run = async (origin, name) => {
    const page = await browser.newPage();
    const console = [];
    page.on("console", (message) => console.push(message.text()));
    await page.goto(`${origin}/index.html`);
    const result = await page.evaluate(
      ([url, key, f]) => window.exercise(url, key, f).catch((error) => ({ error: String(error) })),
      [env.MDS_ENVOY_URL, env.MDS_API_KEY, fixtures[name]],
    );
    return { result, console };
  };

  const allowed = await run(env.MDS_PAGE_ALLOWED, "page");
  assert.equal(allowed.result.error, undefined, allowed.result.error);
  check(allowed.result, "page");

  const refused = await run(env.MDS_PAGE_REFUSED, "page");
  assert.equal(refused.result.error, "ConnectError: [unknown] Failed to fetch");
  assert.ok(refused.console.some((line) => /blocked by CORS policy/.test(line)), refused.console.join("\n"));
});
