import { createWriteStream } from "node:fs";
import { chmod, chown, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { pipeline } from "node:stream/promises";
import { fsyncFile } from "../util/files.ts";
import { sleep } from "../util/process.ts";
import type { QmpClient } from "./qmp.ts";

/*
 * VM state moves through QEMU's migration stream, never `exec:` URIs (no
 * shell is spawned). Saving goes over a unix socket the server owns, so a
 * jailed QEMU cannot write a state file; restoring reads a descriptor opened
 * read-only by the server (see INHERITED_FD, incomingStateSource).
 */

interface MigrationInfo {
  status: string;
  "error-desc"?: string;
}

/**
 * Ask for the same capabilities on both ends of every stream: with
 * x-ignore-shared, RAM mapped share=on (a snapshot template's memory file) is
 * left out of the stream, and the stream layout depends on the capability.
 */
async function setCapabilities(qmp: QmpClient): Promise<void> {
  await qmp.execute("migrate-set-capabilities", {
    capabilities: [{ capability: "x-ignore-shared", state: true }],
  });
}

async function waitForMigration(qmp: QmpClient, pollMs: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await qmp.execute<MigrationInfo>("query-migrate");
    if (info.status === "completed") return;
    if (info.status === "failed" || info.status === "cancelled") {
      throw new Error(`migration ${info.status}: ${info["error-desc"] ?? "no reason given"}`);
    }
    if (Date.now() > deadline) throw new Error(`migration did not complete within ${timeoutMs} ms`);
    await sleep(pollMs);
  }
}

/**
 * Writes the paused VM's device state (and any RAM not mapped shared) to
 * `file`, durably. The VM must be stopped first so the stream is one pass.
 * `socketPath` is in a root-owned directory (no VM can swap it for a link);
 * a jailed QEMU connects as `uid`, so the socket is made that uid's alone
 * before QEMU is told where it is.
 */
export async function saveState(qmp: QmpClient, socketPath: string, file: string, uid: number | undefined, opts: { durable?: boolean; timeoutMs?: number } = {}): Promise<void> {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  await rm(socketPath, { force: true });
  const server = createServer();
  await new Promise<void>((resolve, reject) => server.once("error", reject).listen(socketPath, resolve));
  if (uid !== undefined) await chown(socketPath, uid, uid);
  await chmod(socketPath, 0o600);
  const received = new Promise<void>((resolve, reject) => {
    server.once("connection", (sock) => {
      server.close();
      pipeline(sock, createWriteStream(file)).then(resolve, reject);
    });
  });
  try {
    await setCapabilities(qmp);
    // The default 128 MiB/s cap exists for live migration over networks; here the
    // VM is paused and the stream goes to a local file, so lift it.
    await qmp.execute("migrate-set-parameters", { "max-bandwidth": 64 * 1024 * 1024 * 1024 });
    await qmp.execute("migrate", { uri: `unix:${socketPath}` });
    await waitForMigration(qmp, 5, timeoutMs);
    await received;
  } finally {
    server.close();
    await rm(socketPath, { force: true });
  }
  // A capture of a running VM syncs its copy after the VM runs again (captureVm).
  if (opts.durable !== false) await fsyncFile(file);
}

/**
 * Loads the saved state a QEMU was started with (`MachineSpec.incomingState`,
 * from `incomingStateSource()`) and returns when the guest can be continued.
 * An fdset's descriptor is then closed: QEMU would hold the state file (a
 * resumed VM's, deleted afterwards) open for its whole life.
 */
export async function restoreState(qmp: QmpClient, source: { uri: string; fdset?: number }, timeoutMs = 120_000): Promise<void> {
  await setCapabilities(qmp);
  await qmp.execute("migrate-incoming", { uri: source.uri });
  // `cont` before `completed` leaves the guest's network dead (docs/architecture.md).
  await waitForMigration(qmp, 2, timeoutMs);
  if (source.fdset !== undefined) await qmp.execute("remove-fd", { "fdset-id": source.fdset });
}
