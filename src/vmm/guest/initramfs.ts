import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { cachedAsset, type ProgressLog } from "../../util/asset-cache.ts";
import { sha256File } from "../../util/files.ts";
import { buildCpio, type CpioEntry } from "./cpio.ts";
import { VIRTIO_MODULES, type GuestKernel } from "./kernel.ts";

/**
 * Builds the initramfs: cocoon-agent as /init, the kernel's virtio modules and
 * the order to load them in. The agent then mounts the image disk and
 * switches root, so the same initramfs boots every image.
 */
export async function prepareInitramfs(
  assetsDir: string,
  kernel: GuestKernel,
  agentBinary: string,
  log?: ProgressLog,
): Promise<string> {
  const dir = await cachedAsset({
    assetsDir,
    name: "initramfs",
    inputs: { kernel: kernel.dir, agent: await sha256File(agentBinary), modules: VIRTIO_MODULES, format: 2 },
    log,
    build: async (out) => {
      const entries: CpioEntry[] = [
        ...["dev", "proc", "sys", "newroot", "etc", "etc/cocoon", "lib", "lib/modules"].map(
          (path): CpioEntry => ({ kind: "dir", path }),
        ),
        // The kernel opens /dev/console for init's stdio before anything is mounted.
        { kind: "chardev", path: "dev/console", major: 5, minor: 1 },
        { kind: "file", path: "init", data: await readFile(agentBinary), mode: 0o755 },
        { kind: "file", path: "etc/cocoon/modules", data: Buffer.from(VIRTIO_MODULES.map((m) => `${m}.ko\n`).join("")) },
      ];
      for (const mod of VIRTIO_MODULES) {
        entries.push({ kind: "file", path: `lib/modules/${mod}.ko`, data: await readFile(join(kernel.modulesDir, `${mod}.ko`)) });
      }
      await writeFile(join(out, "initramfs.cpio"), buildCpio(entries));
    },
  });
  return join(dir, "initramfs.cpio");
}
