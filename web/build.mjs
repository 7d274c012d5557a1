// Builds the console into web/dist: one bundled, minified script (the generated stubs and
// connect-web vendored in it), the page and its stylesheet. Envoy serves that folder under /ui/
// (scripts/run_envoy.py). Each file is replaced atomically, so an Envoy starting meanwhile reads
// whole files. Run with `npm run build-console`.
import { mkdirSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { build } from "esbuild";

const web = dirname(fileURLToPath(import.meta.url));
const dist = join(web, "dist");
const { outputFiles } = await build({
  entryPoints: [join(web, "src", "main.ts")],
  outfile: join(dist, "console.js"),
  write: false,
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2022",
  legalComments: "none",
  logLevel: "warning",
});
const files = {
  "console.js": outputFiles[0].contents,
  "index.html": readFileSync(join(web, "index.html")),
  "console.css": readFileSync(join(web, "console.css")),
};
mkdirSync(dist, { recursive: true });
for (const [name, contents] of Object.entries(files)) {
  writeFileSync(join(dist, `.${name}.tmp`), contents);
  renameSync(join(dist, `.${name}.tmp`), join(dist, name));
}
for (const name of readdirSync(dist)) if (!(name in files)) rmSync(join(dist, name), { force: true });
