import { join } from "node:path";
import { cachedAsset, type ProgressLog } from "../../util/asset-cache.ts";
import { sha256Tree } from "../../util/files.ts";
import { run } from "../../util/process.ts";
import { REPO_ROOT } from "../../util/repo-root.ts";

/** Source of cocoon-agent (Go, standard library only). */
export const AGENT_SOURCE_DIR = join(REPO_ROOT, "agent");

/**
 * The Go toolchain that builds it: Debian's bookworm-backports Go 1.23
 * (scripts/setup.sh), beside bookworm's own 1.19, which has no
 * `SysProcAttr.CgroupFD` (the agent starts children inside their cgroup).
 */
export const GO = "/usr/lib/go-1.23/bin/go";

/** Builds the static cocoon-agent binary; rebuilt when its sources or the Go toolchain change. */
export async function prepareAgent(assetsDir: string, log?: ProgressLog): Promise<string> {
  const goVersion = (await run(GO, ["version"])).trim();
  const sourceDigest = await sha256Tree(AGENT_SOURCE_DIR, (name) => name.endsWith(".go") || name === "go.mod");
  const dir = await cachedAsset({
    assetsDir,
    name: "agent",
    inputs: { goVersion, sourceDigest },
    log,
    build: async (out) => {
      await run(GO, ["build", "-trimpath", "-ldflags", "-s -w", "-o", join(out, "cocoon-agent"), "."], {
        cwd: AGENT_SOURCE_DIR,
        env: { ...process.env, CGO_ENABLED: "0", GOCACHE: join(assetsDir, ".gocache") },
      });
    },
  });
  return join(dir, "cocoon-agent");
}
