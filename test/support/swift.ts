import { execFileSync, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { userInfo } from "node:os";
import { join } from "node:path";
import { freeLoopbackPort } from "../../src/util/ports.ts";

/** A real OpenStack Swift with its S3 layer (`s3api`) on loopback: what COCOON_OBJECT_STORE_* name. */
export interface TestSwift {
  /** The proxy's S3 endpoint, `http://127.0.0.1:<port>`. */
  url: string;
  /** tempauth's `test:tester` / `testing`: the S3 access key and secret. */
  accessKeyId: string;
  secretAccessKey: string;
  /** Stops the servers and removes their directory. */
  stop(): Promise<void>;
  readonly dir: string;
}

const SERVERS = ["account", "container", "object", "proxy"] as const;

/**
 * Debian's Swift 2.30 (`swift-proxy`, `swift-object`, `swift-container`,
 * `swift-account`; scripts/setup.sh): one-replica rings built with
 * `swift-ring-builder` in a temporary directory, the account, container and
 * object servers and a proxy with tempauth and s3api, each a process of its
 * own on a loopback port. Storage is a plain directory (`mount_check =
 * false`) under COCOON_TEST_SWIFT_DIR (default /tmp), which must support
 * user xattrs (the object server keeps metadata in them; tmpfs before Linux
 * 6.6 does not).
 */
export async function startSwift(): Promise<TestSwift> {
  const dir = mkdtempSync(join(process.env.COCOON_TEST_SWIFT_DIR ?? "/tmp", "cocoon-swift-"));
  const xattr = spawnSync("/usr/bin/python3", ["-c", "import os, sys; os.setxattr(sys.argv[1], 'user.cocoon-test', b'1')", dir], { encoding: "utf8" });
  if (xattr.status !== 0) {
    rmSync(dir, { recursive: true, force: true });
    throw new Error(`Swift's object server needs user xattrs, which ${dir} does not support (${xattr.stderr.trim().split("\n").at(-1)}): set COCOON_TEST_SWIFT_DIR to a directory on ext4 or xfs`);
  }
  const etc = join(dir, "etc");
  const devices = join(dir, "srv");
  mkdirSync(etc);
  mkdirSync(join(devices, "d1"), { recursive: true });
  const ports = Object.fromEntries(await Promise.all(SERVERS.map(async (s) => [s, await freeLoopbackPort()] as const))) as Record<(typeof SERVERS)[number], number>;
  writeFileSync(join(etc, "swift.conf"), ["[swift-hash]", "swift_hash_path_suffix = cocoon-test", "swift_hash_path_prefix = cocoon-test", "[storage-policy:0]", "name = gold", "default = yes", ""].join("\n"));
  for (const ring of ["account", "container", "object"] as const) {
    const builder = join(etc, `${ring}.builder`);
    // Part power 4, one replica, min_part_hours 0: one device, rebalanced once.
    execFileSync("swift-ring-builder", [builder, "create", "4", "1", "0"], { stdio: "pipe" });
    execFileSync("swift-ring-builder", [builder, "add", `r1z1-127.0.0.1:${ports[ring]}/d1`, "1"], { stdio: "pipe" });
    execFileSync("swift-ring-builder", [builder, "rebalance"], { stdio: "pipe" });
  }
  const common = (port: number) => [
    "[DEFAULT]",
    "bind_ip = 127.0.0.1",
    `bind_port = ${port}`,
    `swift_dir = ${etc}`,
    `devices = ${devices}`,
    "mount_check = false",
    // One process, no forks: the harness ends what it started.
    "workers = 0",
    `user = ${userInfo().username}`,
    "log_level = WARNING",
    "",
  ];
  for (const ring of ["account", "container", "object"] as const) {
    writeFileSync(join(etc, `${ring}-server.conf`), [...common(ports[ring]), "[pipeline:main]", `pipeline = ${ring}-server`, `[app:${ring}-server]`, `use = egg:swift#${ring}`, ""].join("\n"));
  }
  writeFileSync(
    join(etc, "proxy-server.conf"),
    [
      ...common(ports.proxy),
      "[pipeline:main]",
      // The order s3api's documentation gives: slo for multipart uploads, tempauth after s3api.
      "pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server",
      "[app:proxy-server]",
      "use = egg:swift#proxy",
      "account_autocreate = true",
      "[filter:catch_errors]",
      "use = egg:swift#catch_errors",
      "[filter:gatekeeper]",
      "use = egg:swift#gatekeeper",
      "[filter:healthcheck]",
      "use = egg:swift#healthcheck",
      "[filter:proxy-logging]",
      "use = egg:swift#proxy_logging",
      "[filter:cache]",
      "use = egg:swift#memcache",
      "[filter:listing_formats]",
      "use = egg:swift#listing_formats",
      "[filter:s3api]",
      "use = egg:swift#s3api",
      "location = us-east-1",
      "[filter:tempauth]",
      "use = egg:swift#tempauth",
      "user_test_tester = testing .admin",
      "[filter:copy]",
      "use = egg:swift#copy",
      "[filter:slo]",
      "use = egg:swift#slo",
      "[filter:dlo]",
      "use = egg:swift#dlo",
      "",
    ].join("\n"),
  );
  const children: ChildProcess[] = [];
  let log = "";
  for (const server of SERVERS) {
    const child = spawn(`swift-${server}-server`, [join(etc, `${server}-server.conf`)], { stdio: ["ignore", "pipe", "pipe"] });
    for (const s of [child.stdout!, child.stderr!]) s.on("data", (d: Buffer) => (log = (log + d.toString()).slice(-4000)));
    children.push(child);
  }
  const stop = async () => {
    for (const child of children) {
      if (child.exitCode !== null || child.signalCode !== null) continue;
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGKILL");
      await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const url = `http://127.0.0.1:${ports.proxy}`;
  const ready = Date.now() + 30_000;
  for (;;) {
    const down = children.find((c) => c.exitCode !== null);
    if (down || Date.now() > ready) {
      await stop();
      throw new Error(`swift did not start: ${log}`);
    }
    // Every server answers HTTP once it listens (the storage servers with a 4xx to a bare GET).
    const up = await Promise.all(SERVERS.map((s) => fetch(`http://127.0.0.1:${ports[s]}/healthcheck`).then(() => true, () => false)));
    if (up.every(Boolean)) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  return { url, accessKeyId: "test:tester", secretAccessKey: "testing", stop, dir };
}
