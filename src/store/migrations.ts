import type { Kysely, Migration } from "kysely";
import { isPostgres } from "./dialect.ts";

/**
 * Column types that differ by engine. On SQLite they are exactly what these
 * migrations always declared (so existing databases and new ones agree); on
 * PostgreSQL a byte count needs 64 bits and an id sequence is a bigserial.
 */
function types(db: Kysely<unknown>) {
  const pg = isPostgres(db);
  return { bytes: pg ? "bigint" : "integer", serialId: pg ? "bigserial" : "integer", autoIncrement: !pg } as const;
}

/**
 * Versioned schema migrations, applied in name order and recorded by Kysely's
 * Migrator, on SQLite and on PostgreSQL alike (test/unit/store-engines.test.ts
 * runs them on both). Only portable DDL: TEXT, INTEGER, defaults that are
 * constants, `types(db)` where the engines differ. Never edit a released
 * migration: add a new one.
 */
export const migrations: Record<string, Migration> = {
  "0001_tenants_keys_microvms": {
    async up(db: Kysely<unknown>) {
      await db.schema
        .createTable("tenants")
        .addColumn("id", "text", (c) => c.primaryKey())
        .addColumn("name", "text", (c) => c.notNull().unique())
        .addColumn("created_at", "text", (c) => c.notNull())
        .execute();
      await db.schema
        .createTable("api_keys")
        .addColumn("id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull().references("tenants.id"))
        .addColumn("secret_hash", "text", (c) => c.notNull().unique())
        .addColumn("permissions", "text", (c) => c.notNull())
        .addColumn("description", "text")
        .addColumn("created_at", "text", (c) => c.notNull())
        .addColumn("revoked_at", "text")
        .execute();
      await db.schema
        .createTable("microvms")
        .addColumn("id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull().references("tenants.id"))
        .addColumn("image_name", "text", (c) => c.notNull())
        .addColumn("image_id", "text", (c) => c.notNull())
        .addColumn("state", "text", (c) => c.notNull())
        .addColumn("state_reason", "text")
        .addColumn("vcpus", "integer", (c) => c.notNull())
        .addColumn("memory_mib", "integer", (c) => c.notNull())
        .addColumn("disk_gib", "integer", (c) => c.notNull())
        .addColumn("env", "text", (c) => c.notNull())
        .addColumn("suspend_after_seconds", "integer", (c) => c.notNull())
        .addColumn("auto_resume", "integer", (c) => c.notNull())
        .addColumn("max_runtime_seconds", "integer", (c) => c.notNull())
        .addColumn("egress", "text", (c) => c.notNull())
        .addColumn("endpoint_public", "integer", (c) => c.notNull())
        .addColumn("endpoint_token", "text", (c) => c.notNull())
        .addColumn("metadata", "text", (c) => c.notNull())
        .addColumn("created_at", "text", (c) => c.notNull())
        .addColumn("expires_at", "text", (c) => c.notNull())
        .addColumn("last_activity_at", "text", (c) => c.notNull())
        .addColumn("terminated_at", "text")
        .execute();
      await db.schema.createIndex("microvms_tenant_created").on("microvms").columns(["tenant_id", "created_at", "id"]).execute();
      await db.schema
        .createTable("events")
        .addColumn("id", types(db).serialId, (c) => (types(db).autoIncrement ? c.primaryKey().autoIncrement() : c.primaryKey()))
        .addColumn("microvm_id", "text", (c) => c.notNull())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("type", "text", (c) => c.notNull())
        .addColumn("message", "text", (c) => c.notNull())
        .addColumn("at", "text", (c) => c.notNull())
        .execute();
      await db.schema.createIndex("events_microvm").on("events").columns(["microvm_id", "id"]).execute();
    },
  },
  "0003_microvm_app_port": {
    async up(db: Kysely<unknown>) {
      // The guest port the endpoint router forwards to (the image's EXPOSE, or the create request's appPort).
      await db.schema.alterTable("microvms").addColumn("app_port", "integer").execute();
    },
  },
  // ---- images (issue #5) ----
  "0002_images": {
    async up(db: Kysely<unknown>) {
      await db.schema
        .createTable("images")
        .addColumn("id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull().references("tenants.id"))
        .addColumn("name", "text", (c) => c.notNull())
        .addColumn("version", "integer", (c) => c.notNull())
        .addColumn("state", "text", (c) => c.notNull())
        .addColumn("state_reason", "text")
        .addColumn("created_at", "text", (c) => c.notNull())
        .addColumn("ready_at", "text")
        .addColumn("size_bytes", types(db).bytes, (c) => c.notNull())
        .addColumn("disk_bytes", types(db).bytes, (c) => c.notNull())
        .addColumn("memory_bytes", types(db).bytes, (c) => c.notNull())
        .addColumn("app_port", "integer")
        .addColumn("vcpus", "integer", (c) => c.notNull())
        .addColumn("memory_mib", "integer", (c) => c.notNull())
        .addColumn("disk_gib", "integer", (c) => c.notNull())
        .addColumn("dockerfile_digest", "text", (c) => c.notNull())
        .addColumn("code_digest", "text", (c) => c.notNull())
        .addColumn("code_source", "text", (c) => c.notNull())
        .addColumn("parent_image_id", "text")
        .addColumn("config", "text", (c) => c.notNull())
        .addColumn("build_ms", "integer")
        .execute();
      await db.schema.createIndex("images_tenant_name").on("images").columns(["tenant_id", "name", "version"]).unique().execute();
    },
  },
  // ---- host-side trust boundaries (issue #12) ----
  "0005_tenant_settings": {
    async up(db: Kysely<unknown>) {
      // JSON object of the settings an admin sets per tenant (store/tenants.ts TenantSettings), e.g. {"s3Allow": ["bucket/prefix/"]}.
      await db.schema.alterTable("tenants").addColumn("settings", "text", (c) => c.notNull().defaultTo("{}")).execute();
    },
  },
  // ---- the AWS front door (issue #13); each column serves both APIs ----
  "0006_keys_sealed_secret_vm_policies_image_versions": {
    async up(db: Kysely<unknown>) {
      // The key's secret sealed with the server's master key (SigV4 needs the secret itself); null for keys made before.
      await db.schema.alterTable("api_keys").addColumn("secret_sealed", "text").execute();
      // idlePolicy.terminateAfterSuspendedSeconds (0 = never) and when the VM was last suspended.
      await db.schema.alterTable("microvms").addColumn("terminate_after_suspended_seconds", "integer", (c) => c.notNull().defaultTo(0)).execute();
      await db.schema.alterTable("microvms").addColumn("suspended_at", "text").execute();
      // JSON array of the named egress connectors the VM's policy came from (null: a policy given directly).
      await db.schema.alterTable("microvms").addColumn("egress_connectors", "text").execute();
      // JSON lifecycle hooks (images/hooks.ts) copied from the image at launch, and the image's version.
      await db.schema.alterTable("microvms").addColumn("hooks", "text").execute();
      await db.schema.alterTable("microvms").addColumn("image_version", "integer").execute();
      // ACTIVE | INACTIVE: an inactive version is never launched.
      await db.schema.alterTable("images").addColumn("status", "text", (c) => c.notNull().defaultTo("ACTIVE")).execute();
      await db.schema.alterTable("images").addColumn("hooks", "text").execute();
      await db.schema.alterTable("images").addColumn("description", "text").execute();
      // The managed image the build started from when one was named (baseImage / baseImageArn).
      await db.schema.alterTable("images").addColumn("base_image", "text").execute();
      // JSON array: default egress connectors of the image's VMs.
      await db.schema.alterTable("images").addColumn("egress_connectors", "text").execute();
      // JSON object: AWS fields accepted and echoed back but not acted on (docs/aws-api.md).
      await db.schema.alterTable("images").addColumn("aws_fields", "text").execute();
    },
  },
  "0007_idempotency_tags_connectors": {
    async up(db: Kysely<unknown>) {
      // clientToken idempotency: one resource per tenant, operation and token.
      await db.schema
        .createTable("idempotency_tokens")
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("operation", "text", (c) => c.notNull())
        .addColumn("token", "text", (c) => c.notNull())
        .addColumn("request_digest", "text", (c) => c.notNull())
        .addColumn("resource_id", "text", (c) => c.notNull())
        .addColumn("created_at", "text", (c) => c.notNull())
        .addPrimaryKeyConstraint("idempotency_tokens_pk", ["tenant_id", "operation", "token"])
        .execute();
      await db.schema.createIndex("idempotency_tokens_created").on("idempotency_tokens").column("created_at").execute();
      await db.schema
        .createTable("tags")
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("resource_type", "text", (c) => c.notNull())
        .addColumn("resource_id", "text", (c) => c.notNull())
        .addColumn("key", "text", (c) => c.notNull())
        .addColumn("value", "text", (c) => c.notNull())
        .addPrimaryKeyConstraint("tags_pk", ["tenant_id", "resource_type", "resource_id", "key"])
        .execute();
      // Named egress policies an operator defines (admin); VMs refer to them by name.
      await db.schema
        .createTable("network_connectors")
        .addColumn("name", "text", (c) => c.primaryKey())
        .addColumn("allow", "text", (c) => c.notNull())
        .addColumn("description", "text")
        .addColumn("created_at", "text", (c) => c.notNull())
        .execute();
    },
  },
  // ---- budgets outside admission (issue #12) ----
  "0008_base_shapes": {
    async up(db: Kysely<unknown>) {
      // Shapes (vCPUs, memory) of managed images snapshotted beyond the default, and the tenant that first asked for each (its quota).
      await db.schema
        .createTable("base_shapes")
        .addColumn("image_name", "text", (c) => c.notNull())
        .addColumn("vcpus", "integer", (c) => c.notNull())
        .addColumn("memory_mib", "integer", (c) => c.notNull())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("created_at", "text", (c) => c.notNull())
        .addPrimaryKeyConstraint("base_shapes_pk", ["image_name", "vcpus", "memory_mib"])
        .execute();
    },
  },
  // ---- registry credentials (issue #16) ----
  "0004_registry_credentials": {
    async up(db: Kysely<unknown>) {
      await db.schema
        .createTable("registry_credentials")
        .addColumn("tenant_id", "text", (c) => c.notNull().references("tenants.id"))
        .addColumn("host", "text", (c) => c.notNull())
        .addColumn("username", "text", (c) => c.notNull())
        .addColumn("password_sealed", "text", (c) => c.notNull())
        .addColumn("created_at", "text", (c) => c.notNull())
        .addColumn("updated_at", "text", (c) => c.notNull())
        .addPrimaryKeyConstraint("registry_credentials_pk", ["tenant_id", "host"])
        .execute();
    },
  },
  // ---- many hosts (issue #15; docs/cluster.md). Written on SQLite too, used only on PostgreSQL ----
  "0009_cluster_nodes": {
    async up(db: Kysely<unknown>) {
      const pg = isPostgres(db);
      // Lease times are the database's clock (now()), never a node's: a timestamp type on PostgreSQL.
      const time = pg ? "timestamptz" : "text";
      await db.schema
        .createTable("nodes")
        .addColumn("id", "text", (c) => c.primaryKey())
        // The internal URL other nodes proxy to (COCOON_NODE_URL).
        .addColumn("url", "text", (c) => c.notNull())
        // Raised at every registration: a write made under an older epoch is a fenced node's and matches nothing.
        .addColumn("epoch", "integer", (c) => c.notNull())
        // active | draining | dead
        .addColumn("state", "text", (c) => c.notNull())
        .addColumn("state_reason", "text")
        // What a snapshot needs of the node that restores it (snapshots move only between identical builds).
        .addColumn("qemu_build", "text", (c) => c.notNull())
        .addColumn("accelerator", "text", (c) => c.notNull())
        .addColumn("cpu_signature", "text", (c) => c.notNull())
        // Capacity for live VMs, and what the node's image builds hold of it now (refreshed with the lease).
        .addColumn("vcpus", "integer", (c) => c.notNull())
        .addColumn("memory_mib", "integer", (c) => c.notNull())
        .addColumn("build_vcpus", "integer", (c) => c.notNull().defaultTo(0))
        .addColumn("build_memory_mib", "integer", (c) => c.notNull().defaultTo(0))
        .addColumn("registered_at", time, (c) => c.notNull())
        .addColumn("lease_expires_at", time, (c) => c.notNull())
        .execute();
      // The node that owns a VM and the epoch it owned it at: every state write is conditional on both.
      await db.schema.alterTable("microvms").addColumn("node_id", "text").execute();
      await db.schema.alterTable("microvms").addColumn("node_epoch", "integer").execute();
      await db.schema.createIndex("microvms_node").on("microvms").columns(["node_id", "state"]).execute();
      // The node that builds and holds an image version (its files are on that node's disk).
      await db.schema.alterTable("images").addColumn("node_id", "text").execute();
    },
  },
  // ---- named snapshots and forks (issue #17) ----
  "0017_snapshots_forks": {
    async up(db: Kysely<unknown>) {
      // An image that is a snapshot of a running microVM names it; a forked microVM names its parent.
      await db.schema.alterTable("images").addColumn("source_microvm_id", "text").execute();
      await db.schema.alterTable("microvms").addColumn("forked_from", "text").execute();
    },
  },
  // ---- persistent volumes (issue #17) ----
  "0018_volumes": {
    async up(db: Kysely<unknown>) {
      await db.schema
        .createTable("volumes")
        .addColumn("id", "text", (c) => c.primaryKey())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("name", "text", (c) => c.notNull())
        .addColumn("size_gib", "integer", (c) => c.notNull())
        .addColumn("created_at", "text", (c) => c.notNull())
        .execute();
      await db.schema.createIndex("volumes_tenant_name").on("volumes").columns(["tenant_id", "name"]).unique().execute();
      await db.schema
        .createTable("volume_attachments")
        .addColumn("volume_id", "text", (c) => c.notNull())
        .addColumn("microvm_id", "text", (c) => c.notNull())
        .addColumn("tenant_id", "text", (c) => c.notNull())
        .addColumn("slot", "integer", (c) => c.notNull())
        .addColumn("path", "text", (c) => c.notNull())
        .addColumn("read_only", "integer", (c) => c.notNull())
        .addPrimaryKeyConstraint("volume_attachments_pk", ["microvm_id", "slot"])
        .execute();
      await db.schema.createIndex("volume_attachments_volume").on("volume_attachments").columns(["volume_id"]).execute();
    },
  },
  // ---- suspended VMs in the object store (issue #15 step 5; docs/cluster.md) ----
  "0019_suspended_objects": {
    async up(db: Kysely<unknown>) {
      // The node whose disk holds a suspended VM's files, and the object-store prefix they are published under once complete.
      await db.schema.alterTable("microvms").addColumn("suspended_node", "text").execute();
      await db.schema.alterTable("microvms").addColumn("suspended_object", "text").execute();
      // The sha256 of its manifest: a bundle read back must be the one published (the bucket is not trusted).
      await db.schema.alterTable("microvms").addColumn("suspended_manifest", "text").execute();
    },
  },
  "0020_image_objects": {
    async up(db: Kysely<unknown>) {
      // Cluster: the object-store prefix an image's snapshot is published under, and its manifest's sha256 (what a pull trusts).
      await db.schema.alterTable("images").addColumn("snapshot_object", "text").execute();
      await db.schema.alterTable("images").addColumn("snapshot_manifest", "text").execute();
      // Managed images' snapshots built once per cluster (images/cluster-snapshots.ts): where each is published, by whom.
      await db.schema
        .createTable("cluster_snapshots")
        .addColumn("name", "text", (c) => c.notNull())
        .addColumn("key", "text", (c) => c.notNull())
        .addColumn("object", "text", (c) => c.notNull())
        .addColumn("manifest", "text", (c) => c.notNull())
        .addColumn("node_id", "text", (c) => c.notNull())
        .addColumn("created_at", "text", (c) => c.notNull())
        .addPrimaryKeyConstraint("cluster_snapshots_pk", ["name", "key"])
        .execute();
    },
  },
  // ---- restore from the last durable suspend when a node fails (issue #15 item 6; docs/cluster.md) ----
  "0021_restore_points": {
    async up(db: Kysely<unknown>) {
      // What becomes of a running VM whose node fails: "fail" (FAILED) or "restore" (from its restore point).
      await db.schema.alterTable("microvms").addColumn("on_node_failure", "text", (c) => c.notNull().defaultTo("fail")).execute();
      // An opted-in VM's last published suspend, kept while it runs: the prefix, its manifest's sha256, and when it was suspended.
      await db.schema.alterTable("microvms").addColumn("restore_object", "text").execute();
      await db.schema.alterTable("microvms").addColumn("restore_manifest", "text").execute();
      await db.schema.alterTable("microvms").addColumn("restore_point_at", "text").execute();
    },
  },
};
