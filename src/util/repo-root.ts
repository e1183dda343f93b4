import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/**
 * The Cocoon checkout this code runs from: the nearest directory above this
 * module whose package.json is named "cocoon". Found by walking up, so it is
 * the same whether the module runs from src/ or from the CLI's compiled
 * bundle (packages/cli/bin/compile.js, under node_modules/.cache).
 */
export const REPO_ROOT = findRoot(dirname(fileURLToPath(import.meta.url)));

function findRoot(from: string): string {
  for (let dir = from; ; dir = dirname(dir)) {
    try {
      if ((JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { name?: string }).name === "cocoon") return dir;
    } catch {
      // no package.json here
    }
    if (dirname(dir) === dir) throw new Error(`no Cocoon checkout (package.json named cocoon) above ${from}`);
  }
}
