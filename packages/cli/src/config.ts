import { readFile } from "node:fs/promises";
import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { CocoonClient } from "@cocoon/sdk";

/** Options every command accepts (defined on the root program). */
export interface GlobalOpts {
  url?: string;
  apiKey?: string;
  json?: boolean;
}

/** The server's data directory, where it writes `admin.key`: COCOON_DATA_DIR, else ~/.cocoon (docs/api.md). */
export function dataDir(): string {
  return resolve(process.env.COCOON_DATA_DIR ?? join(homedir(), ".cocoon"));
}

/** Where the API key came from, for error hints. */
export type KeySource = "--api-key" | "COCOON_API_KEY" | "admin.key" | "none";

/** --api-key, then COCOON_API_KEY, then `<data-dir>/admin.key` (readable only on the server's host, by its user). */
export async function resolveApiKey(opts: GlobalOpts): Promise<{ apiKey?: string; source: KeySource }> {
  if (opts.apiKey) return { apiKey: opts.apiKey, source: "--api-key" };
  if (process.env.COCOON_API_KEY) return { apiKey: process.env.COCOON_API_KEY, source: "COCOON_API_KEY" };
  const fromFile = await readFile(join(dataDir(), "admin.key"), "utf8").catch(() => "");
  if (fromFile.trim()) return { apiKey: fromFile.trim(), source: "admin.key" };
  return { source: "none" };
}

/** A client for --url / COCOON_URL (default http://127.0.0.1:7070) with the resolved key. */
export async function makeClient(opts: GlobalOpts): Promise<{ client: CocoonClient; keySource: KeySource }> {
  const { apiKey, source } = await resolveApiKey(opts);
  return { client: new CocoonClient({ baseUrl: opts.url ?? process.env.COCOON_URL, apiKey }), keySource: source };
}
