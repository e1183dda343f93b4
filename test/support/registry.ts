import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { get } from "node:https";
import { join } from "node:path";
import { Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { createGzip, gzipSync } from "node:zlib";
import tar from "tar-stream";
import { freeLoopbackPort } from "../../src/util/ports.ts";

/** Debian's docker-registry (distribution v2) on loopback, with TLS from a CA of its own and htpasswd (bcrypt) basic auth. */
export interface TestRegistry {
  /** `127.0.0.1:<port>` */
  host: string;
  /** The CA that signed its certificate (PEM): what COCOON_REGISTRY_CA_FILE names. */
  caFile: string;
  username: string;
  password: string;
  /** Pushes an OCI layout's tag (an image or an index) to `<host>/<repository>`. */
  push(layout: string, tag: string, repository: string): Promise<void>;
  close(): Promise<void>;
}

export async function startRegistry(dir: string): Promise<TestRegistry> {
  await mkdir(join(dir, "certs"), { recursive: true });
  const ssl = (...args: string[]) => execFileSync("openssl", args, { cwd: dir, stdio: "pipe" });
  ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=cocoon test registry CA");
  ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1");
  await writeFile(join(dir, "ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n");
  ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf");
  // skopeo's --dest-cert-dir reads *.crt as extra CAs.
  await writeFile(join(dir, "certs", "ca.crt"), await readFile(join(dir, "ca.crt")));
  const username = "pusher";
  const password = `pw-${Math.random().toString(36).slice(2)}`;
  // docker-registry accepts bcrypt entries only.
  await writeFile(join(dir, "htpasswd"), execFileSync("htpasswd", ["-nbB", username, password]));
  const port = await freeLoopbackPort();
  const host = `127.0.0.1:${port}`;
  await writeFile(
    join(dir, "config.yml"),
    [
      "version: 0.1",
      "log: { level: warn }",
      `storage: { filesystem: { rootdirectory: ${join(dir, "data")} }, delete: { enabled: true } }`,
      "http:",
      `  addr: ${host}`,
      `  tls: { certificate: ${join(dir, "server.crt")}, key: ${join(dir, "server.key")} }`,
      `auth: { htpasswd: { realm: cocoon-test, path: ${join(dir, "htpasswd")} } }`,
      "",
    ].join("\n"),
  );
  const child: ChildProcess = spawn("docker-registry", ["serve", join(dir, "config.yml")], { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const ca = await readFile(join(dir, "ca.crt"));
  for (let i = 0; ; i++) {
    const status = await new Promise<number>((resolve) => {
      get({ host: "127.0.0.1", port, path: "/v2/", ca }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      }).on("error", () => resolve(0));
    });
    if (status === 401) break;
    if (i > 100 || child.exitCode !== null) throw new Error(`docker-registry did not start (status ${status}): ${stderr}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    host,
    caFile: join(dir, "ca.crt"),
    username,
    password,
    async push(layout, tag, repository) {
      await new Promise<void>((resolve, reject) => {
        const p = spawn(
          "skopeo",
          ["copy", "--all", "--quiet", "--dest-cert-dir", join(dir, "certs"), "--dest-creds", `${username}:${password}`, `oci:${layout}:${tag}`, `docker://${host}/${repository}`],
          { stdio: ["ignore", "ignore", "pipe"], env: { ...process.env, HOME: dir } },
        );
        let err = "";
        p.stderr!.on("data", (d: Buffer) => (err += d.toString()));
        p.on("close", (code) => (code === 0 ? resolve() : reject(new Error(`skopeo copy to ${repository}: ${err}`))));
      });
    },
    async close() {
      child.kill("SIGTERM");
      await new Promise((r) => child.once("close", r));
    },
  };
}

/** A tar entry of a test layer: files carry data; whiteouts are plain files named `.wh.<name>`. */
export interface LayerEntry {
  name: string;
  type?: "file" | "directory" | "symlink" | "link" | "character-device" | "block-device";
  data?: string | Buffer;
  linkname?: string;
  mode?: number;
  uid?: number;
  gid?: number;
}

interface Blob {
  digest: string;
  size: number;
}

async function putBlob(layout: string, data: Buffer): Promise<Blob> {
  const hex = createHash("sha256").update(data).digest("hex");
  await mkdir(join(layout, "blobs", "sha256"), { recursive: true });
  await writeFile(join(layout, "blobs", "sha256", hex), data);
  return { digest: `sha256:${hex}`, size: data.length };
}

/** Gzips a tar file into a blob, streaming; returns its diff id (the tar's digest) and the blob. */
async function gzipBlob(layout: string, tarFile: string): Promise<[string, Blob]> {
  const plain = createHash("sha256");
  const packed = createHash("sha256");
  const tmp = join(layout, "blobs", `tmp-${process.pid}`);
  let size = 0;
  await pipeline(
    createReadStream(tarFile).on("data", (c) => plain.update(c as Buffer)),
    createGzip(),
    new Transform({
      transform(chunk: Buffer, _e, done) {
        packed.update(chunk);
        size += chunk.length;
        done(null, chunk);
      },
    }),
    createWriteStream(tmp),
  );
  const hex = packed.digest("hex");
  await rename(tmp, join(layout, "blobs", "sha256", hex));
  return [`sha256:${plain.digest("hex")}`, { digest: `sha256:${hex}`, size }];
}

async function tarOf(entries: LayerEntry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = new Promise<void>((resolve, reject) => {
    pack.on("data", (c) => chunks.push(c as Buffer));
    pack.on("end", resolve);
    pack.on("error", reject);
  });
  for (const e of entries) {
    const type = e.type ?? "file";
    const header = { name: e.name, type, mode: e.mode ?? (type === "directory" ? 0o755 : 0o644), uid: e.uid ?? 0, gid: e.gid ?? 0, linkname: e.linkname, mtime: new Date(0) };
    await new Promise<void>((resolve, reject) => pack.entry(header, type === "file" ? (e.data ?? "") : "", (err) => (err ? reject(err) : resolve())));
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

/**
 * Writes an OCI image (gzip layers, a config with `config`, a manifest) into
 * an OCI layout under `tag`; returns the manifest's descriptor. A layer is a
 * list of entries, or the path of a tar file (gzipped as it is streamed).
 */
export async function writeOciImage(
  layout: string,
  tag: string | undefined,
  image: { layers: (LayerEntry[] | string)[]; config?: Record<string, unknown>; architecture?: string },
): Promise<Blob> {
  await mkdir(join(layout, "blobs", "sha256"), { recursive: true });
  await writeFile(join(layout, "oci-layout"), JSON.stringify({ imageLayoutVersion: "1.0.0" }));
  const layers: Blob[] = [];
  const diffIds: string[] = [];
  for (const entries of image.layers) {
    if (typeof entries === "string") {
      const [diffId, blob] = await gzipBlob(layout, entries);
      diffIds.push(diffId);
      layers.push(blob);
      continue;
    }
    const plain = await tarOf(entries);
    diffIds.push(`sha256:${createHash("sha256").update(plain).digest("hex")}`);
    layers.push(await putBlob(layout, gzipSync(plain)));
  }
  const config = await putBlob(
    layout,
    Buffer.from(JSON.stringify({ architecture: image.architecture ?? "amd64", os: "linux", config: image.config ?? {}, rootfs: { type: "layers", diff_ids: diffIds } })),
  );
  const manifest = await putBlob(
    layout,
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        config: { mediaType: "application/vnd.oci.image.config.v1+json", ...config },
        layers: layers.map((l) => ({ mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", ...l })),
      }),
    ),
  );
  if (tag) await addToIndex(layout, tag, { mediaType: "application/vnd.oci.image.manifest.v1+json", ...manifest });
  return manifest;
}

/** Writes a multi-platform image index under `tag`. */
export async function writeOciIndex(layout: string, tag: string, manifests: { blob: Blob; architecture: string }[]): Promise<void> {
  const index = await putBlob(
    layout,
    Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: "application/vnd.oci.image.index.v1+json",
        manifests: manifests.map((m) => ({ mediaType: "application/vnd.oci.image.manifest.v1+json", ...m.blob, platform: { os: "linux", architecture: m.architecture } })),
      }),
    ),
  );
  await addToIndex(layout, tag, { mediaType: "application/vnd.oci.image.index.v1+json", ...index });
}

async function addToIndex(layout: string, tag: string, descriptor: Record<string, unknown>): Promise<void> {
  const path = join(layout, "index.json");
  const index = JSON.parse(await readFile(path, "utf8").catch(() => '{"schemaVersion":2,"manifests":[]}')) as { manifests: Record<string, unknown>[] };
  index.manifests = index.manifests.filter((m) => (m.annotations as Record<string, string>)["org.opencontainers.image.ref.name"] !== tag);
  index.manifests.push({ ...descriptor, annotations: { "org.opencontainers.image.ref.name": tag } });
  await writeFile(path, JSON.stringify(index));
}

/**
 * A root filesystem layer with busybox (the host's busybox-static) as /bin/sh
 * and its applets, /etc/passwd with root and app (1000), and the usual
 * directories: small (about 1 MiB gzipped) and enough for RUN and COPY.
 */
export async function busyboxLayer(): Promise<LayerEntry[]> {
  const applets = execFileSync("busybox", ["--list"], { encoding: "utf8" }).split("\n").filter((a) => /^[a-z0-9_.[-]+$/.test(a) && a !== "busybox");
  return [
    ...["bin", "etc", "root", "tmp", "srv", "home", "home/app"].map((d) => ({ name: `${d}/`, type: "directory" as const, mode: d === "tmp" ? 0o1777 : 0o755, uid: d === "home/app" ? 1000 : 0 })),
    { name: "bin/busybox", data: await readFile("/bin/busybox"), mode: 0o755 },
    ...applets.map((a) => ({ name: `bin/${a}`, type: "symlink" as const, linkname: "busybox" })),
    { name: "etc/passwd", data: "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n" },
    { name: "etc/group", data: "root:x:0:\napp:x:1000:\n" },
  ];
}
