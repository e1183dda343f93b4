import { join } from "node:path";
import type { Db } from "../store/db.ts";
import { serialized } from "../store/locks.ts";
import type { ServerSecrets } from "../store/secrets.ts";
import { createApiKey, createTenant, findTenant, hasAdminKey } from "../store/tenants.ts";
import { writeFileAtomic } from "../util/files.ts";

/**
 * On first start (no live admin key), creates the `admin` tenant and an admin
 * key, writes it to `<dataDir>/admin.key` (0600) and returns it to be printed
 * once. Returns undefined when an admin key already exists.
 */
export async function bootstrapAdminKey(db: Db, secrets: ServerSecrets, dataDir: string): Promise<string | undefined> {
  // Servers of a cluster may start together: one of them makes the key.
  return serialized(db, "bootstrap-admin-key", async () => {
    if (await hasAdminKey(db)) return undefined;
    const tenant = (await findTenant(db, "admin")) ?? (await createTenant(db, "admin"));
    const { apiKey } = await createApiKey(db, secrets, { tenantId: tenant.id, permissions: ["admin:*"], description: "bootstrap admin key" });
    await writeFileAtomic(join(dataDir, "admin.key"), `${apiKey}\n`, 0o600);
    return apiKey;
  });
}
