// The console with API keys on: it asks for a key when the server says UNAUTHENTICATED, keeps it in
// session storage only, and sends it with gRPC-Web calls and uploads. Environment: MDS_URL,
// MDS_KEY (an admin key), MDS_FIXTURES (model.onnx), MDS_ARTEFACTS.
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";

import { chromium } from "playwright-core";

test("asks for a key, keeps it for the tab only, and uses it", async () => {
  const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(`${process.env.MDS_URL}/ui/`);
    const dialog = page.getByRole("dialog", { name: "API key" });
    await dialog.waitFor();
    assert.match(await dialog.textContent(), /missing API key/);
    await page.screenshot({ path: join(process.env.MDS_ARTEFACTS, "key-asked.png") });
    await page.getByLabel(/^Key/).fill(process.env.MDS_KEY);
    await page.getByRole("button", { name: "Use key" }).click();
    await page.getByRole("button", { name: "Delete console-secured version 1" }).waitFor();

    await page.getByLabel("Model files").setInputFiles(join(process.env.MDS_FIXTURES, "model.onnx"));
    await page.getByLabel("Name", { exact: true }).fill("console-secured");
    await page.getByRole("button", { name: "Upload", exact: true }).click();
    await page.getByRole("button", { name: "Delete console-secured version 2" }).waitFor();

    const stored = await page.evaluate(() => [sessionStorage.getItem("mds-api-key"), localStorage.length, document.cookie]);
    assert.deepEqual(stored, [process.env.MDS_KEY, 0, ""]);
    await page.reload();  // same tab: the key is still there
    await page.getByRole("button", { name: "Delete console-secured version 2" }).waitFor();
    assert.equal(await dialog.isVisible(), false);

    const other = await context.newPage();  // another tab asks again
    await other.goto(`${process.env.MDS_URL}/ui/`);
    await other.getByRole("dialog", { name: "API key" }).waitFor();
  } finally {
    await browser.close();
  }
});
