import { readFile } from "node:fs/promises";
import type { Command } from "commander";
import type { ImageInfo, ImageState } from "@cocoon/sdk";
import { makeClient } from "../config.ts";
import { CliError, globals } from "../common.ts";
import { age, printFields, printJson, printTable, seconds, withProgress } from "../output.ts";

/** `cocoon image …`: images over the API. */
export function registerImageCommands(program: Command): void {
  const image = program.command("image").description("build and inspect images");

  image
    .command("ls")
    .alias("list")
    .description("list images")
    .action(async (_o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const images = await client.images.list();
      if (g.json) return printJson(images);
      printTable(
        ["ID", "NAME", "STATE", "SIZE", "CREATED"],
        images.map((i) => [i.imageId, i.name, i.state, i.sizeBytes === undefined ? "" : `${Math.round(i.sizeBytes / 2 ** 20)} MiB`, `${age(i.createdAt)} ago`]),
      );
    });

  image
    .command("get")
    .alias("inspect")
    .description("describe an image")
    .argument("<id-or-name>", "image id or name")
    .action(async (idOrName: string, _o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const { client } = await makeClient(g);
      const found = await client.images.get(idOrName);
      if (g.json) return printJson(found);
      printImage(found);
    });

  image
    .command("create")
    .description("build an image from a Dockerfile and the code as a .zip, and wait until it is READY")
    .requiredOption("--name <name>", "image name")
    .requiredOption("--dockerfile <file>", "the Dockerfile")
    .option("--code <zip>", "the build context as a .zip file")
    .option("--code-uri <uri>", "instead of --code: s3://bucket/key, https://… or file://… (server-local, admin only)")
    .option("--no-wait", "return once the build has started")
    .action(async (o: { name: string; dockerfile: string; code?: string; codeUri?: string; wait: boolean }, cmd: Command) => {
      const g = globals(cmd);
      if (Boolean(o.code) === Boolean(o.codeUri)) throw new CliError("image create needs exactly one of --code ZIP and --code-uri URI");
      const dockerfile = await readFile(o.dockerfile, "utf8").catch((err: NodeJS.ErrnoException) => {
        throw new CliError(`cannot read the Dockerfile ${o.dockerfile}: ${err.code ?? err.message}`);
      });
      const code = o.code
        ? new Uint8Array(
            await readFile(o.code).catch((err: NodeJS.ErrnoException) => {
              throw new CliError(`cannot read the code archive ${o.code}: ${err.code ?? err.message}`);
            }),
          )
        : undefined;
      const { client } = await makeClient(g);
      const { result: started } = await withProgress(`uploading ${o.name}`, () => client.images.create({ name: o.name, dockerfile, code, codeUri: o.codeUri }));
      let final = started;
      let elapsedMs = 0;
      if (o.wait && started.state !== "READY") {
        let state: ImageState = started.state;
        ({ result: final, elapsedMs } = await withProgress(`building ${o.name}`, () =>
          client.images.waitUntilReady(started.imageId, {
            onPoll: (i) => {
              // Without a terminal there is no spinner: say each state change once instead.
              if (i.state !== state && !process.stderr.isTTY && !g.json) process.stderr.write(`${i.name}: ${i.state}\n`);
              state = i.state;
            },
          }),
        ));
      }
      if (g.json) return printJson(final);
      printImage(final);
      if (elapsedMs) process.stderr.write(`built in ${seconds(elapsedMs)}\n`);
    });
}

function printImage(i: ImageInfo): void {
  printFields([
    ["id", i.imageId],
    ["name", i.name],
    ["state", i.stateReason ? `${i.state} (${i.stateReason})` : i.state],
    ["created", i.createdAt],
    ["ready", i.readyAt],
    ["size", i.sizeBytes === undefined ? undefined : `${i.sizeBytes} bytes`],
    ["app port", i.appPort],
    ["dockerfile digest", i.dockerfileDigest],
    ["code digest", i.codeDigest],
  ]);
}
