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
 * How RAM is laid out in a state file. `stream`: QEMU's migration stream,
 * pages in the order sent (every suspend, snapshot and capture for a named
 * snapshot). `mapped-ram`: each page at its own offset of the file, written
 * and read by `MAPPED_RAM_CHANNELS` threads (`multifd`), which QEMU opens by
 * path, so the file must be one the (jailed) QEMU may open: a fork's
 * capture, read by its children only (capture.ts). Builds without the
 * capability (QEMU < 9.0: `QemuFeatures.fileMigration`) write streams only.
 */
export type StateLayout = "stream" | "mapped-ram";

/** Threads that write and read a mapped-ram state: one per host CPU here (2) beat one by 2-4× on a capture (SPECIFICATION.md). */
const MAPPED_RAM_CHANNELS = 2;

/**
 * Ask for the same capabilities on both ends of every stream: with
 * x-ignore-shared, RAM mapped share=on (a snapshot template's memory file) is
 * left out of the stream, and the stream layout depends on the capability;
 * mapped-ram has no such RAM (a fork's parent is a clone or a resumed VM:
 * private RAM) and refuses it. pause-before-switchover (the source's alone;
 * the stream is the same) is set on every save, on or off, as a QEMU keeps
 * capabilities from one migration to the next: a suspend after a live
 * capture must not stop half-way. mapped-ram and multifd are named only
 * where they are wanted (a build without them refuses their names), and a
 * mapped-ram save turns them off again when it ends (`saveMappedRam`).
 */
async function setCapabilities(qmp: QmpClient, layout: StateLayout, live = false): Promise<void> {
  const mappedRam = layout === "mapped-ram";
  await qmp.execute("migrate-set-capabilities", {
    capabilities: [
      { capability: "x-ignore-shared", state: !mappedRam },
      { capability: "events", state: true },
      { capability: "pause-before-switchover", state: live },
      ...(mappedRam ? MAPPED_RAM_CAPABILITIES.map((capability) => ({ capability, state: true })) : []),
    ],
  });
  if (mappedRam) await qmp.execute("migrate-set-parameters", { "multifd-channels": MAPPED_RAM_CHANNELS });
}

const MAPPED_RAM_CAPABILITIES = ["mapped-ram", "multifd"] as const;

/** Whether the QEMU behind `qmp` can write and read the mapped-ram layout (a process may be of another build than this server's: one adopted across an upgrade). */
export async function hasMappedRam(qmp: QmpClient): Promise<boolean> {
  const capabilities = await qmp.execute<{ capability: string }[]>("query-migrate-capabilities");
  return capabilities.some((c) => c.capability === "mapped-ram");
}

/**
 * A live save's pause budget: QEMU stops the vCPUs for the last pass once
 * what is left to send would take less than this at the bandwidth it
 * measured. Small, as the last pass holds the disk copy too (capture.ts).
 */
const LIVE_DOWNTIME_MS = 30;
/**
 * How long a live save copies RAM with the guest running before it gives up
 * converging (a guest dirtying memory faster than it is sent) and stops the
 * guest for whatever is left: the pause is then a stopped save's at worst.
 */
const LIVE_CONVERGE_MS = 3000;
/** QEMU's default downtime limit, for saves of a stopped guest (it keeps parameters between migrations). */
const STOPPED_DOWNTIME_MS = 300;

/**
 * How often a wait for a migration's state asks QEMU when no MIGRATION event
 * came. The events end each wait; the poll only bounds a lost one. (A poll
 * every 2 ms was the wait before: ten fork children restoring side by side
 * on two cores answered up to ~100 `query-migrate` each.)
 */
const BACKSTOP_POLL_MS = 50;

/**
 * Waits for the migration to reach `until` (a failure or cancel throws).
 * QEMU's MIGRATION event (the `events` capability, set with every
 * migration's capabilities) wakes the wait at each change of state.
 */
async function waitForMigration(qmp: QmpClient, timeoutMs: number, until = "completed"): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let changed: boolean;
  let wake = () => undefined as void;
  const onEvent = (msg: { event?: string }) => {
    if (msg.event !== "MIGRATION") return;
    changed = true;
    wake();
  };
  qmp.on("event", onEvent);
  try {
    for (;;) {
      changed = false;
      const info = await qmp.execute<MigrationInfo>("query-migrate");
      if (info.status === until) return;
      if (info.status === "failed" || info.status === "cancelled") {
        throw new Error(`migration ${info.status}: ${info["error-desc"] ?? "no reason given"}`);
      }
      if (Date.now() > deadline) throw new Error(`migration did not reach ${until} within ${timeoutMs} ms`);
      // An event that came with the answer above has set `changed` already.
      if (!changed) await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, BACKSTOP_POLL_MS);
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      wake = () => undefined;
    }
  } finally {
    qmp.off("event", onEvent);
  }
}

/**
 * A save of a running guest (pre-copy): RAM is sent while it runs, in passes
 * over what it dirtied, and QEMU stops the vCPUs only for the last (disks
 * drained and flushed), where it waits (`pause-before-switchover`) while
 * `whileStopped` runs, then sends the rest and the device state. The guest
 * stays stopped after the save, as after any: the caller continues it.
 */
export interface LiveSave {
  whileStopped: () => Promise<void>;
}

/** Drives a live save from its start to the end of `whileStopped`; then QEMU is told to finish. */
async function switchOver(qmp: QmpClient, live: LiveSave, timeoutMs: number): Promise<void> {
  const converge = setTimeout(() => {
    // A large limit makes the next pass the last, whatever is left.
    qmp.execute("migrate-set-parameters", { "downtime-limit": 60_000 }).catch(() => undefined);
  }, LIVE_CONVERGE_MS);
  try {
    // The vCPUs are stopped from the moment the state changes until `migrate-continue`: its event ends the wait at once.
    await waitForMigration(qmp, timeoutMs, "pre-switchover");
  } finally {
    clearTimeout(converge);
  }
  await live.whileStopped();
  await qmp.execute("migrate-continue", { state: "pre-switchover" });
}

/**
 * Writes the VM's device state (and any RAM not mapped shared) to `file`,
 * durably unless told otherwise. The VM is stopped first so the stream is one
 * pass, except for a `live` save (`LiveSave`), which stops it itself.
 * `socketPath` is in a root-owned directory (no VM can swap it for a link);
 * a jailed QEMU connects as `uid`, so the socket is made that uid's alone
 * before QEMU is told where it is.
 */
export async function saveState(
  qmp: QmpClient,
  socketPath: string,
  file: string,
  uid: number | undefined,
  opts: { durable?: boolean; timeoutMs?: number; live?: LiveSave } = {},
): Promise<void> {
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
  // Awaited only when the migration worked; a failed one may end the stream with an error nobody waits for.
  received.catch(() => undefined);
  try {
    await migrate(qmp, `unix:${socketPath}`, "stream", opts);
    await received;
  } finally {
    server.close();
    await rm(socketPath, { force: true });
  }
  // A capture of a running VM syncs its copy after the VM runs again (captureVm).
  if (opts.durable !== false) await fsyncFile(file);
}

/**
 * Writes the VM's state in the mapped-ram layout (`StateLayout`) to `file`,
 * which QEMU opens itself (it exists, made its uid's by the server, in a
 * root-owned directory) and writes in place; not made durable. Live as
 * `saveState` can be.
 */
export async function saveMappedRam(qmp: QmpClient, file: string, opts: { timeoutMs?: number; live?: LiveSave } = {}): Promise<void> {
  try {
    await migrate(qmp, `file:${file}`, "mapped-ram", opts);
  } catch (err) {
    await endMappedRam(qmp).catch(() => undefined);
    throw err;
  }
  await endMappedRam(qmp);
}

/** Migration states during which QEMU refuses to change capabilities. */
const MIGRATION_UNDER_WAY = new Set(["setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"]);

/**
 * Turns mapped-ram off once a migration in that layout has ended (a
 * cancelled one may still be winding down): the process's next save (a
 * suspend) is a stream.
 */
async function endMappedRam(qmp: QmpClient): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (MIGRATION_UNDER_WAY.has((await qmp.execute<Partial<MigrationInfo>>("query-migrate")).status ?? "") && Date.now() < deadline) await sleep(5);
  await qmp.execute("migrate-set-capabilities", { capabilities: MAPPED_RAM_CAPABILITIES.map((capability) => ({ capability, state: false })) });
}

/** Runs one outgoing migration to `uri` until it has completed. */
async function migrate(qmp: QmpClient, uri: string, layout: StateLayout, opts: { timeoutMs?: number; live?: LiveSave }): Promise<void> {
  const timeoutMs = opts.timeoutMs ?? 120_000;
  await setCapabilities(qmp, layout, opts.live !== undefined);
  // The default 128 MiB/s cap exists for live migration over networks; here the
  // stream goes to a local file, so lift it.
  await qmp.execute("migrate-set-parameters", {
    "max-bandwidth": 64 * 1024 * 1024 * 1024,
    "downtime-limit": opts.live ? LIVE_DOWNTIME_MS : STOPPED_DOWNTIME_MS,
  });
  await qmp.execute("migrate", { uri });
  if (opts.live) {
    await switchOver(qmp, opts.live, timeoutMs).catch(async (err: unknown) => {
      // Lets a save stopped before its last pass end (QEMU continues the guest it stopped).
      await qmp.execute("migrate_cancel").catch(() => undefined);
      throw err;
    });
  }
  await waitForMigration(qmp, timeoutMs);
}

/**
 * Loads the saved state a QEMU was started with (`MachineSpec.incomingState`,
 * from `incomingStateSource()`) and returns when the guest can be continued.
 * An fdset's descriptor is then closed: QEMU would hold the state file (a
 * resumed VM's, deleted afterwards) open for its whole life.
 */
export async function restoreState(qmp: QmpClient, source: { uri: string; fdset?: number }, layout: StateLayout, timeoutMs = 120_000): Promise<void> {
  await setCapabilities(qmp, layout);
  await qmp.execute("migrate-incoming", { uri: source.uri });
  // `cont` before `completed` leaves the guest's network dead (docs/architecture.md).
  await waitForMigration(qmp, timeoutMs);
  if (layout === "mapped-ram") await endMappedRam(qmp);
  if (source.fdset !== undefined) await qmp.execute("remove-fd", { "fdset-id": source.fdset });
}
