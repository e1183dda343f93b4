import { statSync } from "node:fs";
import { copyFile, mkdir, mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { cachedAsset, type ProgressLog } from "../../util/asset-cache.ts";
import { writeFileAtomic } from "../../util/files.ts";
import { run } from "../../util/process.ts";

/**
 * Virtio drivers are modules in Debian's cloud kernel; the initramfs loads
 * them in this order (each depends on the ones before it).
 */
export const VIRTIO_MODULES = [
  "virtio_ring",
  "virtio",
  "virtio_mmio",
  "virtio_blk",
  "virtio_console",
  "failover",
  "net_failover",
  "virtio_net",
] as const;

export interface GuestKernel {
  /** Directory of this kernel version. */
  dir: string;
  vmlinuz: string;
  /** `<dir>/modules/<name>.ko` for each of VIRTIO_MODULES. */
  modulesDir: string;
  release: string;
}

const KERNEL_METAPACKAGE = "linux-image-cloud-amd64";

/** The versioned package the metapackage points at, e.g. linux-image-6.1.0-56-cloud-amd64 6.1.192-2. */
async function resolveKernelPackage(): Promise<{ name: string; version: string }> {
  const depends = await run("apt-cache", ["depends", KERNEL_METAPACKAGE]);
  const name = /Depends: (linux-image-\S+)/.exec(depends)?.[1];
  if (!name) {
    throw new Error(`cannot resolve ${KERNEL_METAPACKAGE}: run 'apt-get update' first (apt-cache knows no such package)`);
  }
  const policy = await run("apt-cache", ["policy", name]);
  const version = /Candidate: (\S+)/.exec(policy)?.[1];
  if (!version || version === "(none)") throw new Error(`no installable version of ${name}`);
  return { name, version };
}

/**
 * `resolveKernelPackage`, remembered in `<assetsDir>/kernel/resolved.json`
 * while apt's package lists are unchanged (their newest modification time):
 * the answer changes only with `apt-get update`, and asking apt takes a
 * noticeable part of a server start (a restart after a crash waits on it).
 */
async function resolveKernelPackageCached(assetsDir: string): Promise<{ name: string; version: string }> {
  const lists = "/var/lib/apt/lists";
  const listsStamp = String(Math.max(0, ...(await readdir(lists).catch(() => [] as string[])).filter((f) => f.endsWith("_Packages")).map((f) => statSync(join(lists, f)).mtimeMs)));
  const path = join(assetsDir, "kernel", "resolved.json");
  const cached = await readFile(path, "utf8").then((t) => JSON.parse(t) as { listsStamp: string; name: string; version: string }, () => undefined);
  if (cached?.listsStamp === listsStamp) return { name: cached.name, version: cached.version };
  const pkg = await resolveKernelPackage();
  await mkdir(dirname(path), { recursive: true });
  await writeFileAtomic(path, JSON.stringify({ listsStamp, ...pkg }));
  return pkg;
}

/** Fetches Debian's cloud kernel (cached by package version) with the virtio modules. */
export async function prepareKernel(assetsDir: string, log?: ProgressLog): Promise<GuestKernel> {
  const pkg = await resolveKernelPackageCached(assetsDir);
  const release = pkg.name.replace(/^linux-image-/, "");
  const dir = await cachedAsset({
    assetsDir,
    name: "kernel",
    inputs: { package: pkg.name, version: pkg.version, modules: VIRTIO_MODULES },
    log,
    build: async (out) => {
      const work = await mkdtemp(join(tmpdir(), "cocoon-kernel-"));
      try {
        log?.(`downloading ${pkg.name} ${pkg.version}`);
        await run("apt-get", ["download", `${pkg.name}=${pkg.version}`], { cwd: work });
        const deb = (await readdir(work)).find((f) => f.endsWith(".deb"));
        if (!deb) throw new Error(`apt-get download produced no .deb for ${pkg.name}`);
        await run("dpkg-deb", ["-x", join(work, deb), join(work, "root")]);
        await copyFile(join(work, "root/boot", `vmlinuz-${release}`), join(out, "vmlinuz"));
        const moduleFiles = await run("find", [join(work, "root/lib/modules"), "-name", "*.ko"]);
        await mkdir(join(out, "modules"));
        for (const mod of VIRTIO_MODULES) {
          const file = moduleFiles.split("\n").find((f) => f.endsWith(`/${mod}.ko`));
          if (!file) throw new Error(`module ${mod}.ko not found in ${pkg.name}`);
          await copyFile(file, join(out, "modules", `${mod}.ko`));
        }
      } finally {
        await rm(work, { recursive: true, force: true });
      }
    },
  });
  return { dir, vmlinuz: join(dir, "vmlinuz"), modulesDir: join(dir, "modules"), release };
}
