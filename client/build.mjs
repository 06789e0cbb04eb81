// Bundles src/index.ts into the one file the gateway serves, gateway/static/client/index.js,
// with its source map beside it. `node build.mjs [out-dir]` writes elsewhere (the drift test
// builds into a temporary directory): the bytes are the same, because the source map's paths
// are always computed from the committed location.
import { writeFile, mkdir } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const served = resolve(here, "../gateway/static/client");
const outDir = resolve(process.argv[2] ?? served);

const result = await esbuild.build({
  absWorkingDir: here,
  entryPoints: ["src/index.ts"],
  outfile: join(served, "index.js"),
  bundle: true,
  format: "esm",
  target: "es2022",
  // Whitespace and syntax only: identifiers keep their names, so the console's errors and
  // the debugger stay readable without the source map.
  minifyWhitespace: true,
  minifySyntax: true,
  sourcemap: "linked",
  sourcesContent: true,
  write: false,
  logLevel: "warning",
});

await mkdir(outDir, { recursive: true });
for (const file of result.outputFiles) {
  const target = join(outDir, basename(file.path));
  await writeFile(target, file.contents);
  console.log(`client: wrote ${target} (${file.contents.length} bytes)`);
}
