import type { Command } from "commander";
import { makeClient } from "../config.ts";
import { collect, globals } from "../common.ts";
import { age, printFields, printJson, printTable } from "../output.ts";

/** `cocoon key …` and `cocoon tenant …` (admin key). */
export function registerAdminCommands(program: Command): void {
  const key = program.command("key").description("API keys (admin)");

  key
    .command("create")
    .description("create an API key for a tenant; the secret is shown once")
    .requiredOption("--tenant <tenant>", "tenant id or name")
    .option("-p, --permission <permission>", "e.g. microvm:*, image:read, admin:* (repeatable; default microvm:* and image:read)", collect)
    .option("--description <text>", "what the key is for")
    .action(async (o: { tenant: string; permission?: string[]; description?: string }, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const permissions = o.permission ?? ["microvm:*", "image:read"];
      const created = await client.keys.create({ tenant: o.tenant, permissions, description: o.description });
      if (g.json) return printJson(created);
      printFields([
        ["key id", created.keyId],
        ["tenant", created.tenantId],
        ["permissions", created.permissions.join(" ")],
        ["api key", created.apiKey],
      ]);
      process.stderr.write("the API key is shown only this once: store it now\n");
    });

  key
    .command("ls")
    .alias("list")
    .description("list API keys (never their secrets)")
    .action(async (_o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const keys = await client.keys.list();
      if (g.json) return printJson(keys);
      printTable(
        ["KEY ID", "TENANT", "PERMISSIONS", "CREATED", "REVOKED", "DESCRIPTION"],
        keys.map((k) => [k.keyId, k.tenantId, k.permissions.join(" "), `${age(k.createdAt)} ago`, k.revokedAt ? `${age(k.revokedAt)} ago` : "", k.description ?? ""]),
      );
    });

  key
    .command("rm")
    .alias("revoke")
    .description("revoke an API key (effective on its next request)")
    .argument("<key-id>", "key id")
    .action(async (keyId: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      await client.keys.revoke(keyId);
      if (g.json) return printJson({ keyId, revoked: true });
      process.stdout.write(`${keyId}\n`);
    });

  const tenant = program.command("tenant").description("tenants (admin)");
  tenant
    .command("create")
    .description("create a tenant")
    .argument("<name>", "1-64 of A-Z a-z 0-9 . _ -")
    .action(async (name: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const created = await client.tenants.create({ name });
      if (g.json) return printJson(created);
      printFields([
        ["tenant id", created.tenantId],
        ["name", created.name],
      ]);
    });
}
