import { join } from "node:path";
import { prepareBaseImage } from "../images/base-image.ts";
import { prepareBaseRootfs } from "../images/base-rootfs.ts";
import { ClusterSnapshots } from "../images/cluster-snapshots.ts";
import { ImageObjects } from "../images/image-objects.ts";
import type { Db } from "../store/db.ts";
import type { ObjectStore } from "../store/objects.ts";
import type { ProgressLog } from "../util/asset-cache.ts";
import { guestCmdline } from "../vmm/qemu.ts";
import { detectAccelerator } from "../vmm/accelerator.ts";
import { Engine, type GuestBootAssets, type Snapshot } from "../vmm/engine.ts";
import { prepareGuestAssets } from "../vmm/guest/index.ts";

export interface Runtime {
  engine: Engine;
  baseImage: Snapshot;
  /** The base root filesystem every image's disk is layered on. */
  rootfs: string;
  assets: GuestBootAssets;
  /** Cluster with an object store: images published there and pulled from there (docs/cluster.md). */
  imageObjects?: ImageObjects;
  /** With it: the managed images' snapshots, built once per cluster. */
  sharedSnapshots?: ClusterSnapshots;
}

/**
 * Everything the server needs before it can answer: guest assets (built once,
 * then cached), the accelerator, the engine with every surviving VM
 * re-adopted, and the built-in `base` image.
 */
export async function startRuntime(opts: {
  dataDir: string;
  assetsDir: string;
  /** Warm VMs kept per image (see Engine.launch). */
  warmPoolSize: number;
  /** QEMU processes kept started for restores (see Engine's `prestartedProcesses`); default none. */
  prestartedProcesses?: number;
  log: ProgressLog;
  /** A node of a cluster with an object store: the base image is built once per cluster (images/cluster-snapshots.ts). */
  cluster?: { db: Db; nodeId: string; store: ObjectStore };
}): Promise<Runtime> {
  const assets = await prepareGuestAssets(opts.assetsDir, opts.log);
  const accelerator = await detectAccelerator({ ...assets, cacheDir: opts.assetsDir, log: opts.log });
  // A pulled snapshot is restored with this node's boot files and command line, as a snapshot made here (Templates.boot).
  const imageObjects = opts.cluster
    ? new ImageObjects(opts.cluster.store, { blobsDir: join(opts.dataDir, "blobs"), accelerator, boot: { ...assets, cmdline: guestCmdline({ accelerator, hostname: "cocoon" }) } })
    : undefined;
  const sharedSnapshots = opts.cluster && imageObjects ? new ClusterSnapshots(opts.cluster.db, imageObjects, { nodeId: opts.cluster.nodeId, log: opts.log }) : undefined;
  const rootfs = await prepareBaseRootfs(opts.assetsDir, opts.log, sharedSnapshots);
  const engine = await Engine.open({ dataDir: opts.dataDir, assets, accelerator, warmPoolSize: opts.warmPoolSize, prestartedProcesses: opts.prestartedProcesses, log: opts.log });
  const baseImage = await prepareBaseImage(engine, { imagesDir: join(opts.dataDir, "images"), rootfs, assets, log: opts.log, shared: sharedSnapshots });
  void engine.prewarm(baseImage);
  return { engine, baseImage, rootfs, assets, imageObjects, sharedSnapshots };
}
