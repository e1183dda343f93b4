import { spawn } from "node:child_process";
import { constants } from "node:fs";
import { chmod, chown, mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { isAlive, processArgv, sleep } from "../../util/process.ts";
import type { PortForward } from "../qemu.ts";

/** The guest-side addresses passt presents: the same as QEMU's user-mode netdev, so snapshots move between the two. */
const GUEST = { ip: "10.0.2.15", prefix: "24", gateway: "10.0.2.2", gatewayMac: "52:55:0a:00:02:02" };

/**
 * passt's runtime files, outside the data directory (which may sit under a
 * 0700 home that the passt uid cannot traverse): a socket directory per uid,
 * owned by it, and a pidfile in the root-owned parent, which the server makes
 * and gives to the uid before passt starts (passt opens it after dropping
 * privileges). So the server never reads through a path the VM's uid could
 * replace with a link.
 */
const PASST_ROOT = "/run/cocoon-net";
export const passtDir = (uid: number) => join(PASST_ROOT, String(uid));
export const passtPaths = (uid: number) => ({ socket: join(passtDir(uid), "passt.sock"), pidfile: join(PASST_ROOT, `${uid}.pid`) });

/**
 * Starts passt for one VM as `uid` (privileges dropped, its own user and mount
 * namespaces), listening on a unix socket for QEMU's `-netdev stream`.
 * `--no-map-gw`: the gateway address is not the host; `-1`: passt exits when
 * QEMU disconnects, so a VM's end (or suspend) ends its passt too.
 * `forwards` are bound on 127.0.0.1 of the host only.
 */
export async function startPasst(uid: number, forwards: PortForward[]): Promise<number> {
  const dir = passtDir(uid);
  const paths = passtPaths(uid);
  await rm(dir, { recursive: true, force: true });
  await rm(paths.pidfile, { force: true });
  // The parent must be traversable by every passt uid; each VM's own directory only by its uid.
  await mkdir(PASST_ROOT, { recursive: true });
  await chmod(PASST_ROOT, 0o755);
  await mkdir(dir, { mode: 0o700 });
  await chown(dir, uid, uid);
  await writeFile(paths.pidfile, "", { mode: 0o600, flag: "wx" });
  await chown(paths.pidfile, uid, uid);
  const args = [
    "--runas", `${uid}:${uid}`,
    "-4", "--no-map-gw",
    "-a", GUEST.ip, "-n", GUEST.prefix, "-g", GUEST.gateway, "-M", GUEST.gatewayMac,
    "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra",
    "-s", paths.socket, "-P", paths.pidfile, "-1", "-q",
    "-u", "none",
    ...(forwards.length ? forwards.flatMap((f) => ["-t", `127.0.0.1/${f.hostPort}:${f.guestPort}`]) : ["-t", "none"]),
  ];
  const child = spawn("passt", args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
  const code = await new Promise<number | null>((resolve, reject) => {
    child.on("error", (err: NodeJS.ErrnoException) =>
      reject(err.code === "ENOENT" ? new Error("passt is not installed (Debian package passt; run scripts/setup.sh)") : err),
    );
    child.on("close", resolve);
  });
  const messages = stderr.split("\n").filter((l) => l && !l.startsWith("Failed to send")).join("\n");
  if (code !== 0) throw new Error(`passt failed to start (exit ${code}): ${messages.slice(-800)}`);
  return Number((await readFile(paths.pidfile, "utf8")).trim());
}

/** Ends the VM's passt if it still runs and removes its runtime directory. */
export async function stopPasst(uid: number): Promise<void> {
  const pid = Number(await readFile(passtPaths(uid).pidfile, { encoding: "utf8", flag: constants.O_RDONLY | constants.O_NOFOLLOW }).catch(() => "0"));
  if (pid > 0 && processArgv(pid)?.[0]?.includes("passt") && processArgv(pid)?.includes(String(uid))) {
    try {
      process.kill(pid, "SIGTERM");
    } catch {
      // gone already
    }
    for (let i = 0; i < 200 && isAlive(pid); i++) await sleep(5);
    if (isAlive(pid)) process.kill(pid, "SIGKILL");
  }
  await rm(passtDir(uid), { recursive: true, force: true });
  await rm(passtPaths(uid).pidfile, { force: true });
}
