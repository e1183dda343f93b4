import { randomBytes } from "node:crypto";
import { chmod, chown, mkdir, readdir, readFile, rm, truncate, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { InvalidArgumentError } from "../errors.ts";
import { exists, fsyncFile, writeFileAtomic } from "../util/files.ts";
import { run } from "../util/process.ts";
import { AgentClient } from "./agent-client.ts";
import { buildCpio } from "./guest/cpio.ts";
import { allocateForwards, type HostSide } from "./host.ts";
import type { Machine } from "./machine.ts";
import type { Egress, VmNetworkRecord } from "./network/index.ts";
import { AGENT_PORT, guestCmdline, machinePaths, qemuFeatures, qemuInstall, type Accelerator, type MachineSpec, type PortForward } from "./qemu.ts";
import { ReleaseStack } from "./release-stack.ts";
import { qemuBuild, SNAPSHOT_FORMAT, snapshotFiles, type Snapshot, type SnapshotManifest } from "./snapshot.ts";
import { checkShape, newToken } from "./vm.ts";

/** Kernel and initramfs every VM boots (see vmm/guest). */
export interface GuestBootAssets {
  kernel: string;
  initramfs: string;
}

export interface BootOpts {
  /** Directory that will become the snapshot directory. */
  dir: string;
  /** qcow2 the VM's disk is layered on (copy-on-write; never written). */
  backingDisk: string;
  /**
   * The backing files of `backingDisk`, nearest first: none for a root
   * filesystem the server built, a parent snapshot's `diskBacking` for an
   * image built on another. Never read from a disk header.
   */
  backingChain?: string[];
  vcpus: number;
  memoryMiB: number;
  guestPorts?: number[];
  /** Egress while the template runs (image builds install packages): default "internet". */
  egress?: Egress;
}

/** A cold-booted VM whose memory lives in a shared file: the raw material of a snapshot. */
export interface TemplateVm {
  dir: string;
  machine: Machine;
  agent: AgentClient;
  spec: MachineSpec;
  token: string;
  guestPorts: number[];
  forwards: PortForward[];
  network: VmNetworkRecord;
  uid: number;
  /** Everything it holds on the host, released when it is snapshotted or discarded. */
  resources: ReleaseStack;
  diskBytes: number;
}

/**
 * A running template, on disk while it runs: templates are never adopted (a
 * boot or build cut short by a restart has failed), so this is what a
 * restarted server needs to end what one left on the host.
 */
interface TemplateRecord {
  name: string;
  dir: string;
  uid: number;
  network: VmNetworkRecord;
}

/** Cold boots (templates) and snapshots: what the base image and every image build run. */
export class Templates {
  constructor(
    private readonly config: { dataDir: string; assets: GuestBootAssets; accelerator: Accelerator; bootTimeoutMs?: number; log?: (msg: string) => void },
    private readonly host: HostSide,
  ) {}

  private get recordsDir(): string {
    return join(this.config.dataDir, "templates");
  }

  /**
   * Cold-boots a VM whose RAM is a shared file in `opts.dir`, waits for its
   * agent, and returns it running. A boot that misses the watchdog is killed
   * and retried once (TCG boots occasionally spin before init).
   */
  async boot(opts: BootOpts): Promise<TemplateVm> {
    checkShape(opts);
    if (!(await exists(opts.backingDisk))) throw new InvalidArgumentError("backingDisk", `disk ${opts.backingDisk} does not exist`);
    await mkdir(opts.dir, { recursive: true, mode: 0o700 });
    await chmod(opts.dir, 0o700);
    await mkdir(this.recordsDir, { recursive: true });
    const files = snapshotFiles(opts.dir);
    const backing = [opts.backingDisk, ...(opts.backingChain ?? [])];
    const diskBytes = await qcow2VirtualBytes(opts.backingDisk);
    const timeoutMs = this.config.bootTimeoutMs ?? (this.config.accelerator === "tcg" ? 90_000 : 30_000);
    for (let attempt = 1; ; attempt++) {
      const resources = new ReleaseStack();
      const name = `template-${randomBytes(4).toString("hex")}`;
      const token = newToken();
      const guestPorts = opts.guestPorts ?? [];
      try {
        // -u: the backing file is not opened (its size is known), so no header is followed.
        await rm(files.disk, { force: true });
        await run(qemuInstall().img, ["create", "-q", "-f", "qcow2", "-u", "-b", opts.backingDisk, "-F", "qcow2", files.disk, String(diskBytes)]);
        // The template's QEMU writes its RAM and disk: both belong to its uid until `snapshot`.
        await writeFile(files.memory, "", { mode: 0o600 });
        await truncate(files.memory, opts.memoryMiB * 1024 * 1024);
        const initramfs = await writeSecretInitramfs(this.config.assets.initramfs, join(opts.dir, "initrd"), token);
        const forwards = await allocateForwards([AGENT_PORT, ...guestPorts]);
        const uid = this.host.allocateUid(resources);
        const network = this.host.network.allocate(opts.egress ?? "internet", uid);
        const record: TemplateRecord = { name, dir: opts.dir, uid, network };
        // Written before anything is started: a crash from here on leaves a record `endOrphans` acts on.
        await resources.acquire("template record", () => writeFileAtomic(this.recordPath(name), JSON.stringify(record), 0o600), () => rm(this.recordPath(name), { force: true }));
        await this.host.prepareFiles(uid, [files.disk, files.memory]);
        const spec: MachineSpec = {
          vmDir: opts.dir,
          name,
          accelerator: this.config.accelerator,
          vcpus: opts.vcpus,
          memoryMiB: opts.memoryMiB,
          memory: { kind: "file", path: files.memory, shared: true },
          kernel: this.config.assets.kernel,
          initramfs,
          cmdline: guestCmdline({ accelerator: this.config.accelerator, hostname: "cocoon" }),
          disk: { path: files.disk, backing },
          forwards,
        };
        const machine = await this.host.startProcess(spec, network, uid, resources);
        const agent = new AgentClient(forwards[0]!.hostPort, token);
        resources.push("agent connections", async () => agent.close());
        await agent.waitReady(timeoutMs);
        return { dir: opts.dir, machine, agent, spec, token, guestPorts, forwards: forwards.slice(1), network, uid, resources, diskBytes };
      } catch (err) {
        await resources.release();
        const console = await readFile(machinePaths(opts.dir).console, "utf8").catch(() => "");
        if (attempt >= 2) throw new Error(`cold boot failed twice: ${(err as Error).message}; console: ${console.slice(-1500)}`, { cause: err });
        this.config.log?.(`cold boot attempt ${attempt} failed (${(err as Error).message}); retrying`);
      }
    }
  }

  /**
   * Freezes a running template into a snapshot: flushes the guest's disk,
   * pauses it, writes the device state, ends the process and hands the files
   * back to root. The manifest is written last.
   *
   * Clones map the memory file privately (copy-on-write) and run as uids of
   * their own. A QEMU with `readonly=on,rom=off` (QemuFeatures.readOnlyPrivateMapping)
   * opens it read-only: mode 0444, mounted read-only in the jail. QEMU 7.2
   * opens it read-write even so: mode 0666. Either way the snapshot directory
   * is not reachable by VM uids on the host, and inside a jail only the
   * clone's own image's files are mounted (SECURITY.md).
   */
  async snapshot(template: TemplateVm): Promise<Snapshot> {
    const files = snapshotFiles(template.dir);
    try {
      await template.agent.sync();
      await template.machine.save(files.state);
    } finally {
      await template.resources.release();
    }
    // The memory file is the snapshot's RAM: it must be on disk before anyone maps it.
    await fsyncFile(files.memory);
    await fsyncFile(files.disk);
    for (const p of [files.memory, files.disk]) await chown(p, 0, 0);
    await chmod(files.memory, qemuFeatures().readOnlyPrivateMapping ? 0o444 : 0o666);
    await chmod(files.disk, 0o444);
    await rm(join(template.dir, "initrd"), { force: true });
    const manifest: SnapshotManifest = {
      formatVersion: SNAPSHOT_FORMAT,
      createdAt: new Date().toISOString(),
      accelerator: template.spec.accelerator,
      qemuBuild: qemuBuild(),
      vcpus: template.spec.vcpus,
      memoryMiB: template.spec.memoryMiB,
      kernel: template.spec.kernel,
      initramfs: this.config.assets.initramfs,
      cmdline: template.spec.cmdline,
      token: template.token,
      guestPorts: template.guestPorts,
      diskBacking: template.spec.disk.backing,
      diskBytes: template.diskBytes,
    };
    await writeFileAtomic(files.manifest, JSON.stringify(manifest, null, 2), 0o600);
    return { dir: template.dir, manifest };
  }

  /** Ends a template without snapshotting it: its process and everything it held are gone. */
  async discard(template: TemplateVm): Promise<void> {
    await template.resources.release();
  }

  /**
   * Ends the templates an earlier server left running or half set up (it was
   * killed mid-boot or mid-build): their QEMU, their jail and their network,
   * by the same release steps as a template this server started.
   */
  async endOrphans(): Promise<void> {
    await mkdir(this.recordsDir, { recursive: true });
    for (const file of await readdir(this.recordsDir)) {
      const path = join(this.recordsDir, file);
      const resources = new ReleaseStack();
      resources.push("template record", () => rm(path, { force: true }));
      const t = await readFile(path, "utf8").then((text) => JSON.parse(text) as TemplateRecord, () => undefined);
      if (t) this.host.adoptProcess({ name: t.name, vmDir: t.dir, network: t.network }, resources);
      await resources.release();
      this.config.log?.(`ended template VM ${t?.name ?? file} (${t?.dir ?? "record unreadable"}) left by an earlier server`);
    }
  }

  private recordPath(name: string): string {
    return join(this.recordsDir, `${name}.json`);
  }
}

/**
 * The initramfs of one cold boot: the shared one with a second cpio archive
 * appended (the kernel unpacks them in turn) holding the agent's first
 * secret, so the secret is never on a command line (agent/PROTOCOL.md).
 */
async function writeSecretInitramfs(base: string, path: string, token: string): Promise<string> {
  const secret = buildCpio([
    { kind: "dir", path: "etc" },
    { kind: "dir", path: "etc/cocoon" },
    { kind: "file", path: "etc/cocoon/token", data: Buffer.from(`${token}\n`), mode: 0o600 },
  ]);
  await writeFile(path, Buffer.concat([await readFile(base), secret]), { mode: 0o644 });
  return path;
}

/** A qcow2's virtual size; `qemu-img info` reads the header only, never opening a backing file. */
export async function qcow2VirtualBytes(path: string): Promise<number> {
  const info = JSON.parse(await run(qemuInstall().img, ["info", "--output=json", "-U", path])) as { "virtual-size": number };
  return info["virtual-size"];
}

