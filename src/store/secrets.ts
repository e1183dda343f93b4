import { randomBytes } from "node:crypto";
import type { Db } from "./db.ts";

/**
 * The server secret `name` (32 random bytes), created on first use. Several
 * hosts starting at once agree: the first insert wins, the others read it.
 */
export async function serverSecret(db: Db, name: string): Promise<Buffer> {
  await db
    .insertInto("server_secrets")
    .values({ name, value: randomBytes(32).toString("base64") })
    .onConflict((oc) => oc.column("name").doNothing())
    .execute();
  const row = await db.selectFrom("server_secrets").select("value").where("name", "=", name).executeTakeFirstOrThrow();
  return Buffer.from(row.value, "base64");
}
