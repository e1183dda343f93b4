import type { Kysely, Migration } from "kysely";

/**
 * Versioned schema migrations, applied in name order and recorded by Kysely's
 * Migrator. Only portable DDL is used, so a PostgreSQL dialect can run them too.
 * Never edit a released migration: add a new one.
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
        .addColumn("id", "integer", (c) => c.primaryKey().autoIncrement())
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
        .addColumn("size_bytes", "integer", (c) => c.notNull())
        .addColumn("disk_bytes", "integer", (c) => c.notNull())
        .addColumn("memory_bytes", "integer", (c) => c.notNull())
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
  "0004_server_secrets": {
    async up(db: Kysely<unknown>) {
      // Secrets every host of a deployment shares (e.g. the key that signs endpoint access tokens), created on first start.
      await db.schema
        .createTable("server_secrets")
        .addColumn("name", "text", (c) => c.primaryKey())
        .addColumn("value", "text", (c) => c.notNull())
        .execute();
    },
  },
};
