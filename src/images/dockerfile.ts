import { DockerfileParser, type Instruction } from "dockerfile-ast";
import { posix } from "node:path";
import { ApiError } from "../errors.ts";
import { hostPlatform } from "./registry/manifest.ts";
import { formatReference, parseImageReference, type ImageReference } from "./registry/reference.ts";

/** What an image runs and how it is configured: inherited by `FROM <image>`. */
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
  /** STOPSIGNAL: what the agent sends the app to stop it (default SIGTERM). */
  stopSignal?: string;
  /** VOLUME paths: created in the image, recorded; they are part of each VM's own disk. */
  volumes?: string[];
  /** SHELL: the shell of shell-form RUN, CMD, ENTRYPOINT and HEALTHCHECK (default /bin/sh -c). */
  shell?: string[];
}

export interface Healthcheck {
  /** argv (CMD exec form) or a shell string (CMD shell form). */
  command: string[] | string;
  intervalMs: number;
  timeoutMs: number;
  startPeriodMs: number;
  retries: number;
}

/** The images Cocoon builds from Debian packages (managed.ts). */
export const MANAGED_NAMES = ["base", "python", "node"] as const;
export type ManagedName = (typeof MANAGED_NAMES)[number];

/** Where a stage starts from. */
export type BaseRef =
  | { kind: "managed"; name: ManagedName }
  | { kind: "scratch" }
  /** A READY image of the tenant, by name. */
  | { kind: "image"; name: string }
  | { kind: "registry"; ref: ImageReference }
  /** An earlier stage of the same Dockerfile. */
  | { kind: "stage"; index: number };

export type BuildStep =
  | { kind: "run"; line: number; text: string; command: string[] | string; stdin?: string; env: Record<string, string>; cwd: string; user: string }
  /** COPY/ADD from the code archive, or (`from`) from what an earlier stage exported. */
  | { kind: "copy"; line: number; text: string; add: boolean; sources: string[]; dest: string; chown?: string; chmod?: string; from?: number }
  /** COPY <<EOF: a file written from the Dockerfile itself. */
  | { kind: "write"; line: number; text: string; dest: string; content: string; chown?: string; chmod?: string }
  | { kind: "mkdir"; line: number; text: string; path: string };

export interface Stage {
  index: number;
  /** `FROM … AS name` (lower case); absent for unnamed stages and for images named by COPY --from. */
  name?: string;
  /** The FROM line (for an image named by COPY --from, that line). */
  line: number;
  base: BaseRef;
  steps: BuildStep[];
  config: ImageConfig;
  /** Paths (relative to /) later stages COPY --from this one; globs allowed. */
  exports: string[];
}

export interface BuildPlan {
  stages: Stage[];
  /** The stage that becomes the image (`target`, default the last). */
  target: number;
  /** The stages to build, dependencies first, ending with the target; stages nothing needs are skipped. */
  order: number[];
  /** The target's config: the image's. */
  config: ImageConfig;
}

export interface PlanOpts {
  buildArgs?: Record<string, string>;
  /** The stage to build (`--target`); default the last. */
  target?: string;
  /** The config of a READY image of the tenant by name, undefined if there is none. */
  parentConfig: (name: string) => ImageConfig | undefined;
  /** The config of a registry image once pulled; before that (at create) a placeholder stands in. */
  registryConfig?: (ref: ImageReference) => ImageConfig | undefined;
}

export const EMPTY_CONFIG: ImageConfig = { env: {}, workdir: "/", user: "root", argv: [], entrypoint: [], cmd: [], labels: {} };
export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const DEFAULT_SHELL = ["/bin/sh", "-c"];
/** HEALTHCHECK defaults when a flag is absent (also for registry images' health checks). */
export const HEALTHCHECK_DEFAULTS = { intervalMs: 1000, timeoutMs: 10_000, startPeriodMs: 0, retries: 3 } as const;

/** Build args Docker predefines (proxies); allowed without an ARG line. */
const PREDEFINED_ARGS = new Set(["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy", "NO_PROXY", "no_proxy"]);
/** BuildKit's platform args: global, so `ARG TARGETARCH` in a stage reads them. */
function platformArgs(): Record<string, string> {
  const { os, architecture } = hostPlatform();
  const platform = `${os}/${architecture}`;
  return { TARGETPLATFORM: platform, TARGETOS: os, TARGETARCH: architecture, TARGETVARIANT: "", BUILDPLATFORM: platform, BUILDOS: os, BUILDARCH: architecture, BUILDVARIANT: "" };
}
const STAGE_NAME = /^[a-z][a-z0-9_.-]{0,62}$/;
const IMAGE_NAME = /^[a-z0-9][a-z0-9._-]*$/;

function lineError(line: number, message: string): never {
  throw new ApiError("ValidationError", `Dockerfile line ${line}: ${message}`, { field: "dockerfile", line });
}

/**
 * Parses a Dockerfile (dockerfile-ast) into stages, refusing anything Cocoon
 * cannot build — with the line number — before any build starts. Called
 * twice per build: at create (registry bases not pulled yet: a placeholder
 * config stands in, so only the syntax is checked) and once every base is
 * pulled (`registryConfig`), when variables expand against the real ENV.
 */
export function planDockerfile(text: string, opts: PlanOpts): BuildPlan {
  const buildArgs = opts.buildArgs ?? {};
  // CRLF line ends (Windows editors; multipart form fields are sent so) would reach heredocs and scripts.
  const instructions = DockerfileParser.parse(text.replace(/\r\n?/g, "\n")).getInstructions();
  // Args declared before the first FROM serve FROM lines and, through ARG, stages.
  const globalArgs: Record<string, string> = platformArgs();
  const declared = new Set<string>();
  let i = 0;
  for (; i < instructions.length && instructions[i]!.getKeyword() === "ARG"; i++) {
    const [name, value] = argOf(instructions[i]!, buildArgs, globalArgs);
    declared.add(name);
    if (value !== undefined) globalArgs[name] = expand(value, globalArgs, lineOf(instructions[i]!));
  }
  if (!instructions[i]) lineError(1, "no FROM instruction");
  if (instructions[i]!.getKeyword() !== "FROM") lineError(lineOf(instructions[i]!), `expected FROM, found ${instructions[i]!.getKeyword()}`);

  const stages: Stage[] = [];
  /** Images named by COPY --from (not stages): built as stages of their own, after the explicit ones. */
  const implicit: Stage[] = [];
  let stage: Stage | undefined;
  let args: Record<string, string> = {};
  let ownExpose = false;
  const vars = () => ({ ...args, ...stage!.config.env });

  const resolveBase = (image: string, line: number, what: string): { base: BaseRef; config: ImageConfig } => {
    if (image === "scratch") return { base: { kind: "scratch" }, config: structuredClone(EMPTY_CONFIG) };
    const earlier = stages.find((s) => s.name === image.toLowerCase());
    if (earlier) return { base: { kind: "stage", index: earlier.index }, config: structuredClone(earlier.config) };
    const managed = /^debian:(bookworm|bookworm-slim|12|12-slim)$/.test(image) ? "base" : MANAGED_NAMES.find((n) => n === image);
    if (managed) return { base: { kind: "managed", name: managed }, config: structuredClone({ ...EMPTY_CONFIG, env: { PATH: DEFAULT_PATH } }) };
    const own = image.replace(/:latest$/, "");
    const parent = IMAGE_NAME.test(own) ? opts.parentConfig(own) : undefined;
    if (parent) return { base: { kind: "image", name: own }, config: structuredClone(parent) };
    const ref = parseImageReference(image);
    if (!ref) lineError(line, `${what} ${image.slice(0, 200)}: not an image reference (name[:tag][@sha256:…], a stage, or an image of yours)`);
    const config = opts.registryConfig?.(ref) ?? { ...EMPTY_CONFIG, env: { PATH: DEFAULT_PATH } };
    return { base: { kind: "registry", ref }, config: structuredClone(config) };
  };

  for (const ins of instructions.slice(i)) {
    const line = lineOf(ins);
    const keyword = ins.getKeyword();
    const content = ins.getArgumentsContent() ?? "";
    const textOf = `${keyword} ${content}`.trim().split("\n")[0]!;
    if (keyword === "FROM") {
      const parts = ins.getArguments().map((a) => expand(a.getValue(), globalArgs, line));
      const flags = flagMap(ins, line, ["platform"]);
      if (flags.platform !== undefined) checkPlatform(expand(flags.platform, globalArgs, line), line);
      const words = parts.filter((p) => !p.startsWith("--"));
      if (words.length !== 1 && !(words.length === 3 && /^as$/i.test(words[1]!))) lineError(line, "FROM needs an image, optionally followed by AS <name>");
      const name = words[2]?.toLowerCase();
      if (name !== undefined && !STAGE_NAME.test(name)) lineError(line, `stage name ${words[2]} must match ${STAGE_NAME.source}`);
      if (name !== undefined && stages.some((s) => s.name === name)) lineError(line, `stage name ${name} is used twice`);
      const { base, config } = resolveBase(words[0]!, line, "FROM");
      stage = { index: stages.length, name, line, base, steps: [], config, exports: [] };
      stages.push(stage);
      args = {};
      ownExpose = false;
      continue;
    }
    const config = stage!.config;
    const steps = stage!.steps;
    switch (keyword) {
      case "RUN": {
        const flags = flagMap(ins, line, ["mount", "network", "security"]);
        // A cache mount only makes rebuilds faster: without it the result is the same.
        if (flags.mount !== undefined && !/^type=cache(,|$)/.test(flags.mount)) lineError(line, `RUN --mount=${flags.mount}: only type=cache mounts are supported (and ignored)`);
        if (flags.network !== undefined && flags.network !== "default") lineError(line, `RUN --network=${flags.network} is not supported (builds have internet egress)`);
        if (flags.security !== undefined) lineError(line, "RUN --security is not supported");
        const body = content;
        if (!body.trim()) lineError(line, "RUN needs a command");
        // ARG values are in the environment of RUN (not of the image), like Docker.
        steps.push({ kind: "run", line, text: textOf, ...runCommand(body, config, line), env: vars(), cwd: config.workdir, user: config.user });
        break;
      }
      case "COPY":
      case "ADD": {
        const flags = flagMap(ins, line, keyword === "COPY" ? ["chown", "chmod", "from", "link"] : ["chown", "chmod", "link"]);
        const chown = flags.chown ? expand(flags.chown, vars(), line) : undefined;
        const chmod = flags.chmod ? expand(flags.chmod, vars(), line) : undefined;
        if (chmod !== undefined && !/^[0-7]{3,4}$/.test(chmod)) lineError(line, `${keyword} --chmod=${chmod}: only octal modes (e.g. 0755) are supported`);
        // The parser leaves the flags out of the content.
        const body = content;
        const heredoc = /^<<(-?)(["']?)([A-Za-z_][A-Za-z0-9_]*)\2[ \t]+(\S.*)$/.exec(body.split("\n")[0]!.trim());
        if (heredoc) {
          const [, dash, quote, word, destText] = heredoc;
          const content = heredocBody(body, word!, dash === "-", line);
          const dest = expand(destText!.trim(), vars(), line);
          steps.push({ kind: "write", line, text: textOf, dest: dest.startsWith("/") ? dest : posix.join(config.workdir, dest), content: quote ? content : expand(content, vars(), line), chown, chmod });
          break;
        }
        let parts = jsonArray(body) ?? ins.getArguments().map((a) => a.getValue()).filter((p) => !p.startsWith("--"));
        parts = parts.map((p) => expand(p, vars(), line));
        if (parts.length < 2) lineError(line, `${keyword} needs at least one source and a destination`);
        const dest = parts.at(-1)!;
        const sources = parts.slice(0, -1);
        let from: number | undefined;
        if (flags.from !== undefined) {
          const fromText = expand(flags.from, vars(), line);
          const numbered = /^\d+$/.test(fromText) ? Number(fromText) : undefined;
          if (stage!.name === fromText.toLowerCase() || (numbered !== undefined && numbered >= stage!.index)) lineError(line, `COPY --from=${fromText}: a stage can only copy from an earlier one`);
          const byName = numbered !== undefined ? stages[numbered] : stages.find((s) => s.name === fromText.toLowerCase());
          if (byName) from = byName.index;
          else {
            const { base, config: imageConfig } = resolveBase(fromText, line, "COPY --from");
            const same = implicit.find((s) => JSON.stringify(s.base) === JSON.stringify(base));
            from = same?.index ?? implicitStage(implicit, base, imageConfig, line);
          }
        }
        for (const s of sources) {
          if (/^[a-z][a-z0-9+.-]*:\/\//i.test(s)) lineError(line, `${keyword} from a URL (${s}) is not supported: put the file in the code archive`);
          const n = posix.normalize(s.replace(/^\/+/, ""));
          if (n === ".." || n.startsWith("../")) lineError(line, `${keyword} source ${s} is outside the ${from === undefined ? "build context" : "stage's root"}`);
        }
        // posix.join keeps a trailing slash: "dir/" stays a directory destination; so do "." and "..".
        const joined = dest.startsWith("/") ? dest : posix.join(config.workdir, dest);
        const absDest = /(^|\/)\.\.?$/.test(dest) && !joined.endsWith("/") ? `${joined}/` : joined;
        steps.push({
          kind: "copy",
          line,
          text: textOf,
          add: keyword === "ADD",
          sources: sources.map((s) => posix.normalize(s.replace(/^\/+/, "")).replace(/(.)\/+$/, "$1") || "."),
          dest: sources.length > 1 && !absDest.endsWith("/") ? `${absDest}/` : absDest,
          chown,
          chmod,
          ...(from !== undefined ? { from } : {}),
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
        declared.add(name);
        if (value !== undefined) args[name] = expand(value, vars(), line);
        break;
      }
      case "WORKDIR": {
        const path = expand(unquote(content.trim()), vars(), line);
        if (!path) lineError(line, "WORKDIR needs a path");
        config.workdir = posix.resolve(config.workdir, path);
        steps.push({ kind: "mkdir", line, text: textOf, path: config.workdir });
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
        // The Dockerfile's first TCP port is the app's (the endpoint forwards to it), whatever the base exposed.
        if (!ownExpose && tcp.length) {
          config.appPort = tcp[0];
          ownExpose = true;
        }
        break;
      }
      case "CMD":
        config.cmd = execOrShell(content, config, line);
        break;
      case "ENTRYPOINT":
        config.entrypoint = execOrShell(content, config, line);
        config.cmd = []; // Docker resets CMD when ENTRYPOINT is set
        break;
      case "SHELL": {
        const shell = jsonArray(content);
        if (!shell || shell.length === 0) lineError(line, 'SHELL needs a JSON array, e.g. ["/bin/bash", "-c"]');
        config.shell = shell;
        break;
      }
      case "STOPSIGNAL": {
        const signal = expand(content.trim(), vars(), line);
        if (!/^(SIG)?[A-Z][A-Z0-9+]*$|^\d{1,2}$/.test(signal)) lineError(line, `STOPSIGNAL ${signal} is not a signal name (SIGTERM) or number`);
        config.stopSignal = signal;
        break;
      }
      case "VOLUME": {
        const paths = (jsonArray(content) ?? ins.getArguments().map((a) => a.getValue())).map((p) => expand(p, vars(), line));
        if (!paths.length) lineError(line, "VOLUME needs at least one path");
        for (const p of paths) {
          const path = posix.resolve("/", p);
          config.volumes = [...new Set([...(config.volumes ?? []), path])];
          steps.push({ kind: "mkdir", line, text: textOf, path });
        }
        break;
      }
      case "HEALTHCHECK": {
        const sub = content.trim();
        if (/^NONE$/i.test(sub)) {
          config.healthcheck = undefined;
          break;
        }
        const flags = flagMap(ins, line, ["interval", "timeout", "start-period", "start-interval", "retries"]);
        const m = /^(?:--\S+\s+)*CMD\s+([\s\S]+)$/i.exec(sub);
        if (!m) lineError(line, "HEALTHCHECK needs CMD <command> or NONE");
        const command = commandOf(m[1]!, line);
        config.healthcheck = {
          command: typeof command === "string" && customShell(config) ? [...config.shell!, command] : command,
          intervalMs: durationMs(flags.interval, HEALTHCHECK_DEFAULTS.intervalMs, line),
          timeoutMs: durationMs(flags.timeout, HEALTHCHECK_DEFAULTS.timeoutMs, line),
          startPeriodMs: durationMs(flags["start-period"], HEALTHCHECK_DEFAULTS.startPeriodMs, line),
          retries: flags.retries === undefined ? HEALTHCHECK_DEFAULTS.retries : positiveInt(flags.retries, "--retries", line),
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
      case "ONBUILD":
        lineError(line, "ONBUILD is not supported (it runs in builds FROM this image, which Cocoon does not defer)");
      // falls through (lineError never returns)
      default:
        lineError(
          line,
          `${keyword} is not supported (supported: FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, EXPOSE, CMD, ENTRYPOINT, SHELL, STOPSIGNAL, VOLUME, HEALTHCHECK, LABEL)`,
        );
    }
  }
  const unknownArgs = Object.keys(buildArgs).filter((k) => !declared.has(k) && !PREDEFINED_ARGS.has(k));
  if (unknownArgs.length) {
    throw new ApiError("ValidationError", `build args ${unknownArgs.join(", ")} are not declared by an ARG in the Dockerfile`, { field: "buildArgs" });
  }
  // Images named by COPY --from come after the explicit stages; their placeholder indices are -1, -2, …
  const explicitCount = stages.length;
  for (const [j, s] of implicit.entries()) stages.push({ ...s, index: explicitCount + j });
  for (const s of stages) {
    s.config.argv = [...s.config.entrypoint, ...s.config.cmd];
    for (const step of s.steps) if (step.kind === "copy" && step.from !== undefined && step.from < 0) step.from = explicitCount - step.from - 1;
  }

  let target = explicitCount - 1;
  if (opts.target !== undefined) {
    const t = stages.find((s) => s.name !== undefined && s.name === opts.target!.toLowerCase());
    if (!t) throw new ApiError("ValidationError", `target ${opts.target} is not a stage of the Dockerfile (FROM … AS ${opts.target})`, { field: "target" });
    target = t.index;
  }
  const order = buildOrder(stages, target);
  // What each needed stage must hand over, for the COPY --from of the stages built after it.
  for (const s of order.map((n) => stages[n]!)) {
    for (const step of s.steps) if (step.kind === "copy" && step.from !== undefined) stages[step.from]!.exports.push(...step.sources.filter((p) => !stages[step.from!]!.exports.includes(p)));
  }
  return { stages, target, order, config: stages[target]!.config };
}

/** The stages the target needs (FROM a stage, COPY --from), each after what it needs. */
function buildOrder(stages: Stage[], target: number): number[] {
  const order: number[] = [];
  const visit = (n: number) => {
    if (order.includes(n)) return;
    const s = stages[n]!;
    if (s.base.kind === "stage") visit(s.base.index);
    for (const step of s.steps) if (step.kind === "copy" && step.from !== undefined) visit(step.from);
    order.push(n);
  };
  visit(target);
  return order;
}

/** Registers an image named by COPY --from as a stage with no steps; returns its (final) index. */
function implicitStage(implicit: Stage[], base: BaseRef, config: ImageConfig, line: number): number {
  if (base.kind === "scratch") lineError(line, "COPY --from=scratch copies nothing");
  // Indices are given once the explicit stages are counted; until then they are negative placeholders.
  const index = -(implicit.length + 1);
  implicit.push({ index, line, base, steps: [], config, exports: [] });
  return index;
}

const lineOf = (ins: Instruction) => ins.getRange().start.line + 1;

function checkPlatform(platform: string, line: number): void {
  const { os, architecture } = hostPlatform();
  if (platform !== `${os}/${architecture}`) lineError(line, `FROM --platform=${platform}: this host builds ${os}/${architecture} only`);
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

const customShell = (config: ImageConfig) => config.shell !== undefined && JSON.stringify(config.shell) !== JSON.stringify(DEFAULT_SHELL);

/**
 * RUN's command: exec form, shell form (through SHELL when one is set), or a
 * heredoc. `RUN <<EOF` alone runs the body as a script (with its #! line if
 * it has one); a heredoc after a command (`RUN python3 <<EOF`) is the
 * shell's own business.
 */
function runCommand(body: string, config: ImageConfig, line: number): { command: string[] | string; stdin?: string } {
  const first = body.split("\n")[0]!.trim();
  const bare = /^<<(-?)(["']?)([A-Za-z_][A-Za-z0-9_]*)\2$/.exec(first);
  if (bare) {
    const script = heredocBody(body, bare[3]!, bare[1] === "-", line);
    if (script.startsWith("#!")) {
      // The interpreter named by #! runs it, as BuildKit does: written to a file first.
      return { command: ["/bin/sh", "-c", 'f=$(mktemp) && cat > "$f" && chmod +x "$f" && "$f"; code=$?; rm -f "$f"; exit $code'], stdin: script };
    }
    return { command: customShell(config) ? [...config.shell!, script] : script };
  }
  if (/<<-?["']?[A-Za-z_][A-Za-z0-9_]*["']?/.test(first) && !jsonArray(body)) {
    // The shell reads the heredoc itself: the whole text, newlines kept.
    return { command: customShell(config) ? [...config.shell!, body] : body };
  }
  const command = commandOf(body.includes("\n") ? body.replace(/\\\n/g, "") : body, line);
  return { command: typeof command === "string" && customShell(config) ? [...config.shell!, command] : command };
}

/** The lines of a heredoc after its first line, up to the terminator (tabs stripped with `<<-`). */
function heredocBody(body: string, word: string, stripTabs: boolean, line: number): string {
  const lines = body.split("\n").slice(1);
  const end = lines.findIndex((l) => (stripTabs ? l.replace(/^\t+/, "") : l) === word);
  if (end < 0) lineError(line, `heredoc <<${word} has no closing ${word} line`);
  if (end !== lines.length - 1) lineError(line, `only one heredoc per instruction is supported outside a shell command (found text after ${word})`);
  const text = lines.slice(0, end).map((l) => (stripTabs ? l.replace(/^\t+/, "") : l));
  return text.length ? `${text.join("\n")}\n` : "";
}

function execOrShell(content: string, config: ImageConfig, line: number): string[] {
  const c = commandOf(content, line);
  return typeof c === "string" ? [...(config.shell ?? DEFAULT_SHELL), c] : c;
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

/** How a base is named in the build log. */
export function describeBase(base: BaseRef, stages: Stage[]): string {
  switch (base.kind) {
    case "managed":
      return `${base.name} (managed)`;
    case "scratch":
      return "scratch";
    case "image":
      return `${base.name} (your image)`;
    case "registry":
      return formatReference(base.ref);
    case "stage":
      return `stage ${stages[base.index]!.name ?? base.index}`;
    default: {
      const never: never = base;
      throw new Error(`unknown base ${String(never)}`);
    }
  }
}
