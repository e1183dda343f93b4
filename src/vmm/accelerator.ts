import { spawn } from "node:child_process";
import { constants } from "node:fs";
import { access, readFile } from "node:fs/promises";
import { join } from "node:path";
import { writeFileAtomic } from "../util/files.ts";
import { qemuInstall, type Accelerator } from "./qemu.ts";

/**
 * Picks KVM only where a guest really runs on it. `/dev/kvm` can exist and
 * still hang every guest (a nested, paravirtual hypervisor: docs/architecture.md), so the
 * probe boots the real kernel under KVM and waits for it to reach init. The
 * answer is cached per host boot and kernel in `<cacheDir>/accelerator.json`.
 * `COCOON_ACCELERATOR=kvm|tcg` overrides the probe.
 */
export async function detectAccelerator(opts: {
  kernel: string;
  initramfs: string;
  cacheDir: string;
  timeoutMs?: number;
  log?: (line: string) => void;
}): Promise<Accelerator> {
  const forced = process.env.COCOON_ACCELERATOR;
  if (forced === "kvm" || forced === "tcg") return forced;
  if (forced) throw new Error(`COCOON_ACCELERATOR must be "kvm" or "tcg", not "${forced}"`);
  try {
    await access("/dev/kvm", constants.R_OK | constants.W_OK);
  } catch {
    return "tcg";
  }
  const bootId = (await readFile("/proc/sys/kernel/random/boot_id", "utf8")).trim();
  const cacheFile = join(opts.cacheDir, "accelerator.json");
  const cached = await readFile(cacheFile, "utf8").then((t) => JSON.parse(t) as { bootId: string; kernel: string; accelerator: Accelerator }, () => undefined);
  if (cached?.bootId === bootId && cached.kernel === opts.kernel) return cached.accelerator;
  opts.log?.("probing KVM with a test boot");
  const accelerator: Accelerator = (await kvmBootsGuest(opts.kernel, opts.initramfs, opts.timeoutMs ?? 8000)) ? "kvm" : "tcg";
  opts.log?.(`accelerator: ${accelerator}`);
  await writeFileAtomic(cacheFile, JSON.stringify({ bootId, kernel: opts.kernel, accelerator }));
  return accelerator;
}

function kvmBootsGuest(kernel: string, initramfs: string, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const qemu = spawn(
      qemuInstall().system,
      [...(qemuInstall().dataDir ? ["-L", qemuInstall().dataDir!] : []), "-M", "microvm", "-bios", "qboot.rom", "-accel", "kvm", "-cpu", "host", "-m", "256M", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", "-serial", "stdio", "-kernel", kernel, "-initrd", initramfs, "-append", "console=ttyS0 panic=-1"],
      { stdio: ["ignore", "pipe", "ignore"] },
    );
    let output = "";
    const finish = (ok: boolean) => {
      clearTimeout(timer);
      qemu.kill("SIGKILL");
      resolve(ok);
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    qemu.stdout.on("data", (d: Buffer) => {
      output += d.toString();
      if (output.includes("Run /init as init process")) finish(true);
    });
    qemu.on("error", () => finish(false));
    qemu.on("close", () => finish(false));
  });
}
