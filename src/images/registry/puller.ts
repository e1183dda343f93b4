import { createHash } from "node:crypto";
import { chmod, copyFile, mkdir, mkdtemp, readdir, readFile, rename, rm, stat, symlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { cachedAsset } from "../../util/asset-cache.ts";
import { KeyedMutex } from "../../util/keyed-mutex.ts";
import { CommandFailedError, isAlive, run } from "../../util/process.ts";
import type { ImageConfig } from "../dockerfile.ts";
import { ext4DiskFromTree } from "../ext4-disk.ts";
import { configFromOci } from "./config.ts";
import type { AuthFile } from "./credentials.ts";
import type { RegistryEgress } from "./egress.ts";
import { checkLayer, HostileLayerError, unreadableLayerType, type LayerTally, type PullLimits } from "./layers.ts";
import { hostPlatform, parseManifest, selectPlatform, type ImageManifest } from "./manifest.ts";
import { formatReference, pinned, type ImageReference } from "./reference.ts";

/** A registry image unpacked into a disk, ready to boot or build on. */
export interface PulledImage {
  /** As asked, fully qualified (`docker.io/library/python:3.12`). */
  reference: string;
  /** The platform manifest's digest: what the disk is cached by. */
  digest: string;
  /** qcow2 (ext4), read-only: build disks are overlays on it. */
  disk: string;
  diskGiB: number;
  config: ImageConfig;
}

/** A pull that failed for a reason the user can act on (not found, auth, TLS, limits, hostile layer). */
export class PullError extends Error {
  override name = "PullError";
}

export interface RegistryPullerOpts {
  /** Holds `oci/blobs` (the layer cache, by digest, shared by every image and tenant), `oci/work` and `oci-rootfs/<key>` (disks by manifest digest). */
  assetsDir: string;
  egress: RegistryEgress;
  /** PEM of CA certificates trusted for registries besides the system's (COCOON_REGISTRY_CA_FILE). */
  caFile?: string;
  limits: PullLimits;
}

export interface PullRequest {
  ref: ImageReference;
  /** The tenant's credentials (only theirs). */
  auth: AuthFile;
  /** The build log. */
  log: (line: string) => void;
  signal: AbortSignal;
}

/** Bumped when the way a disk is made from layers changes: every cached disk is rebuilt. */
const ROOTFS_REVISION = 1;
/** The disk a registry image gets: what its files need and a quarter more, at least this much. */
const MIN_DISK_GIB = 4;
const MAX_DISK_GIB = 32;

/**
 * Pulls registry images with skopeo and unpacks them with umoci, rather than
 * a registry client of our own: both are the containers project's tools,
 * packaged by Debian, and already speak every manifest and auth flavour
 * (token auth, Docker Hub, GHCR, manifest lists, OCI and Docker media types).
 *
 * Every pull first fetches the manifest with the tenant's own credentials,
 * so a tenant reaches a cached disk or layer only if the registry lets it
 * read that image; layers are then cached by digest for everyone and disks
 * by manifest digest.
 */
export class RegistryPuller {
  private readonly digests = new KeyedMutex();

  constructor(private readonly opts: RegistryPullerOpts) {}

  private get ociDir(): string {
    return join(this.opts.assetsDir, "oci");
  }

  async pull(req: PullRequest): Promise<PulledImage> {
    const reference = formatReference(req.ref);
    const refused = this.opts.egress.checkHost(req.ref.registry);
    if (refused) throw new PullError(`FROM ${reference}: ${refused}`);
    if (process.getuid?.() !== 0) throw new PullError(`FROM ${reference}: registry images need the server to run as root (layers keep their owners)`);
    const work = await this.workDir();
    try {
      const env = await this.skopeoEnv(work, req.auth);
      req.log(`==> FROM ${reference}: resolving the manifest`);
      let text = await this.skopeo(["inspect", "--raw", ...this.certArgs(work, "inspect"), `docker://${reference}`], env, req, reference);
      let digest = `sha256:${createHash("sha256").update(text).digest("hex")}`;
      let parsed = manifestOf(text, reference);
      if (parsed.kind === "index") {
        const entry = (() => {
          try {
            return selectPlatform(parsed.manifests);
          } catch (err) {
            throw new PullError(`FROM ${reference}: ${(err as Error).message}`);
          }
        })();
        const platformRef = formatReference(pinned(req.ref, entry.digest));
        text = await this.skopeo(["inspect", "--raw", ...this.certArgs(work, "inspect"), `docker://${platformRef}`], env, req, reference);
        digest = `sha256:${createHash("sha256").update(text).digest("hex")}`;
        if (digest !== entry.digest) throw new PullError(`FROM ${reference}: the registry sent a manifest whose digest is not ${entry.digest}`);
        parsed = manifestOf(text, reference);
        if (parsed.kind !== "image") throw new PullError(`FROM ${reference}: a manifest list inside a manifest list`);
      }
      const manifest = parsed.manifest;
      this.checkManifest(manifest, reference);
      const compressed = manifest.layers.reduce((n, l) => n + l.size, 0);
      const { os, architecture } = hostPlatform();
      req.log(`==> FROM ${reference}: ${digest} (${os}/${architecture}), ${manifest.layers.length} layers, ${mib(compressed)} MiB`);
      const dir = await this.digests.run(digest, () =>
        cachedAsset({
          assetsDir: this.opts.assetsDir,
          name: "oci-rootfs",
          inputs: { manifest: digest, os, architecture, revision: ROOTFS_REVISION },
          build: (out) => this.unpack(out, { ...req, reference, digest, manifest, env, work }),
        }),
      );
      const meta = JSON.parse(await readFile(join(dir, "image.json"), "utf8")) as { diskGiB: number; config: ImageConfig };
      return { reference, digest, disk: join(dir, "disk.qcow2"), diskGiB: meta.diskGiB, config: meta.config };
    } catch (err) {
      req.signal.throwIfAborted();
      if (err instanceof PullError) throw err;
      if (err instanceof HostileLayerError) throw new PullError(`FROM ${reference}: ${err.message}`);
      throw err;
    } finally {
      await rm(work, { recursive: true, force: true });
    }
  }

  /** Downloads the layers (shared cache), checks each, unpacks them in order with umoci and makes the ext4 disk. */
  private async unpack(
    out: string,
    job: PullRequest & { reference: string; digest: string; manifest: ImageManifest; env: NodeJS.ProcessEnv; work: string },
  ): Promise<void> {
    const { reference, manifest, work } = job;
    // The unpacked tree lands here while mke2fs reads it: only root may reach its setuid files.
    await chmod(out, 0o700);
    const layout = join(work, "layout");
    const blobs = join(this.ociDir, "blobs");
    await mkdir(blobs, { recursive: true, mode: 0o700 });
    const started = Date.now();
    const progress = setInterval(() => void this.progress(layout, blobs, manifest).then((l) => l && job.log(l)), 3000);
    try {
      await this.skopeo(
        ["copy", ...this.certArgs(work, "copy"), "--dest-shared-blob-dir", blobs, `docker://${formatReference(pinned(job.ref, job.digest))}`, `oci:${layout}:image`],
        job.env,
        job,
        reference,
        (line) => job.log(`skopeo: ${line}`),
      );
    } finally {
      clearInterval(progress);
    }
    const pulledMs = Date.now() - started;
    // skopeo stores the manifest as OCI: its layers are the same blobs.
    const index = JSON.parse(await readFile(join(layout, "index.json"), "utf8")) as { manifests: { digest: string }[] };
    const stored = manifestOf(await readFile(blobPath(blobs, index.manifests[0]!.digest), "utf8"), reference);
    if (stored.kind !== "image") throw new PullError(`FROM ${reference}: the pulled layout holds no image manifest`);
    const configBlob = blobPath(blobs, stored.manifest.config.digest);
    if ((await stat(configBlob)).size > 4 * 2 ** 20) throw new PullError(`FROM ${reference}: the image config is over 4 MiB`);
    let config: ImageConfig;
    try {
      config = configFromOci(JSON.parse(await readFile(configBlob, "utf8")));
    } catch (err) {
      throw new PullError(`FROM ${reference}: ${(err as Error).message}`);
    }
    job.log(`==> FROM ${reference}: checking ${stored.manifest.layers.length} layers before unpacking`);
    const tally: LayerTally = { entries: 0, bytes: 0 };
    for (const [i, layer] of stored.manifest.layers.entries()) {
      job.signal.throwIfAborted();
      await checkLayer(blobPath(blobs, layer.digest), layer.mediaType, layer.size, `${i + 1} (${layer.digest.slice(0, 19)})`, this.opts.limits, tally);
    }
    const diskGiB = Math.max(MIN_DISK_GIB, Math.ceil((tally.bytes * 1.25) / 2 ** 30) + 1);
    if (diskGiB > MAX_DISK_GIB) throw new PullError(`FROM ${reference}: its files need a ${diskGiB} GiB disk; the limit is ${MAX_DISK_GIB} GiB`);
    // umoci reads the layout's blobs: they are the shared cache.
    await rm(join(layout, "blobs"), { recursive: true, force: true });
    await symlink(blobs, join(layout, "blobs"));
    const bundle = join(work, "bundle");
    const unpackStarted = Date.now();
    job.log(`==> FROM ${reference}: unpacking ${tally.entries} entries (${mib(tally.bytes)} MiB) into a ${diskGiB} GiB disk`);
    await ext4DiskFromTree(
      out,
      diskGiB,
      async (tree) => {
        // As root, so files keep their owners; into the work directory (0700: a setuid file there is no use to anyone else on the host).
        await run("umoci", ["unpack", "--image", `${layout}:image`, bundle], { signal: job.signal });
        await rm(tree, { recursive: true });
        await rename(join(bundle, "rootfs"), tree);
        // Mount points the agent uses; mkdir never follows a symlink the image may have put there.
        for (const d of ["dev", "proc", "sys", "tmp", "run"]) await mkdir(join(tree, d)).catch(() => undefined);
      },
      { inodes: tally.entries * 2 },
    );
    await writeFile(join(out, "image.json"), JSON.stringify({ reference, digest: job.digest, diskGiB, bytes: tally.bytes, entries: tally.entries, config }, null, 2));
    const unpackMs = Date.now() - unpackStarted;
    job.log(`==> FROM ${reference}: pulled in ${(pulledMs / 1000).toFixed(1)} s, checked and unpacked in ${(unpackMs / 1000).toFixed(1)} s`);
  }

  private checkManifest(manifest: ImageManifest, reference: string): void {
    const { limits } = this.opts;
    if (manifest.layers.length > limits.maxLayers) throw new PullError(`FROM ${reference}: ${manifest.layers.length} layers; the limit is ${limits.maxLayers}`);
    const compressed = manifest.layers.reduce((n, l) => n + l.size, 0);
    if (compressed > limits.maxCompressedBytes) throw new PullError(`FROM ${reference}: its layers are ${compressed} bytes; the limit is ${limits.maxCompressedBytes}`);
    for (const [i, l] of manifest.layers.entries()) {
      const why = unreadableLayerType(l.mediaType);
      if (why) throw new PullError(`FROM ${reference}: layer ${i + 1} ${why}`);
    }
  }

  /** "pulling: 12.0 of 80.5 MiB" from the blobs in place and skopeo's temporary files. */
  private async progress(layout: string, blobs: string, manifest: ImageManifest): Promise<string | undefined> {
    const total = manifest.layers.reduce((n, l) => n + l.size, 0);
    let done = 0;
    for (const l of manifest.layers) done += await stat(blobPath(blobs, l.digest)).then((s) => s.size, () => 0);
    for (const f of await readdir(layout).catch(() => [] as string[])) if (f.startsWith("oci-put-blob")) done += await stat(join(layout, f)).then((s) => s.size, () => 0);
    return total > 0 ? `pulling: ${mib(Math.min(done, total))} of ${mib(total)} MiB` : undefined;
  }

  /** A fresh 0700 directory for one pull: the auth file, skopeo's home, the layout, the unpacked tree. Named by the server's pid. */
  private async workDir(): Promise<string> {
    const parent = join(this.ociDir, "work");
    await mkdir(parent, { recursive: true, mode: 0o700 });
    return mkdtemp(join(parent, `pull-${process.pid}-`));
  }

  /** Removes what pulls of servers no longer running left (a restart mid-pull): their work directories hold auth files and unpacked trees. */
  async removeStale(): Promise<void> {
    const parent = join(this.ociDir, "work");
    for (const name of await readdir(parent).catch(() => [] as string[])) {
      const pid = Number(/^pull-(\d+)-/.exec(name)?.[1]);
      if (!pid || !isAlive(pid)) await rm(join(parent, name), { recursive: true, force: true });
    }
  }

  /**
   * skopeo sees only this pull's auth file and CA: its home, config and
   * runtime directories are the work directory (not the server's own
   * ~/.docker/config.json), and every connection goes through the egress proxy.
   */
  private async skopeoEnv(work: string, auth: AuthFile): Promise<NodeJS.ProcessEnv> {
    const home = join(work, "home");
    await mkdir(join(home, "tmp"), { recursive: true });
    await writeFile(join(work, "auth.json"), JSON.stringify(auth), { mode: 0o600 });
    if (this.opts.caFile) {
      await mkdir(join(work, "certs"));
      await copyFile(this.opts.caFile, join(work, "certs", "ca.crt"));
    }
    const proxy = await this.opts.egress.proxyUrl();
    return {
      PATH: process.env.PATH,
      HOME: home,
      XDG_RUNTIME_DIR: home,
      XDG_CONFIG_HOME: home,
      TMPDIR: join(home, "tmp"),
      REGISTRY_AUTH_FILE: join(work, "auth.json"),
      HTTPS_PROXY: proxy,
      HTTP_PROXY: proxy,
    };
  }

  private certArgs(work: string, command: "inspect" | "copy"): string[] {
    const auth = command === "copy" ? ["--src-authfile", join(work, "auth.json")] : ["--authfile", join(work, "auth.json")];
    if (!this.opts.caFile) return auth;
    return [...auth, command === "copy" ? "--src-cert-dir" : "--cert-dir", join(work, "certs")];
  }

  private async skopeo(args: string[], env: NodeJS.ProcessEnv, req: PullRequest, reference: string, onLine?: (line: string) => void): Promise<string> {
    let pending = "";
    try {
      return await run("skopeo", args, {
        env,
        signal: req.signal,
        onOutput: onLine
          ? (chunk) => {
              pending += chunk;
              const lines = pending.split("\n");
              pending = lines.pop()!;
              for (const l of lines) if (l.trim()) onLine(l.trim());
            }
          : undefined,
      });
    } catch (err) {
      req.signal.throwIfAborted();
      if (err instanceof CommandFailedError) throw new PullError(`FROM ${reference}: ${skopeoReason(err.stderrTail, req.ref.registry, req.auth)}`);
      throw err;
    }
  }
}

/** skopeo's message (`level=fatal msg="…"`) in words a user can act on. */
export function skopeoReason(stderr: string, registry: string, auth: AuthFile): string {
  const fatal = [...stderr.matchAll(/msg="((?:[^"\\]|\\.)*)"/g)].at(-1)?.[1]?.replace(/\\"/g, '"') ?? stderr.trim().split("\n").at(-1) ?? "";
  const msg = fatal.replace(/^Error parsing image name "[^"]*": /, "").slice(0, 600);
  const credentials = registry in auth.auths;
  if (/unauthorized|authentication required|denied|401|403 Forbidden/i.test(msg) && !/COCOON_REGISTRY_PRIVATE_ALLOW/.test(msg)) {
    return credentials
      ? `registry ${registry} refused the credentials stored for it, or they do not grant this repository (${msg})`
      : `registry ${registry} requires authentication and no credentials are stored for it: add them with PUT /v1/registries/${registry} (${msg})`;
  }
  if (/manifest unknown|name unknown|not found|404/i.test(msg)) return `not found in registry ${registry} (${msg})`;
  if (/x509|certificate/i.test(msg)) return `the TLS certificate of registry ${registry} is not trusted (add its CA with COCOON_REGISTRY_CA_FILE): ${msg}`;
  return msg;
}

function manifestOf(text: string, reference: string): ReturnType<typeof parseManifest> {
  if (text.length > 4 * 2 ** 20) throw new PullError(`FROM ${reference}: the manifest is over 4 MiB`);
  try {
    return parseManifest(text);
  } catch (err) {
    throw new PullError(`FROM ${reference}: ${(err as Error).message}`);
  }
}

function blobPath(blobs: string, digest: string): string {
  const [alg, hex] = digest.split(":");
  if (alg !== "sha256" || !/^[a-f0-9]{64}$/.test(hex ?? "")) throw new PullError(`bad digest ${digest.slice(0, 80)}`);
  return join(blobs, alg, hex!);
}

const mib = (bytes: number) => (bytes / 2 ** 20).toFixed(1);
