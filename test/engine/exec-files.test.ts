import { createHash, randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { AgentError } from "../../src/vmm/agent-client.ts";
import { PTY_FRAME, PtyFrameDecoder } from "../../src/vmm/pty-frames.ts";
import { useEngine } from "../support/engine-fixture.ts";

const ctx = await useEngine();

describe("exec", () => {
  it("runs argv and shell commands and reports exit codes, env, cwd and stdin", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    const echo = await vm.agent.exec({ command: ["echo", "hello", "world"] });
    expect(echo).toMatchObject({ exitCode: 0, stdout: "hello world\n", stderr: "" });

    const failing = await vm.agent.exec({ command: "echo oops >&2; exit 3" });
    expect(failing).toMatchObject({ exitCode: 3, stderr: "oops\n" });

    const env = await vm.agent.exec({ command: "echo $GREETING from $(pwd)", env: { GREETING: "hi" }, cwd: "/tmp" });
    expect(env.stdout).toBe("hi from /tmp\n");

    const stdin = await vm.agent.exec({ command: ["sha256sum"], stdin: "abc" });
    expect(stdin.stdout).toContain(createHash("sha256").update("abc").digest("hex"));

    const killed = await vm.agent.exec({ command: "sleep 30", timeoutMs: 500 });
    expect(killed).toMatchObject({ timedOut: true, exitCode: 137, signal: "SIGKILL" });
  });

  it("streams output before the command ends", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    const events: string[] = [];
    for await (const ev of vm.agent.execStream({ command: "echo one; sleep 0.3; echo two" })) {
      if (ev.type === "stdout") events.push(ev.data.toString().trim());
      if (ev.type === "exit") events.push(`exit ${ev.exitCode}`);
    }
    expect(events).toEqual(["one", "two", "exit 0"]);
  });

  it("refuses a command that does not exist with a clear error", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    const err = await vm.agent.exec({ command: ["no-such-command", "--flag"] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AgentError);
    expect(err).toMatchObject({ status: 400, code: "CommandNotFound" });
    expect((err as Error).message).toContain("no-such-command");
  });
});

describe("files", () => {
  it("uploads and downloads a 20 MiB file intact", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    const data = randomBytes(20 * 1024 * 1024);
    const digest = createHash("sha256").update(data).digest("hex");
    await vm.agent.writeFile("/root/upload/big.bin", data);

    const inGuest = await vm.agent.exec({ command: ["sha256sum", "/root/upload/big.bin"] });
    expect(inGuest.stdout.split(" ")[0]).toBe(digest);

    const res = await vm.agent.readFile("/root/upload/big.bin");
    const hash = createHash("sha256");
    for await (const chunk of res) hash.update(chunk as Buffer);
    expect(hash.digest("hex")).toBe(digest);
  });

  it("lists, stats, makes directories and removes", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    await vm.agent.mkdir("/srv/a/b");
    await vm.agent.writeFile("/srv/a/b/note.txt", Buffer.from("note"), { mode: "0600" });
    expect((await vm.agent.list("/srv/a/b")).map((e) => e.name)).toEqual(["note.txt"]);
    expect(await vm.agent.stat("/srv/a/b/note.txt")).toMatchObject({ type: "file", size: 4, mode: "0600" });
    await vm.agent.remove("/srv/a", true);
    await expect(vm.agent.stat("/srv/a")).rejects.toMatchObject({ status: 404, code: "NotFound" });
  });
});

describe("terminal", () => {
  it("runs a shell on a PTY and reports its exit code", async () => {
    const vm = await ctx.engine.launch(ctx.snapshot);
    const socket = await vm.agent.pty({ cmd: "echo on-a-tty:$(tty); exit 3", cols: 80, rows: 24 });
    const decoder = new PtyFrameDecoder();
    let output = "";
    const exitCode = await new Promise<number>((resolve, reject) => {
      socket.on("data", (chunk: Buffer) => {
        for (const frame of decoder.push(chunk)) {
          if (frame.type === PTY_FRAME.data) output += frame.payload.toString();
          if (frame.type === PTY_FRAME.exit) resolve(frame.payload.readInt32BE(0));
        }
      });
      socket.on("error", reject);
    });
    socket.destroy();
    expect(exitCode).toBe(3);
    expect(output).toMatch(/on-a-tty:\/dev\/pts\/\d+/);
  });
});
