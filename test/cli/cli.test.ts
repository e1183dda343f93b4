import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { TEST_ROOT } from "../support/paths.ts";
import { CLI_BIN, useServerProcess } from "../support/server-process.ts";

// The `cocoon` CLI as a user runs it (node_modules/.bin/cocoon links the same
// bin), against a real server process; the admin key comes from
// COCOON_DATA_DIR/admin.key.
const server = await useServerProcess();
const work = await mkdtemp(join(TEST_ROOT, "cli-"));
afterAll(() => rm(work, { recursive: true, force: true }));

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cocoon(args: string[], opts: { env?: NodeJS.ProcessEnv; stdin?: string } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI_BIN, ...args], { env: opts.env ?? server.cliEnv, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.stdin.end(opts.stdin ?? "");
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

describe("cocoon CLI against a real server", () => {
  it("creates, lists, execs in, copies files to and from, and removes a VM", async () => {
    const created = await cocoon(["vm", "create", "--json", "-m", "owner=cli-test"]);
    expect(created.stderr).toBe("");
    expect(created.code).toBe(0);
    const vm = JSON.parse(created.stdout) as { microVmId: string; state: string; memoryMiB: number; metadata: Record<string, string> };
    expect(vm).toMatchObject({ state: "RUNNING", metadata: { owner: "cli-test" } });
    const id = vm.microVmId;

    const ls = await cocoon(["vm", "ls"]);
    expect(ls.code).toBe(0);
    expect(ls.stdout.split("\n")[0]).toMatch(/^ID\s+IMAGE\s+STATE\s+VCPUS\s+MEMORY\s+CREATED$/);
    expect(ls.stdout).toMatch(new RegExp(`^${id}\\s+base\\s+RUNNING\\s+1\\s+512 MiB`, "m"));
    const lsJson = JSON.parse((await cocoon(["vm", "ls", "--json"])).stdout) as { microVmId: string }[];
    expect(lsJson.map((v) => v.microVmId)).toContain(id);

    const exit3 = await cocoon(["vm", "exec", id, "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3"]);
    expect(exit3).toEqual({ code: 3, stdout: "to-out\n", stderr: "to-err\n" });
    const withStdin = await cocoon(["vm", "exec", "-i", id, "--", "tr", "a-z", "A-Z"], { stdin: "shout\n" });
    expect(withStdin).toMatchObject({ code: 0, stdout: "SHOUT\n" });

    const local = join(work, "up.txt");
    await writeFile(local, "copied up\n");
    const up = await cocoon(["vm", "cp", local, `${id}:/srv/in/`]);
    expect(up.code).toBe(0);
    expect(up.stderr).toContain(`${id}:/srv/in/up.txt`);
    expect((await cocoon(["vm", "exec", id, "--", "cat /srv/in/up.txt"])).stdout).toBe("copied up\n");
    const down = await cocoon(["vm", "cp", `${id}:/srv/in/up.txt`, join(work, "down.txt")]);
    expect(down.code).toBe(0);
    expect(await readFile(join(work, "down.txt"), "utf8")).toBe("copied up\n");
    expect((await cocoon(["vm", "cp", `${id}:/srv/in/up.txt`, "-"])).stdout).toBe("copied up\n");
    const noSuchFile = await cocoon(["vm", "cp", `${id}:/srv/nope`, join(work, "x")]);
    expect(noSuchFile.code).toBe(1);
    expect(noSuchFile.stderr).toMatch(/^cocoon: .*nope/);

    await cocoon(["vm", "exec", id, "--", "echo cli-console-line > /dev/console"]);
    const logs = await cocoon(["vm", "logs", id]);
    expect(logs.code).toBe(0);
    expect(logs.stdout).toContain("cli-console-line");

    const shell = await cocoon(["vm", "shell", id], { stdin: "echo from-shell-$((40+2))\nexit 5\n" });
    expect(shell.stdout).toContain("from-shell-42");
    expect(shell.code).toBe(5);

    const forked = await cocoon(["vm", "fork", id, "-n", "1"]);
    expect(forked.code, forked.stderr).toBe(0);
    const child = forked.stdout.trim().split(" ")[0]!;
    expect(forked.stdout).toMatch(/^vm-[0-9a-f]+ RUNNING\n$/);
    expect((await cocoon(["vm", "exec", child, "--", "cat /srv/in/up.txt"])).stdout).toBe("copied up\n");
    expect((await cocoon(["vm", "rm", child])).code).toBe(0);
    const snap = await cocoon(["vm", "snapshot", id, "cli-snap"]);
    expect(snap.code, snap.stderr).toBe(0);
    expect(snap.stdout).toMatch(/^img-[0-9a-f]+ cli-snap version 1 READY \(/);

    const rm1 = await cocoon(["vm", "rm", id]);
    expect(rm1).toMatchObject({ code: 0, stdout: `${id}\n` });
    expect((await cocoon(["vm", "ls"])).stdout).not.toContain(id);
    expect((await cocoon(["vm", "ls", "--all"])).stdout).toMatch(new RegExp(`^${id}\\s+base\\s+TERMINATED`, "m"));
  });

  it("creates, lists and removes volumes, and attaches one at vm create", async () => {
    const created = await cocoon(["volume", "create", "cli-vol", "--size", "1", "--json"]);
    expect(created.code, created.stderr).toBe(0);
    expect(JSON.parse(created.stdout)).toMatchObject({ name: "cli-vol", sizeGiB: 1, state: "AVAILABLE" });
    const vm = await cocoon(["vm", "create", "--json", "--volume", "cli-vol:/data"]);
    expect(vm.code, vm.stderr).toBe(0);
    const id = (JSON.parse(vm.stdout) as { microVmId: string }).microVmId;
    expect((await cocoon(["vm", "exec", id, "--", "echo kept > /data/f && cat /data/f"])).stdout).toBe("kept\n");
    const ls = await cocoon(["volume", "ls"]);
    expect(ls.stdout.split("\n")[0]).toMatch(/^ID\s+NAME\s+SIZE\s+STATE\s+ATTACHED TO\s+CREATED$/);
    expect(ls.stdout).toMatch(new RegExp(`^vol-[0-9a-f]+\\s+cli-vol\\s+1 GiB\\s+ATTACHED\\s+${id}`, "m"));
    const busy = await cocoon(["volume", "rm", "cli-vol"]);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toMatch(/^cocoon: .*cli-vol is attached/);
    expect((await cocoon(["vm", "create", "--volume", "cli-vol"])).stderr).toContain("NAME:PATH");
    expect((await cocoon(["vm", "rm", id])).code).toBe(0);
    expect((await cocoon(["volume", "get", "cli-vol"])).stdout).toMatch(/^state:\s+AVAILABLE$/m);
    expect(await cocoon(["volume", "rm", "cli-vol"])).toMatchObject({ code: 0, stdout: expect.stringMatching(/^vol-[0-9a-f]+ cli-vol deleted\n$/) });
  });

  it("prints API errors as one line and exits 1", async () => {
    const missing = await cocoon(["vm", "get", "vm-nope"]);
    expect(missing.code).toBe(1);
    expect(missing.stdout).toBe("");
    expect(missing.stderr).toMatch(/^cocoon: .*vm-nope.*\n$/);
    const invalid = await cocoon(["vm", "create", "--memory", "64"]);
    expect(invalid.code).toBe(1);
    expect(invalid.stderr).toMatch(/^cocoon: .*memoryMiB/);
    const noKey = await cocoon(["vm", "ls"], { env: { ...server.cliEnv, COCOON_DATA_DIR: work } });
    expect(noKey.code).toBe(1);
    expect(noKey.stderr).toContain("COCOON_API_KEY");
    const rmMissing = await cocoon(["vm", "rm", "vm-nope"]);
    expect(rmMissing).toMatchObject({ code: 1, stderr: "cocoon: no such microVM: vm-nope\n" });
  });

  it("creates a tenant and a key that works, lists and revokes it", async () => {
    expect((await cocoon(["tenant", "create", "cli-team"])).code).toBe(0);
    const created = await cocoon(["key", "create", "--json", "--tenant", "cli-team", "-p", "microvm:read", "--description", "ci"]);
    expect(created.code).toBe(0);
    const key = JSON.parse(created.stdout) as { keyId: string; apiKey: string; permissions: string[] };
    expect(key.permissions).toEqual(["microvm:read"]);

    // The new key sees its own (empty) tenant, and may not create.
    const asTenant = await cocoon(["vm", "ls", "--json", "--api-key", key.apiKey]);
    expect(asTenant).toMatchObject({ code: 0, stdout: "[]\n" });
    const forbidden = await cocoon(["vm", "create", "--api-key", key.apiKey]);
    expect(forbidden.code).toBe(1);
    expect(forbidden.stderr).toContain("microvm:create");

    expect((await cocoon(["key", "ls"])).stdout).toMatch(new RegExp(`^${key.keyId}\\s+\\S+\\s+microvm:read`, "m"));
    expect(await cocoon(["key", "rm", key.keyId])).toMatchObject({ code: 0, stdout: `${key.keyId}\n` });
    const revoked = await cocoon(["vm", "ls", "--api-key", key.apiKey]);
    expect(revoked.code).toBe(1);
    expect(revoked.stderr).toContain("revoked");
  });
});
