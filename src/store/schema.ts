import type { Generated, Insertable, Selectable, Updateable } from "kysely";

/** The values of `microvms.state`; the state machine over them is lifecycle/states.ts. */
export const MICROVM_STATES = ["PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "RESUMING", "TERMINATING", "TERMINATED", "FAILED"] as const;
export type MicroVmState = (typeof MICROVM_STATES)[number];

/** The values of `images.state`; the state machine over them is images/states.ts. */
export const IMAGE_STATES = ["PENDING", "BUILDING", "READY", "FAILED", "DELETING"] as const;
export type ImageState = (typeof IMAGE_STATES)[number];

/** Table types for Kysely. Times are ISO-8601 strings; JSON columns are TEXT. */
export interface Database {
  tenants: TenantsTable;
  api_keys: ApiKeysTable;
  microvms: MicroVmsTable;
  events: EventsTable;
  images: ImagesTable;
  idempotency_tokens: IdempotencyTokensTable;
  tags: TagsTable;
  network_connectors: NetworkConnectorsTable;
  registry_credentials: RegistryCredentialsTable;
  base_shapes: BaseShapesTable;
  nodes: NodesTable;
  volumes: VolumesTable;
  volume_attachments: VolumeAttachmentsTable;
  cluster_snapshots: ClusterSnapshotsTable;
}

export interface TenantsTable {
  id: string;
  name: string;
  created_at: string;
  /** JSON TenantSettings (store/tenants.ts), set by admins; "{}" when none. */
  settings: Generated<string>;
}

export interface ApiKeysTable {
  id: string;
  tenant_id: string;
  /** sha256 of the secret; the secret itself is shown once and never stored. */
  secret_hash: string;
  /** JSON array of permission strings, e.g. ["microvm:*", "image:read"]. */
  permissions: string;
  description: string | null;
  created_at: string;
  revoked_at: string | null;
  /** The secret sealed with the server's master key (store/secrets.ts), for SigV4; null for keys made before it existed. */
  secret_sealed: Generated<string | null>;
}

export interface MicroVmsTable {
  id: string;
  tenant_id: string;
  image_name: string;
  image_id: string;
  /** Written only by lifecycle/microvms.ts, through its state machine. */
  state: MicroVmState;
  state_reason: string | null;
  vcpus: number;
  memory_mib: number;
  disk_gib: number;
  /** JSON object of environment variables. */
  env: string;
  suspend_after_seconds: number;
  auto_resume: number;
  max_runtime_seconds: number;
  /** JSON: "none" | "internet" | {allow: [...]} */
  egress: string;
  endpoint_public: number;
  endpoint_token: string;
  /** Guest port the endpoint router forwards to; null: the VM serves no app. */
  app_port: number | null;
  /** JSON object supplied by the caller. */
  metadata: string;
  created_at: string;
  expires_at: string;
  last_activity_at: string;
  terminated_at: string | null;
  /** A VM suspended this long is terminated; 0 = never. */
  terminate_after_suspended_seconds: Generated<number>;
  /** When the VM was last suspended. */
  suspended_at: Generated<string | null>;
  /** JSON array of the egress connector names its policy came from; null if given directly. */
  egress_connectors: Generated<string | null>;
  /** JSON lifecycle hooks (images/hooks.ts) of its image, copied at launch. */
  hooks: Generated<string | null>;
  /** The version of its image it was launched from (null for VMs made before versions were recorded). */
  image_version: Generated<number | null>;
  /** The microVM it was forked from (POST /v1/microvms/{id}/fork); null for a launch. */
  forked_from: Generated<string | null>;
  /** Cluster (docs/cluster.md): the node that owns the VM, and its epoch then; null on a single host, and while no node owns it. */
  node_id: Generated<string | null>;
  node_epoch: Generated<number | null>;
  /** Cluster: the node whose disk holds the files of the VM's current suspend (null while it runs, and on a single host). */
  suspended_node: Generated<string | null>;
  /** Cluster with an object store: the key prefix its current suspend is published under, set once its manifest is written (null: not published). */
  suspended_object: Generated<string | null>;
  /** The sha256 of that suspend's manifest: what pins the bundle (the object store is not trusted). */
  suspended_manifest: Generated<string | null>;
  /** What becomes of it, running, when its node fails (docs/cluster.md): FAILED, or restored from its restore point. */
  on_node_failure: Generated<NodeFailurePolicy>;
  /** "restore" VMs: their last published suspend, kept after they resume (prefix, manifest sha256, when it was suspended); null: none yet. */
  restore_object: Generated<string | null>;
  restore_manifest: Generated<string | null>;
  restore_point_at: Generated<string | null>;
}

export const NODE_FAILURE_POLICIES = ["fail", "restore"] as const;
export type NodeFailurePolicy = (typeof NODE_FAILURE_POLICIES)[number];

export interface EventsTable {
  id: Generated<number>;
  microvm_id: string;
  tenant_id: string;
  type: string;
  message: string;
  at: string;
}

export type Tenant = Selectable<TenantsTable>;
export type ApiKey = Selectable<ApiKeysTable>;
export type MicroVmRow = Selectable<MicroVmsTable>;
export type NewMicroVmRow = Insertable<MicroVmsTable>;
export type MicroVmUpdate = Updateable<MicroVmsTable>;
export type EventRow = Selectable<EventsTable>;

/** One build of a MicroVM Image (issue #5): builds of one name are versions 1, 2, … */
export interface ImagesTable {
  id: string;
  tenant_id: string;
  name: string;
  version: number;
  /** Written only by images/service.ts, through its state machine (images/states.ts). */
  state: ImageState;
  state_reason: string | null;
  created_at: string;
  ready_at: string | null;
  /** disk_bytes + memory_bytes: what the snapshot holds on the host. */
  size_bytes: number;
  disk_bytes: number;
  memory_bytes: number;
  app_port: number | null;
  /** The shape the image was snapshotted at; every VM of it has this shape. */
  vcpus: number;
  memory_mib: number;
  disk_gib: number;
  dockerfile_digest: string;
  code_digest: string;
  /** "upload", or the codeUri (s3://…, https://…, file://…). */
  code_source: string;
  parent_image_id: string | null;
  /** The running microVM this image is a snapshot of (POST /v1/microvms/{id}/snapshots); null for a build. */
  source_microvm_id: Generated<string | null>;
  /** JSON ImageConfig (images/dockerfile.ts): env, workdir, user, argv, healthcheck, labels. */
  config: string;
  build_ms: number | null;
  /** ACTIVE | INACTIVE: an inactive version is never launched. */
  status: Generated<string>;
  /** JSON lifecycle hooks (images/hooks.ts). */
  hooks: Generated<string | null>;
  description: Generated<string | null>;
  /** The managed image the build started from, when one was named. */
  base_image: Generated<string | null>;
  /** JSON array: the default egress connectors of the image's VMs. */
  egress_connectors: Generated<string | null>;
  /** JSON: AWS fields accepted and echoed back but not acted on. */
  aws_fields: Generated<string | null>;
  /** Cluster (docs/cluster.md): the node that builds and holds it; null on a single host. */
  node_id: Generated<string | null>;
  /** Cluster with an object store: the prefix its snapshot is published under (images/image-objects.ts); other nodes pull it from there. */
  snapshot_object: Generated<string | null>;
  /** The sha256 of that bundle's manifest: a pull takes only the bundle this cluster published. */
  snapshot_manifest: Generated<string | null>;
}

/** clientToken idempotency: the resource an operation with this token made. */
export interface IdempotencyTokensTable {
  tenant_id: string;
  operation: string;
  token: string;
  /** sha256 of the request without its token: the same token with another request is a conflict. */
  request_digest: string;
  resource_id: string;
  created_at: string;
}

/** Tags of a tenant's resources (`microvm` by id, `microvm-image` by name). */
export interface TagsTable {
  tenant_id: string;
  resource_type: string;
  resource_id: string;
  key: string;
  value: string;
}

/** An operator-defined named egress policy (an allow list). */
export interface NetworkConnectorsTable {
  name: string;
  /** JSON array of allow entries (network.egress.allow). */
  allow: string;
  description: string | null;
  created_at: string;
}

export type ImageRow = Selectable<ImagesTable>;
export type ImageUpdate = Updateable<ImagesTable>;

/** A tenant's credentials for one container registry (FROM <registry image>); the password is encrypted (images/registry/credentials.ts). */
export interface RegistryCredentialsTable {
  tenant_id: string;
  /** host[:port], lower case; Docker Hub is `docker.io`. */
  host: string;
  username: string;
  /** AES-256-GCM under the server's credentials key, bound to tenant and host: `v1.<iv>.<tag>.<ciphertext>` (base64url). */
  password_sealed: string;
  created_at: string;
  updated_at: string;
}

export type RegistryCredentialsRow = Selectable<RegistryCredentialsTable>;

/** A shape of a managed image snapshotted beyond its default, and the tenant that first asked for it (quota baseShapes). */
export interface BaseShapesTable {
  image_name: string;
  vcpus: number;
  memory_mib: number;
  tenant_id: string;
  created_at: string;
}

/** Cluster with an object store: a managed image's snapshot (by name and the key of its inputs), built once and published (images/cluster-snapshots.ts). */
export interface ClusterSnapshotsTable {
  name: string;
  key: string;
  /** The prefix it is published under, and its manifest's sha256 (what a pull trusts). */
  object: string;
  manifest: string;
  /** The node that built it. */
  node_id: string;
  created_at: string;
}

/** Cluster (docs/cluster.md): the servers sharing one PostgreSQL database, each with a lease on the database's clock. */
export const NODE_STATES = ["active", "draining", "dead"] as const;
export type NodeState = (typeof NODE_STATES)[number];

export interface NodesTable {
  id: string;
  url: string;
  epoch: number;
  state: NodeState;
  state_reason: string | null;
  qemu_build: string;
  accelerator: string;
  cpu_signature: string;
  vcpus: number;
  memory_mib: number;
  build_vcpus: Generated<number>;
  build_memory_mib: Generated<number>;
  registered_at: Date;
  lease_expires_at: Date;
}

export type NodeRow = Selectable<NodesTable>;

/** A tenant's persistent volume (lifecycle/volumes.ts); its file is `volumes/<id>.raw` in the engine's data directory. */
export interface VolumesTable {
  id: string;
  tenant_id: string;
  /** Unique per tenant. */
  name: string;
  size_gib: number;
  created_at: string;
}

/** A volume given to a microVM at its create; it holds the volume while the VM is neither TERMINATED nor FAILED. */
export interface VolumeAttachmentsTable {
  volume_id: string;
  microvm_id: string;
  tenant_id: string;
  /** The VM's volume slot (vmm/qemu.ts VOLUME_SLOTS): its order in the create request. */
  slot: number;
  /** Where the guest mounts it. */
  path: string;
  read_only: number;
}

export type VolumeRow = Selectable<VolumesTable>;
export type VolumeAttachmentRow = Selectable<VolumeAttachmentsTable>;
