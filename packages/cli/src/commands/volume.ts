import type { Command } from "commander";
import type { VolumeInfo } from "@cocoon/sdk";
import { makeClient } from "../config.ts";
import { globals, intOption } from "../common.ts";
import { age, printFields, printJson, printTable } from "../output.ts";

/** `cocoon volume …`: persistent volumes over the API (attach one with `cocoon vm create --volume NAME:PATH[:ro]`). */
export function registerVolumeCommands(program: Command): void {
  const volume = program.command("volume").description("create, inspect and delete persistent volumes");

  volume
    .command("create")
    .description("create an empty volume (ext4)")
    .argument("<name>", "volume name, unique in the tenant")
    .requiredOption("--size <GiB>", "size in GiB, 1-32", intOption)
    .action(async (name: string, o: { size: number }, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const created = await client.volumes.create({ name, sizeGiB: o.size });
      if (g.json) return printJson(created);
      printVolume(created);
    });

  volume
    .command("ls")
    .alias("list")
    .description("list volumes")
    .action(async (_o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const volumes = await client.volumes.list();
      if (g.json) return printJson(volumes);
      printTable(
        ["ID", "NAME", "SIZE", "STATE", "ATTACHED TO", "CREATED"],
        volumes.map((v) => [v.volumeId, v.name, `${v.sizeGiB} GiB`, v.state, v.attachedTo.map((a) => a.microVmId).join(","), `${age(v.createdAt)} ago`]),
      );
    });

  volume
    .command("get")
    .alias("inspect")
    .description("describe a volume")
    .argument("<id-or-name>", "volume id or name")
    .action(async (idOrName: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const found = await client.volumes.get(idOrName);
      if (g.json) return printJson(found);
      printVolume(found);
    });

  volume
    .command("rm")
    .alias("delete")
    .description("delete a volume and its data (refused while a microVM holds it)")
    .argument("<id-or-name>", "volume id or name")
    .action(async (idOrName: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const deleted = await client.volumes.delete(idOrName);
      if (g.json) return printJson(deleted);
      process.stdout.write(`${deleted.volumeId} ${deleted.name} deleted\n`);
    });
}

function printVolume(v: VolumeInfo): void {
  printFields([
    ["id", v.volumeId],
    ["name", v.name],
    ["size", `${v.sizeGiB} GiB`],
    ["state", v.state],
    ["attached to", v.attachedTo.map((a) => `${a.microVmId} at ${a.path}${a.readOnly ? " (read-only)" : ""}`).join(", ") || undefined],
    ["created", v.createdAt],
  ]);
}
