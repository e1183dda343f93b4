import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm, rmdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { LeaseFence } from "../../src/lifecycle/lease-fence.ts";
import { isAlive } from "../../src/util/process.ts";
import { Cgroups, detectCgroups } from "../../src/vmm/jail/index.ts";
import { CLI_BIN } from "../support/cocoon-server.ts";
import { TEST_ROOT } from "../support/paths.ts";

/*
 * The lease fence as a real process (`cocoon lease-fence`, started by the
 * server's LeaseFence) against real cgroups, with `sleep` processes standing
 * in for a node's QEMUs (test/server/cluster.test.ts has it end real ones).
 */
const dataDir = await mkdtemp(join(TEST_ROOT, "lease-fence-"));
const cgroupParent = `cocoon-fence-test-${randomBytes(4).toString("hex")}`;
const cgroups = new Cgroups(detectCgroups(), cgroupParent);
const logged: string[] = [];
const fence = new LeaseFence({ dataDir, cgroupParent, log: (line) => logged.push(line) });
const sleepers: ChildProcess[] = [];

/** A process in one of the node's VM cgroups. */
async function guest(): Promise<number> {
  const child = spawn("sleep", ["600"], { stdio: "ignore" });
  sleepers.push(child);
  for (const dir of cgroups.dirs("vm-a")) {
    await mkdir(dir, { recursive: true });
    await writeFile(join(dir, "cgroup.procs"), String(child.pid));
  }
  return child.pid!;
}

const fences = () => {
  try {
    return execFileSync("pgrep", ["-f", `lease-fence --data-dir ${dataDir}`], { encoding: "utf8" }).split("\n").filter(Boolean).map(Number);
  } catch {
    return [];
  }
};
const until = async (what: () => boolean | Promise<boolean>, ms = 5000) => {
  for (const end = Date.now() + ms; !(await what()); await new Promise((r) => setTimeout(r, 50))) if (Date.now() > end) throw new Error("timed out");
};
const fenceLog = () => readFile(join(dataDir, "lease-fence", "fence.log"), "utf8");
const SECOND = 1_000_000_000n;

afterAll(async () => {
  for (const pid of fences()) process.kill(pid, "SIGKILL");
  for (const s of sleepers) s.kill("SIGKILL");
  await new Promise((r) => setTimeout(r, 200));
  for (const dir of [...cgroups.dirs("vm-a"), ...cgroups.dirs("")]) await rmdir(dir).catch(() => undefined);
  await rm(dataDir, { recursive: true, force: true });
});

describe("the lease fence process", () => {
  it("holds the node's guests while the deadline is ahead, kills them (and any that come) past it, holds again at a new one, and exits on a stop order; one per data directory", async () => {
    const first = await guest();
    await fence.renewed(process.hrtime.bigint(), 15);
    await fence.ensure();
    expect(fences()).toHaveLength(1);
    expect(logged.join("\n")).toContain("lease fence started");
    // Found running: not a second one, whether ensure() or a stray start asks.
    await fence.ensure();
    const stray = spawn(process.execPath, [CLI_BIN, "lease-fence", "--data-dir", dataDir, "--cgroup-parent", "elsewhere"], { stdio: ["ignore", "ignore", "pipe"] });
    let strayOutput = "";
    stray.stderr!.on("data", (d: Buffer) => (strayOutput += d.toString()));
    expect(await new Promise((resolve) => stray.once("exit", resolve))).toBe(0);
    expect(strayOutput).toContain("already guards");
    expect(fences()).toHaveLength(1);
    await new Promise((r) => setTimeout(r, 700));
    expect(isAlive(first)).toBe(true);

    // The lease, sent 12.5 s ago, is 0.5 s past its deadline: killed within a check or two.
    await fence.renewed(process.hrtime.bigint() - (25n * SECOND) / 2n, 15);
    await until(() => !isAlive(first), 2000);
    // Any guest that comes meanwhile too.
    const second = await guest();
    await until(() => !isAlive(second), 2000);
    expect(await fenceLog()).toContain(`killed ${first}`);
    expect(await fenceLog()).toContain(`killed ${second}`);

    // A renewal: held again.
    await fence.renewed(process.hrtime.bigint(), 15);
    await until(async () => (await fenceLog()).includes("a new deadline: holding"), 2000);
    const third = await guest();
    await new Promise((r) => setTimeout(r, 700));
    expect(isAlive(third)).toBe(true);

    // A graceful stop: what is left is ended, and the fence exits.
    const [pid] = fences();
    await fence.release();
    await until(() => !isAlive(third) && !isAlive(pid!), 2000);
    expect(await fenceLog()).toContain("the server stopped: ending what is left");
  });
});
