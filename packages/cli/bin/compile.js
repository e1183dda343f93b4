// Compiles the CLI and the server (TypeScript) into one ES module bundle with
// esbuild, once per version of their sources, and returns its path. Plain
// Node loads the bundle and its dependencies several times faster than a
// loader hook that sees every module (tsx): a server restarted after a crash
// is serving sooner. npm dependencies stay in node_modules (not bundled).
import { build } from "esbuild";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, readdirSync, rmSync, renameSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "../../..");
const SOURCES = ["src", "packages/cli/src", "packages/sdk/src", "package.json", "package-lock.json"];

/** A stamp of the sources: every file's path, size and modification time. */
function sourceStamp() {
  const hash = createHash("sha256");
  const walk = (path) => {
    const st = statSync(path);
    if (st.isDirectory()) for (const name of readdirSync(path).sort()) walk(join(path, name));
    else hash.update(`${path}\0${st.size}\0${st.mtimeMs}\0`);
  };
  for (const source of SOURCES) walk(join(root, source));
  return hash.digest("hex").slice(0, 16);
}

/** npm dependencies stay in node_modules; the workspace's own packages (@cocoon/*: TypeScript) are compiled in. */
const externalDependencies = {
  name: "external-dependencies",
  setup(b) {
    // Go regular expressions (esbuild's) have no lookahead: bare specifiers are filtered here.
    b.onResolve({ filter: /^[^./]/ }, (args) => (args.path.startsWith("@cocoon/") || args.path === "cocoon/server" || args.path === "cocoon/lease-fence" ? undefined : { path: args.path, external: true }));
  },
};

export async function compile() {
  const cache = join(root, "node_modules/.cache/cocoon");
  const out = join(cache, sourceStamp());
  const entry = join(out, "main.js");
  if (existsSync(entry)) return entry;
  const tmp = `${out}.building-${process.pid}-${randomBytes(4).toString("hex")}`;
  await build({
    entryPoints: { main: join(root, "packages/cli/src/main.ts") },
    outdir: tmp,
    bundle: true,
    splitting: true, // the server is a chunk of its own, loaded by `cocoon server` only
    format: "esm",
    platform: "node",
    target: "node20",
    plugins: [externalDependencies],
    alias: { "cocoon/server": join(root, "src/server/main.ts"), "cocoon/lease-fence": join(root, "src/lifecycle/lease-fence.ts") },
    sourcemap: true,
    logLevel: "error",
  });
  try {
    renameSync(tmp, out);
  } catch (err) {
    // Another process published the same build first.
    rmSync(tmp, { recursive: true, force: true });
    if (!existsSync(entry)) throw err;
  }
  // Keep the cache small: builds of older sources are removed (a process still running one has it loaded).
  for (const name of readdirSync(cache)) {
    if (name !== out.split("/").pop() && !name.includes(".building-")) rmSync(join(cache, name), { recursive: true, force: true });
  }
  return entry;
}
