import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TEST_ROOT } from "../support/paths.ts";
import { useServerProcess } from "../support/server-process.ts";

// The Python SDK (packages/python-sdk) as its README installs it — offline, into
// a virtual environment of Debian's python3 — and its pytest suite run against
// a real `cocoon server` with real VMs.
const server = await useServerProcess();
const work = await mkdtemp(join(TEST_ROOT, "py-"));
const venv = join(work, "venv");
/** Removes what setuptools leaves in the source folder, so that no install packages a stale copy. */
async function removeBuildLeftovers(): Promise<void> {
  for (const left of ["build", "cocoon.egg-info"]) await rm(join("packages/python-sdk", left), { recursive: true, force: true });
}
afterAll(async () => {
  await rm(work, { recursive: true, force: true });
  await removeBuildLeftovers();
});

interface Run {
  code: number | null;
  output: string;
}

/** Runs a command to its end (killed after `timeoutMs`), stdout and stderr together. */
function run(command: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs: number): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    let output = "";
    child.stdout.on("data", (d: Buffer) => (output += d.toString()));
    child.stderr.on("data", (d: Buffer) => (output += d.toString()));
    const timer = setTimeout(() => {
      output += `\n[killed after ${timeoutMs} ms]`;
      child.kill("SIGKILL");
    }, timeoutMs);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, output });
    });
  });
}

// No index and no local wheel directories: what pip needs must already be on the machine.
const { PIP_FIND_LINKS: _links, PIP_INDEX_URL: _index, PIP_EXTRA_INDEX_URL: _extra, ...baseEnv } = process.env;
const offlineEnv = { ...baseEnv, PIP_CONFIG_FILE: "/dev/null", PIP_NO_INDEX: "1", PYTHONDONTWRITEBYTECODE: "1" };

describe("the Python SDK against a real server", () => {
  it("installs offline with pip as packages/python-sdk/README.md says", async () => {
    const created = await run("/usr/bin/python3", ["-m", "venv", "--system-site-packages", venv], offlineEnv, 60_000);
    expect(created.output).toBe("");
    expect(created.code).toBe(0);
    await removeBuildLeftovers();
    const installed = await run(join(venv, "bin/pip"), ["install", "--no-build-isolation", "./packages/python-sdk"], offlineEnv, 120_000);
    if (installed.code !== 0) process.stderr.write(installed.output);
    expect(installed.code).toBe(0);
    const where = await run(join(venv, "bin/python"), ["-c", "import cocoon; print(cocoon.__file__)"], offlineEnv, 30_000);
    expect(where.output.trim()).toMatch(new RegExp(`^${venv}/lib/python3\\.\\d+/site-packages/cocoon/__init__\\.py$`));
  });

  it("passes its pytest suite (sync and asyncio clients, real VMs, an image build)", async () => {
    // Run from the checkout's root, so `import cocoon` finds the installed package, not the source folder.
    const env = { ...offlineEnv, COCOON_URL: server.url, COCOON_API_KEY: server.adminKey };
    const tests = await run(join(venv, "bin/python"), ["-m", "pytest", "packages/python-sdk/tests", "-q", "-p", "no:cacheprovider"], env, 280_000);
    if (tests.code !== 0) process.stderr.write(`pytest output:\n${tests.output}\n`);
    expect(tests.code).toBe(0);
    expect(tests.output).toMatch(/\d+ passed/);
  }, 300_000);
});
