import { DockerfileParser, type Instruction } from "dockerfile-ast";
import { posix } from "node:path";
import { ApiError } from "../errors.ts";

/** What an image runs and how it is configured: inherited by `FROM <cocoon image>`. */
export interface ImageConfig {
  env: Record<string, string>;
  workdir: string;
  user: string;
  /** ENTRYPOINT + CMD; empty when the image has no app. */
  argv: string[];
  entrypoint: string[];
  cmd: string[];
  appPort?: number;
  healthcheck?: Healthcheck;
  labels: Record<string, string>;
}

export interface Healthcheck {
  /** argv (CMD exec form) or a shell string (CMD shell form). */
  command: string[] | string;
  intervalMs: number;
  timeoutMs: number;
  startPeriodMs: number;
  retries: number;
}

/** Where the build starts from. */
export type BaseRef = { kind: "debian" } | { kind: "scratch" } | { kind: "image"; name: string };

export type BuildStep =
  | { kind: "run"; line: number; text: string; command: string[] | string; env: Record<string, string>; cwd: string; user: string }
  | { kind: "copy"; line: number; text: string; add: boolean; sources: string[]; dest: string; chown?: string }
  | { kind: "workdir"; line: number; text: string; path: string };

export interface BuildPlan {
  base: BaseRef;
  fromLine: number;
  steps: BuildStep[];
  config: ImageConfig;
}

export const EMPTY_CONFIG: ImageConfig = { env: {}, workdir: "/", user: "root", argv: [], entrypoint: [], cmd: [], labels: {} };

/** Build args Docker predefines (proxies); allowed without an ARG line. */
const PREDEFINED_ARGS = new Set(["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy", "NO_PROXY", "no_proxy"]);
const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

function lineError(line: number, message: string): never {
  throw new ApiError("ValidationError", `Dockerfile line ${line}: ${message}`, { field: "dockerfile", line });
}

/**
 * Parses a Dockerfile (dockerfile-ast) into a build plan, refusing anything
 * Cocoon cannot build — with the line number — before any build starts.
 * `parentConfig` gives the config of a READY Cocoon image by name (FROM
 * <image>), undefined if there is none.
 */
export function planDockerfile(
  text: string,
  opts: { buildArgs?: Record<string, string>; parentConfig: (name: string) => ImageConfig | undefined },
): BuildPlan {
  const buildArgs = opts.buildArgs ?? {};
  const df = DockerfileParser.parse(text);
  const instructions = df.getInstructions();
  // Args declared before FROM only serve FROM itself.
  const globalArgs: Record<string, string> = {};
  let i = 0;
  for (; i < instructions.length && instructions[i]!.getKeyword() === "ARG"; i++) {
    const [name, value] = argOf(instructions[i]!, buildArgs, {});
    if (value !== undefined) globalArgs[name] = value;
  }
  const from = instructions[i];
  if (!from) lineError(1, "no FROM instruction");
  if (from.getKeyword() !== "FROM") lineError(lineOf(from), `expected FROM, found ${from.getKeyword()}`);
  const fromArgs = from.getArguments().map((a) => expand(a.getValue(), globalArgs, lineOf(from)));
  if (fromArgs.some((a) => a.startsWith("--"))) lineError(lineOf(from), "FROM flags (--platform) are not supported");
  if (fromArgs.length !== 1) lineError(lineOf(from), "named build stages (FROM … AS name) are not supported: one stage per image");
  const image = fromArgs[0]!;
  let base: BaseRef;
  let config: ImageConfig;
  if (/^debian:(bookworm|bookworm-slim|12|12-slim)$/.test(image) || image === "base") {
    base = { kind: "debian" };
    config = structuredClone({ ...EMPTY_CONFIG, env: { PATH: DEFAULT_PATH } });
  } else if (image === "scratch") {
    base = { kind: "scratch" };
    config = structuredClone(EMPTY_CONFIG);
  } else {
    const name = image.replace(/:latest$/, "");
    const parent = /^[a-z0-9][a-z0-9._-]*$/.test(name) ? opts.parentConfig(name) : undefined;
    if (!parent) {
      lineError(
        lineOf(from),
        `FROM ${image}: only debian:bookworm, debian:bookworm-slim, scratch or a READY Cocoon image of yours can be a base (registry pulls are not supported)`,
      );
    }
    base = { kind: "image", name };
    config = structuredClone(parent);
  }

  const args: Record<string, string> = {};
  const steps: BuildStep[] = [];
  const vars = () => ({ ...args, ...config.env });
  for (const ins of instructions.slice(i + 1)) {
    const line = lineOf(ins);
    const keyword = ins.getKeyword();
    const content = ins.getArgumentsContent() ?? "";
    const textOf = `${keyword} ${content}`.trim();
    switch (keyword) {
      case "FROM":
        lineError(line, "multi-stage builds are not supported: one FROM per Dockerfile");
      // falls through (lineError never returns)
      case "RUN": {
        if (flagsOf(ins).length) lineError(line, `RUN flags (${flagsOf(ins).join(", ")}) are not supported`);
        if (!content.trim()) lineError(line, "RUN needs a command");
        // ARG values are in the environment of RUN (not of the image), like Docker.
        steps.push({ kind: "run", line, text: textOf, command: commandOf(content, line), env: { ...args, ...config.env }, cwd: config.workdir, user: config.user });
        break;
      }
      case "COPY":
      case "ADD": {
        const flags = flagMap(ins, line, keyword === "COPY" ? ["chown", "chmod"] : ["chown", "chmod"]);
        if (flags.chmod !== undefined) lineError(line, `${keyword} --chmod is not supported`);
        let parts = jsonArray(content) ?? ins.getArguments().map((a) => a.getValue());
        parts = parts.filter((p) => !p.startsWith("--")).map((p) => expand(p, vars(), line));
        if (parts.length < 2) lineError(line, `${keyword} needs at least one source and a destination`);
        const dest = parts.at(-1)!;
        const sources = parts.slice(0, -1);
        for (const s of sources) {
          if (/^[a-z][a-z0-9+.-]*:\/\//i.test(s)) lineError(line, `${keyword} from a URL (${s}) is not supported: put the file in the code archive`);
          const n = posix.normalize(s.replace(/^\/+/, ""));
          if (n === ".." || n.startsWith("../")) lineError(line, `${keyword} source ${s} is outside the build context`);
        }
        // posix.join keeps a trailing slash: "dir/" stays a directory destination.
        const absDest = dest.startsWith("/") ? dest : posix.join(config.workdir, dest);
        steps.push({
          kind: "copy",
          line,
          text: textOf,
          add: keyword === "ADD",
          sources: sources.map((s) => posix.normalize(s.replace(/^\/+/, "")).replace(/(.)\/+$/, "$1") || "."),
          dest: sources.length > 1 && !absDest.endsWith("/") ? `${absDest}/` : absDest,
          chown: flags.chown ? expand(flags.chown, vars(), line) : undefined,
        });
        break;
      }
      case "ENV": {
        const props = (ins as unknown as { getProperties(): { getName(): string; getValue(): string | null }[] }).getProperties();
        if (!props.length) lineError(line, "ENV needs NAME=value");
        const before = vars();
        for (const p of props) config.env[p.getName()] = expand(unquote(p.getValue() ?? ""), before, line);
        break;
      }
      case "ARG": {
        const [name, value] = argOf(ins, buildArgs, globalArgs);
        if (value !== undefined) args[name] = expand(value, vars(), line);
        break;
      }
      case "WORKDIR": {
        const path = expand(unquote(content.trim()), vars(), line);
        if (!path) lineError(line, "WORKDIR needs a path");
        config.workdir = posix.resolve(config.workdir, path);
        steps.push({ kind: "workdir", line, text: textOf, path: config.workdir });
        break;
      }
      case "USER": {
        const user = expand(content.trim(), vars(), line);
        if (!/^[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?$/.test(user)) lineError(line, `USER ${user} is not a user name or uid`);
        config.user = user.split(":")[0]!;
        break;
      }
      case "EXPOSE": {
        const ports = ins.getArguments().map((a) => expand(a.getValue(), vars(), line));
        const tcp = ports.filter((p) => !p.endsWith("/udp")).map((p) => Number(p.replace(/\/tcp$/, "")));
        if (!ports.length || tcp.some((p) => !Number.isInteger(p) || p < 1 || p > 65535)) lineError(line, `EXPOSE needs ports between 1 and 65535, got ${content}`);
        // The first TCP port is the app's (the endpoint forwards to it).
        config.appPort ??= tcp[0];
        break;
      }
      case "CMD":
        config.cmd = execOrShell(content, line);
        break;
      case "ENTRYPOINT":
        config.entrypoint = execOrShell(content, line);
        config.cmd = []; // Docker resets CMD when ENTRYPOINT is set
        break;
      case "HEALTHCHECK": {
        const sub = content.trim();
        if (/^NONE$/i.test(sub)) {
          config.healthcheck = undefined;
          break;
        }
        const flags = flagMap(ins, line, ["interval", "timeout", "start-period", "start-interval", "retries"]);
        const m = /^(?:--\S+\s+)*CMD\s+([\s\S]+)$/i.exec(sub);
        if (!m) lineError(line, "HEALTHCHECK needs CMD <command> or NONE");
        config.healthcheck = {
          command: commandOf(m[1]!, line),
          intervalMs: durationMs(flags.interval, 1000, line),
          timeoutMs: durationMs(flags.timeout, 10_000, line),
          startPeriodMs: durationMs(flags["start-period"], 0, line),
          retries: flags.retries === undefined ? 3 : positiveInt(flags.retries, "--retries", line),
        };
        break;
      }
      case "LABEL": {
        const props = (ins as unknown as { getProperties(): { getName(): string; getValue(): string | null }[] }).getProperties();
        for (const p of props) config.labels[unquote(p.getName())] = expand(unquote(p.getValue() ?? ""), vars(), line);
        break;
      }
      case "MAINTAINER":
        config.labels.maintainer = content.trim();
        break;
      default:
        lineError(line, `${keyword} is not supported (supported: FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, EXPOSE, CMD, ENTRYPOINT, HEALTHCHECK, LABEL)`);
    }
  }
  const unknownArgs = Object.keys(buildArgs).filter((k) => !(k in args) && !(k in globalArgs) && !PREDEFINED_ARGS.has(k));
  if (unknownArgs.length) {
    throw new ApiError("ValidationError", `build args ${unknownArgs.join(", ")} are not declared by an ARG in the Dockerfile`, { field: "buildArgs" });
  }
  config.argv = [...config.entrypoint, ...config.cmd];
  return { base, fromLine: lineOf(from), steps, config };
}

const lineOf = (ins: Instruction) => ins.getRange().start.line + 1;

function flagsOf(ins: Instruction): string[] {
  const f = (ins as unknown as { getFlags?: () => { getName(): string }[] }).getFlags;
  return f ? f.call(ins).map((x) => `--${x.getName()}`) : [];
}

function flagMap(ins: Instruction, line: number, allowed: string[]): Record<string, string | undefined> {
  const f = (ins as unknown as { getFlags?: () => { getName(): string; getValue(): string | null }[] }).getFlags;
  const out: Record<string, string | undefined> = {};
  for (const flag of f ? f.call(ins) : []) {
    if (!allowed.includes(flag.getName())) lineError(line, `${ins.getKeyword()} flag --${flag.getName()} is not supported`);
    out[flag.getName()] = flag.getValue() ?? "";
  }
  return out;
}

function argOf(ins: Instruction, buildArgs: Record<string, string>, globals: Record<string, string>): [string, string | undefined] {
  const prop = (ins as unknown as { getProperty(): { getName(): string; getValue(): string | null } | null }).getProperty();
  if (!prop) lineError(lineOf(ins), "ARG needs a name");
  const name = prop.getName();
  const declared = prop.getValue();
  return [name, buildArgs[name] ?? (declared === null ? globals[name] : unquote(declared))];
}

/** JSON exec form if the arguments are a JSON array of strings, else undefined (Docker's rule). */
function jsonArray(content: string): string[] | undefined {
  const t = content.trim();
  if (!t.startsWith("[")) return undefined;
  try {
    const v = JSON.parse(t) as unknown;
    if (Array.isArray(v) && v.every((x) => typeof x === "string")) return v as string[];
  } catch {
    // shell form after all
  }
  return undefined;
}

function commandOf(content: string, line: number): string[] | string {
  const argv = jsonArray(content);
  if (argv && argv.length === 0) lineError(line, "an empty exec-form command");
  return argv ?? content.trim();
}

function execOrShell(content: string, line: number): string[] {
  const c = commandOf(content, line);
  return typeof c === "string" ? ["/bin/sh", "-c", c] : c;
}

function unquote(v: string): string {
  const t = v.trim();
  if (t.length >= 2 && ((t[0] === '"' && t.at(-1) === '"') || (t[0] === "'" && t.at(-1) === "'"))) {
    return t[0] === '"' ? t.slice(1, -1).replace(/\\(["\\$])/g, "$1") : t.slice(1, -1);
  }
  return t.replace(/\\(.)/g, "$1");
}

/** `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alt}`; `\$` stays a literal `$`. */
export function expand(s: string, vars: Record<string, string>, line: number): string {
  return s.replace(/\\\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)|\$\{[^}]*\}?/g, (m, braced, op, word, bare) => {
    if (m === "\\$") return "$";
    const name = (braced ?? bare) as string | undefined;
    if (!name) lineError(line, `bad variable substitution ${m}`);
    const v = vars[name];
    if (op === "-") return v ? v : (word as string);
    if (op === "+") return v ? (word as string) : "";
    return v ?? "";
  });
}

function durationMs(v: string | undefined, dflt: number, line: number): number {
  if (v === undefined) return dflt;
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h)$/.exec(v);
  if (!m) lineError(line, `bad duration ${v} (e.g. 500ms, 2s, 1m)`);
  return Math.round(Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] as "ms" | "s" | "m" | "h"]);
}

function positiveInt(v: string, flag: string, line: number): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 100) lineError(line, `${flag} must be an integer between 1 and 100`);
  return n;
}
