import { spawn } from "node:child_process";
import { describe, expect, it } from "vitest";
import { resolveServerConfig } from "../../src/server/config.ts";
import { KeyedMutex } from "../../src/util/keyed-mutex.ts";
import { isAlive } from "../../src/util/process.ts";
import { buildCpio } from "../../src/vmm/guest/cpio.ts";
import { isQemuNamed, killQemuNamed } from "../../src/vmm/machine.ts";
import { qemuInstallFromEnv } from "../../src/vmm/qemu.ts";

describe("resolveServerConfig", () => {
  it("defaults to 127.0.0.1:7070 and ~/.cocoon", () => {
    const c = resolveServerConfig({});
    expect([c.listenHost, c.listenPort]).toEqual(["127.0.0.1", 7070]);
    expect(c.dataDir).toMatch(/\.cocoon$/);
    expect(c.assetsDir).toBe(`${c.dataDir}/assets`);
  });

  it("reads overcommit and pool sizes from the environment and names a bad one", () => {
    process.env.COCOON_VCPU_OVERCOMMIT = "2.5";
    expect(resolveServerConfig({}).vcpuOvercommit).toBe(2.5);
    process.env.COCOON_VCPU_OVERCOMMIT = "lots";
    expect(() => resolveServerConfig({})).toThrow('COCOON_VCPU_OVERCOMMIT must be a number between 0.1 and 1024, got "lots"');
    delete process.env.COCOON_VCPU_OVERCOMMIT;
    process.env.COCOON_WARM_POOL = "1.5";
    expect(() => resolveServerConfig({})).toThrow("COCOON_WARM_POOL must be an integer between 0 and 16");
    delete process.env.COCOON_WARM_POOL;
  });

  it.each(["7070", "host:", "h:0", "h:70000"])("rejects --listen %s", (listen) => {
    expect(() => resolveServerConfig({ listen })).toThrow("--listen must be HOST:PORT");
  });
});

describe("qemuInstallFromEnv", () => {
  it("runs Debian's QEMU from PATH by default, another build under /usr with its own firmware when asked", () => {
    expect(qemuInstallFromEnv({})).toEqual({ system: "qemu-system-x86_64", img: "qemu-img" });
    expect(qemuInstallFromEnv({ COCOON_QEMU_PREFIX: "/usr/local/lib/qemu10/usr" })).toEqual({
      system: "/usr/local/lib/qemu10/usr/bin/qemu-system-x86_64",
      img: "/usr/local/lib/qemu10/usr/bin/qemu-img",
      dataDir: "/usr/local/lib/qemu10/usr/share/qemu",
    });
  });

  it("refuses a prefix outside /usr (the jail mounts /usr only) or with relative parts, naming the variable", () => {
    for (const bad of ["/opt/qemu", "usr/local", "/usr/../opt", "/usr/local/./q", "/usr/local/q;x", "/usr"]) {
      expect(() => qemuInstallFromEnv({ COCOON_QEMU_PREFIX: bad })).toThrow("COCOON_QEMU_PREFIX must be");
    }
  });
});

describe("KeyedMutex", () => {
  it("serializes work per key and runs different keys concurrently", async () => {
    const mutex = new KeyedMutex();
    const log: string[] = [];
    const step = (key: string, name: string, ms: number) =>
      mutex.run(key, async () => {
        log.push(`start ${name}`);
        await new Promise((r) => setTimeout(r, ms));
        log.push(`end ${name}`);
      });
    await Promise.all([step("a", "a1", 30), step("a", "a2", 1), step("b", "b1", 1)]);
    expect(log.indexOf("end a1")).toBeLessThan(log.indexOf("start a2"));
    expect(log.indexOf("start b1")).toBeLessThan(log.indexOf("end a1"));
  });

  it("keeps going after a failed operation", async () => {
    const mutex = new KeyedMutex();
    await expect(mutex.run("a", async () => Promise.reject(new Error("boom")))).rejects.toThrow("boom");
    expect(await mutex.run("a", async () => 42)).toBe(42);
  });
});

describe("buildCpio", () => {
  it("writes newc headers, 4-byte alignment and the trailer", () => {
    const archive = buildCpio([
      { kind: "dir", path: "/etc" },
      { kind: "file", path: "etc/x", data: Buffer.from("abc"), mode: 0o600 },
      { kind: "chardev", path: "dev/console", major: 5, minor: 1 },
    ]);
    const text = archive.toString("latin1");
    expect(text.startsWith("070701")).toBe(true);
    expect(archive.length % 4).toBe(0);
    expect(text).toContain("etc/x\0");
    expect(text).toContain("abc");
    expect(text).toContain("TRAILER!!!\0");
    // mode of etc/x: regular file 0100600, in the second header
    const second = text.indexOf("070701", 6);
    expect(text.slice(second + 14, second + 22)).toBe((0o100600).toString(16).padStart(8, "0"));
  });
});

describe("killQemuNamed", () => {
  it("leaves alone a recorded pid that now belongs to another process", async () => {
    const other = spawn("sleep", ["30"], { stdio: "ignore" });
    try {
      expect(isQemuNamed(other.pid!, "vm-gone")).toBe(false);
      await killQemuNamed("vm-gone", other.pid);
      expect(isAlive(other.pid!)).toBe(true);
    } finally {
      other.kill("SIGKILL");
    }
  });

  it("kills a process named as a VM's QEMU, found by its name when no pid was recorded", async () => {
    // A stand-in called qemu-system-x86_64 with QEMU's -name argument (node ignores arguments after its script).
    const fake = spawn("bash", ["-c", 'exec -a qemu-system-x86_64 "$0" -e "setTimeout(() => {}, 30000)" -- -name vm-found,process=cocoon-vm-found', process.execPath], { stdio: "ignore" });
    await new Promise((r) => setTimeout(r, 100));
    expect(isQemuNamed(fake.pid!, "vm-found")).toBe(true);
    await killQemuNamed("vm-found");
    expect(isAlive(fake.pid!)).toBe(false);
  });
});
