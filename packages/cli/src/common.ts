import { InvalidArgumentError, type Command } from "commander";
import type { GlobalOpts } from "./config.ts";

/** An error meant for the user as is: printed as `cocoon: <message>`, exit status 1. */
export class CliError extends Error {}

/** The root program's options (--url, --api-key, --json), wherever on the line they were given. */
export function globals(cmd: Command): GlobalOpts {
  return cmd.optsWithGlobals<GlobalOpts>();
}

/** Commander parser for a non-negative integer option. */
export function intOption(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n)) throw new InvalidArgumentError("expected a whole number");
  return n;
}

/** Commander parser for a repeatable KEY=VALUE option, collected into an object. */
export function keyValue(value: string, previous: Record<string, string> | undefined): Record<string, string> {
  const eq = value.indexOf("=");
  if (eq <= 0) throw new InvalidArgumentError("expected KEY=VALUE");
  return { ...previous, [value.slice(0, eq)]: value.slice(eq + 1) };
}

/** Commander parser for a repeatable option, collected into an array. */
export function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}
