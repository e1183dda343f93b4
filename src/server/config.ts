import { cpus, homedir } from "node:os";
import { join, resolve } from "node:path";
import { RegistryEgress } from "../images/registry/egress.ts";
import { objectStoreConfigFromEnv, type ObjectStoreConfig } from "../store/objects.ts";
import { hostMemoryBudget, type HostMemoryBudget } from "../vmm/host-memory.ts";
import type { Cidr } from "../vmm/network/addresses.ts";

export interface ServerConfig {
  listenHost: string;
  listenPort: number;
  dataDir: string;
  /** Kernel, initramfs, agent and root filesystem versions; shared by data dirs in tests. */
  assetsDir: string;
  /** Restored, warmed VMs kept ready per image for instant launches (COCOON_WARM_POOL, default 1). */
  warmPoolSize: number;
  /** QEMU processes kept started and jailed for launches that restore, all images together (COCOON_PRESTARTED, default one per host CPU; 0: none). */
  prestartedProcesses: number;
  /** An image build that takes longer fails (COCOON_BUILD_TIMEOUT_SECONDS, default 600). */
  buildTimeoutSeconds: number;
  /** vCPUs admitted per host core (COCOON_VCPU_OVERCOMMIT, default 128: sandboxes are mostly idle, each VM's cgroup weighs its share by its vCPUs and caps it at them). */
  vcpuOvercommit: number;
  /** Guest memory committed to live VMs, as a multiple of host memory (COCOON_MEMORY_OVERCOMMIT, default 4); what they really use is admitted by `memory`. */
  memoryOvercommit: number;
  /** Host memory kept from VMs, and what all VMs may use (COCOON_MEMORY_RESERVE_MIB, COCOON_VM_MEMORY_MIB). */
  memory: HostMemoryBudget;
  /** A PEM file of extra CA certificates trusted for https:// code URIs, besides the bundled roots (COCOON_HTTPS_CA_FILE). */
  httpsCaFile?: string;
  /** A PEM file of CA certificates trusted for container registries, besides the system's (COCOON_REGISTRY_CA_FILE). */
  registryCaFile?: string;
  /** CIDRs of private addresses FROM may pull from, e.g. an internal registry (COCOON_REGISTRY_PRIVATE_ALLOW, comma-separated; none by default). */
  registryPrivateAllow: Cidr[];
  /** What buffered exec answers may hold in memory at once (COCOON_EXEC_OUTPUT_BUDGET_MIB, default 256; docs/api.md). */
  execOutputBudgetMiB: number;
  /** A PostgreSQL URL (COCOON_DATABASE_URL): the store many hosts share (docs/cluster.md). Unset: SQLite in the data directory. */
  databaseUrl?: string;
  /** Cluster: this node's id (COCOON_NODE_ID; default: one made at first start, kept in the data directory). */
  nodeId?: string;
  /** Cluster: the URL its peers reach it at (COCOON_NODE_URL; default http://LISTEN). */
  nodeUrl: string;
  /** Cluster: the S3-compatible store suspended VMs move through (COCOON_OBJECT_STORE_URL, _BUCKET, _ACCESS_KEY_ID, _SECRET_ACCESS_KEY, _REGION; docs/cluster.md). Unset: they stay on their node's disk. */
  objectStore?: ObjectStoreConfig;
  /** Cluster with an object store: the bound of the node's cache of images pulled from it (COCOON_IMAGE_CACHE_GIB, default 20). */
  imageCacheGiB: number;
  /** Cluster with an object store: how often a node sweeps the bucket of what nothing references (COCOON_BUCKET_SWEEP_MINUTES, default 10; one node at a time). */
  bucketSweepMinutes: number;
}

/** Flags win over COCOON_* environment variables, which win over defaults (docs/api.md). */
export function resolveServerConfig(flags: { listen?: string; dataDir?: string; assetsDir?: string }): ServerConfig {
  const listen = flags.listen ?? process.env.COCOON_LISTEN ?? "127.0.0.1:7070";
  const match = /^(.*):(\d+)$/.exec(listen);
  const port = Number(match?.[2]);
  if (!match || !match[1] || port < 1 || port > 65535) {
    throw new Error(`--listen must be HOST:PORT with a port between 1 and 65535, got "${listen}"`);
  }
  const dataDir = resolve(flags.dataDir ?? process.env.COCOON_DATA_DIR ?? join(homedir(), ".cocoon"));
  return {
    listenHost: match[1],
    listenPort: port,
    dataDir,
    assetsDir: resolve(flags.assetsDir ?? process.env.COCOON_ASSETS_DIR ?? join(dataDir, "assets")),
    warmPoolSize: envNumber("COCOON_WARM_POOL", 1, { min: 0, max: 16, integer: true }),
    prestartedProcesses: envNumber("COCOON_PRESTARTED", cpus().length, { min: 0, max: 64, integer: true }),
    buildTimeoutSeconds: envNumber("COCOON_BUILD_TIMEOUT_SECONDS", 600, { min: 10, max: 86_400, integer: true }),
    vcpuOvercommit: envNumber("COCOON_VCPU_OVERCOMMIT", 128, { min: 0.1, max: 1024 }),
    memoryOvercommit: envNumber("COCOON_MEMORY_OVERCOMMIT", 4, { min: 0.1, max: 16 }),
    memory: hostMemoryBudget(),
    httpsCaFile: process.env.COCOON_HTTPS_CA_FILE ? resolve(process.env.COCOON_HTTPS_CA_FILE) : undefined,
    registryCaFile: process.env.COCOON_REGISTRY_CA_FILE ? resolve(process.env.COCOON_REGISTRY_CA_FILE) : undefined,
    registryPrivateAllow: RegistryEgress.allowFromEnv(),
    execOutputBudgetMiB: envNumber("COCOON_EXEC_OUTPUT_BUDGET_MIB", 256, { min: 16, max: 65_536, integer: true }),
    databaseUrl: databaseUrlFromEnv(),
    nodeId: nodeIdFromEnv(),
    nodeUrl: process.env.COCOON_NODE_URL || `http://${listen}`,
    objectStore: objectStoreConfigFromEnv(),
    imageCacheGiB: envNumber("COCOON_IMAGE_CACHE_GIB", 20, { min: 1, max: 65_536 }),
    bucketSweepMinutes: envNumber("COCOON_BUCKET_SWEEP_MINUTES", 10, { min: 1, max: 10_080 }),
  };
}

/** A number from the environment, or `fallback`; out of range is an error naming the variable and the limits. */
function envNumber(name: string, fallback: number, limits: { min: number; max: number; integer?: boolean }): number {
  const raw = process.env[name];
  if (raw === undefined || raw === "") return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < limits.min || n > limits.max || (limits.integer && !Number.isInteger(n))) {
    throw new Error(`${name} must be ${limits.integer ? "an integer" : "a number"} between ${limits.min} and ${limits.max}, got "${raw}"`);
  }
  return n;
}

/** COCOON_DATABASE_URL: only PostgreSQL URLs (the single-host SQLite needs none). */
function databaseUrlFromEnv(): string | undefined {
  const raw = process.env.COCOON_DATABASE_URL;
  if (raw === undefined || raw === "") return undefined;
  if (!/^postgres(ql)?:\/\//.test(raw)) throw new Error("COCOON_DATABASE_URL must be a postgres:// or postgresql:// URL");
  return raw;
}

function nodeIdFromEnv(): string | undefined {
  const raw = process.env.COCOON_NODE_ID;
  if (raw === undefined || raw === "") return undefined;
  if (!/^[a-z0-9][a-z0-9-]{0,62}$/.test(raw)) throw new Error(`COCOON_NODE_ID must be 1 to 63 lowercase letters, digits and dashes, got "${raw}"`);
  return raw;
}
