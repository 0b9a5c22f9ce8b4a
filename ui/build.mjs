// Deterministic build: the same sources and lockfile give the same bytes (a test compares the
// committed appliance/web/ui/ with a fresh `npm ci && npm run build`).
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = process.env.APPLIANCE_UI_OUT || join(here, "..", "appliance", "web", "ui");
mkdirSync(out, { recursive: true });

const common = { bundle: true, minify: true, write: false, logLevel: "warning", legalComments: "eof", charset: "ascii" };
const js = await build({ ...common, entryPoints: [join(here, "src", "main.js")], format: "iife", target: ["es2020"], outfile: "app.js" });
const css = await build({ ...common, entryPoints: [join(here, "src", "app.css")], outfile: "app.css" });
const files = { "app.js": js.outputFiles[0].contents, "app.css": css.outputFiles[0].contents };
const sri = (b) => `sha384-${createHash("sha384").update(b).digest("base64")}`;
const html = readFileSync(join(here, "src", "index.html"), "utf8")
  .replace("%%JS_INTEGRITY%%", sri(files["app.js"]))
  .replace("%%CSS_INTEGRITY%%", sri(files["app.css"]));
files["index.html"] = Buffer.from(html, "utf8");

// The manifest's bytes are canonical JSON (sorted keys, no whitespace): their SHA-256 is the
// `ui_sha256` claim.
const manifest = { files: {}, version: 1 };
for (const name of Object.keys(files).sort()) {
  manifest.files[name] = { integrity: sri(files[name]), sha256: createHash("sha256").update(files[name]).digest("hex"), size: files[name].length };
}
const canon = (v) => (v && typeof v === "object"
  ? `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${canon(v[k])}`).join(",")}}`
  : JSON.stringify(v));
files["manifest.json"] = Buffer.from(canon(manifest), "ascii");
for (const [name, bytes] of Object.entries(files)) writeFileSync(join(out, name), bytes);
console.log(`built ${Object.keys(files).join(", ")} into ${out}`);
