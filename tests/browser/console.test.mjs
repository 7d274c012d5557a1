// Headless Chromium drives the console at /ui/ through Envoy against a live server
// (tests/test_console.py starts both and checks the server's side afterwards). Environment:
// MDS_URL (Envoy), MDS_FIXTURES (models, inputs, expected outputs), MDS_MODEL_NAME (a unique
// prefix), MDS_SLOW_JOB (a running job to cancel), MDS_ARTEFACTS (screenshots and downloads).
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

const fixtures = process.env.MDS_FIXTURES;
const artefacts = process.env.MDS_ARTEFACTS;
const name = process.env.MDS_MODEL_NAME;
const expected = JSON.parse(readFileSync(join(fixtures, "expected.json"), "utf8"));
const summary = { progress: {} };
let browser, page, shot = 0;

const screenshot = (step) => page.screenshot({ path: join(artefacts, `${String(++shot).padStart(2, "0")}-${step}.png`), fullPage: true });
const jobRow = (id, state) => page.locator(`#job-${id}[data-state="${state}"]`).waitFor({ timeout: 60_000 });

/** The job the page just queued, once its row says SUCCEEDED at 100%. */
async function queuedJobSucceeds(message) {
  await page.locator("#message", { hasText: message }).waitFor();
  const id = /Job (\S+) queued/.exec(await page.locator("#message").textContent())[1];
  await jobRow(id, "SUCCEEDED");
  assert.equal(await page.getByLabel(`Progress of job ${id}`).evaluate((bar) => bar.value), 100);
  return id;
}

async function downloadBy(button, file) {
  const [download] = await Promise.all([page.waitForEvent("download"), page.getByRole("button", { name: button }).click()]);
  await download.saveAs(join(artefacts, file));
}

before(async () => {
  browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
  page = await browser.newPage({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
  page.on("dialog", (dialog) => dialog.accept());
  await page.goto(`${process.env.MDS_URL}/ui`);
  await page.locator("#message", { hasText: "Ready" }).waitFor();
  // Every progress value each job's row shows, as WatchJob messages arrive.
  await page.evaluate(() => {
    window.progress = {};
    new MutationObserver(() => {
      for (const bar of document.querySelectorAll("#jobs progress")) {
        const seen = (window.progress[bar.getAttribute("aria-label").split(" ").pop()] ??= []);
        if (!seen.includes(bar.value)) seen.push(bar.value);
      }
    }).observe(document.querySelector("#jobs tbody"), { childList: true, subtree: true });
  });
});

after(async () => {
  summary.progress = await page.evaluate(() => window.progress);
  writeFileSync(join(artefacts, "summary.json"), JSON.stringify(summary, null, 1));
  await browser?.close();
});

test("cancel a running job", async () => {
  const id = process.env.MDS_SLOW_JOB;
  await jobRow(id, "RUNNING");
  await page.getByRole("button", { name: `Cancel job ${id}` }).click();
  await jobRow(id, "CANCELLED");
  await screenshot("cancelled");
});

test("upload a model from the file picker and see it listed", async () => {
  await page.getByLabel("Model files").setInputFiles(join(fixtures, "model.onnx"));
  await page.getByLabel("Name", { exact: true }).fill(name);
  await page.getByLabel("Labels").fill("team=console, stage=test");
  await page.getByRole("button", { name: "Upload", exact: true }).click();
  await page.getByRole("button", { name: `Delete ${name} version 1` }).waitFor();
  assert.equal(await page.getByLabel("Upload progress").evaluate((bar) => bar.value), 1);
  const row = page.locator("#models tr", { hasText: name });
  assert.match(await row.textContent(), /team=console/);
  assert.match(await row.textContent(), /in x FP32 \[rows, 8\]out scores FP32 \[rows, 3\]/);
  assert.match(await row.textContent(), /runs oncpu/);  // its details: where the server runs it
  await screenshot("uploaded");
});

test("drop a model with its external data and see it listed", async () => {
  const files = ["model.onnx", "model.onnx.data"].map((file) => [file, readFileSync(join(fixtures, "external", file)).toString("base64")]);
  const dataTransfer = await page.evaluateHandle((files) => {
    const transfer = new DataTransfer();
    for (const [file, data] of files) transfer.items.add(new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], file));
    return transfer;
  }, files);
  await page.getByLabel("Name", { exact: true }).fill(`${name}-external`);
  await page.dispatchEvent("#drop-zone", "drop", { dataTransfer });
  assert.match(await page.locator("#upload-files").textContent(), /model\.onnx \(\d+ B\), model\.onnx\.data \(8192 B\)/);
  await page.getByRole("button", { name: "Upload", exact: true }).click();
  await page.getByRole("button", { name: `Delete ${name}-external version 1` }).waitFor();
});

test("run a prediction from the form and check the numbers", async () => {
  await page.locator("#predict-form").getByLabel(/^Model/).selectOption({ label: `${name} v1` });
  await page.getByLabel(/^x — FP32/).fill(JSON.stringify(expected.x));
  await page.getByRole("button", { name: "Predict", exact: true }).click();
  const scores = page.locator("table.output", { hasText: "scores" });
  await scores.waitFor();
  const cells = (await scores.locator("td").allTextContents()).map(Number);
  assert.deepEqual(cells, expected.scores.flat().map(Math.fround));
  const labels = await page.locator("table.output", { hasText: "label" }).locator("td").allTextContents();
  assert.deepEqual(labels, expected.label.map(String));
  await screenshot("predicted");
});

test("a prediction the server refuses shows its code and message", async () => {
  const input = page.getByLabel(/^x — FP32/);
  const valid = await input.inputValue();
  await input.fill("[1, 2, 3]");
  await page.getByRole("button", { name: "Predict", exact: true }).click();
  const alert = page.getByRole("alert");
  await alert.waitFor();
  assert.match(await alert.textContent(), /^INVALID_ARGUMENT: .*\bx\b/);
  await input.fill("[[1, 2], [3]");
  await page.getByRole("button", { name: "Predict", exact: true }).click();
  await page.getByRole("alert").filter({ hasText: "x: not JSON" }).waitFor();
  await input.fill(valid);
});

test("start a job from the form, see it reach 100%, download its results", async () => {
  await page.locator("#predict-form").getByLabel("Rows per batch").fill("1");
  await page.getByRole("button", { name: "Run as job" }).click();
  const id = await queuedJobSucceeds("queued");
  await downloadBy(`Download results of job ${id}`, "form-job-results.json");
  summary.formJob = id;
});

test("start a job from an .npy file, see it reach 100%, download an output as .npy", async () => {
  await page.locator("#npy-form").getByLabel(/^Model/).selectOption(name);
  await page.getByLabel(/^Inputs/).setInputFiles(join(fixtures, "x.npy"));
  await page.locator("#npy-form").getByLabel("Rows per batch").fill("100");
  await page.getByRole("button", { name: "Start job" }).click();
  const id = await queuedJobSucceeds("queued on");
  await downloadBy(`Download scores.npy of job ${id}`, "npy-job-scores.npy");
  summary.npyJob = id;
  await screenshot("jobs");
});

test("the server section shows health and charts from the metrics", async () => {
  await page.locator("#health", { hasText: "live: yes, ready: yes" }).waitFor();
  await page.getByRole("img", { name: "Requests per second" }).waitFor();
  await page.getByRole("img", { name: `Mean latency of ${name}`, exact: true }).waitFor({ timeout: 30_000 });
  await screenshot("server");
});

test("delete a model version", async () => {
  await page.getByRole("button", { name: `Delete ${name}-external version 1` }).click();
  await page.getByRole("button", { name: `Delete ${name}-external version 1` }).waitFor({ state: "detached" });
  await screenshot("deleted");
});
