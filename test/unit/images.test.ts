import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { inspectArchive, DEFAULT_ARCHIVE_LIMITS } from "../../src/images/archive.ts";
import { EMPTY_CONFIG, planDockerfile, type ImageConfig } from "../../src/images/dockerfile.ts";
import { ApiError } from "../../src/errors.ts";
import { makeZip, type ZipEntry } from "../support/zip.ts";

const noParents = () => undefined;

function refusal(fn: () => unknown): ApiError {
  try {
    fn();
  } catch (err) {
    if (err instanceof ApiError) return err;
    throw err;
  }
  throw new Error("expected a refusal");
}

describe("planDockerfile", () => {
  it("plans every supported instruction", () => {
    const plan = planDockerfile(
      [
        "# syntax comment",
        "ARG BASE=bookworm-slim",
        "FROM debian:${BASE}",
        "ARG VERSION=1",
        "ENV APP_HOME=/srv/app NAME=\"two words\"",
        "WORKDIR $APP_HOME",
        "RUN apt-get update && \\",
        "    apt-get install -y python3",
        'RUN ["echo", "exec form"]',
        "COPY --chown=app:app src/ ./src/",
        "ADD vendor.tar.gz /opt/",
        "USER app",
        "EXPOSE 8080/tcp 9090",
        'LABEL version="${VERSION}"',
        "HEALTHCHECK --interval=2s --retries=5 CMD curl -f http://localhost:8080/",
        'ENTRYPOINT ["python3"]',
        'CMD ["-m", "http.server"]',
      ].join("\n"),
      { buildArgs: { VERSION: "7" }, parentConfig: noParents },
    );
    const [stage] = plan.stages;
    expect(plan.stages).toHaveLength(1);
    expect(plan).toMatchObject({ target: 0, order: [0] });
    expect(stage!.base).toEqual({ kind: "managed", name: "base" });
    expect(stage!.steps.map((s) => [s.kind, s.line])).toEqual([
      ["mkdir", 6],
      ["run", 7],
      ["run", 9],
      ["copy", 10],
      ["copy", 11],
    ]);
    expect(stage!.steps[1]).toMatchObject({ command: "apt-get update &&     apt-get install -y python3", cwd: "/srv/app", user: "root", env: { VERSION: "7" } });
    expect(stage!.steps[2]).toMatchObject({ command: ["echo", "exec form"] });
    expect(stage!.steps[3]).toMatchObject({ sources: ["src"], dest: "/srv/app/src/", chown: "app:app", add: false });
    expect(stage!.steps[4]).toMatchObject({ sources: ["vendor.tar.gz"], dest: "/opt/", add: true });
    expect(plan.config).toMatchObject({
      env: { APP_HOME: "/srv/app", NAME: "two words" },
      workdir: "/srv/app",
      user: "app",
      appPort: 8080,
      argv: ["python3", "-m", "http.server"],
      labels: { version: "7" },
      healthcheck: { command: "curl -f http://localhost:8080/", intervalMs: 2000, retries: 5 },
    });
    expect(plan.config.env.VERSION).toBeUndefined(); // ARG is not ENV
  });

  it("inherits the config of a Cocoon image named in FROM", () => {
    const parent: ImageConfig = { env: { A: "1" }, workdir: "/app", user: "app", argv: ["run"], entrypoint: [], cmd: ["run"], appPort: 80, labels: {} };
    const plan = planDockerfile("FROM counter\nENV B=$A-2\n", { parentConfig: (n) => (n === "counter" ? parent : undefined) });
    expect(plan.stages[0]!.base).toEqual({ kind: "image", name: "counter" });
    expect(plan.config).toMatchObject({ env: { A: "1", B: "1-2" }, workdir: "/app", user: "app", argv: ["run"], appPort: 80 });
  });

  const bad: [string, string, number][] = [
    ["FROM Not_An/Image!\n", "not an image reference", 1],
    ["FROM debian:bookworm AS 9lives\n", "stage name 9lives must match", 1],
    ["FROM debian:bookworm AS a\nFROM debian:bookworm AS a\n", "stage name a is used twice", 2],
    ["FROM --platform=linux/arm64 debian:bookworm\n", "this host builds linux/amd64 only", 1],
    ["FROM debian:bookworm\nSHELL /bin/bash -c\n", "SHELL needs a JSON array", 2],
    ["FROM debian:bookworm\nSTOPSIGNAL kill-it\n", "not a signal name", 2],
    ["FROM debian:bookworm\nONBUILD RUN true\n", "ONBUILD is not supported", 2],
    ["FROM debian:bookworm\nRUN --mount=type=bind,source=x,target=/x true\n", "only type=cache mounts", 2],
    ["FROM debian:bookworm\nRUN --network=none true\n", "RUN --network=none is not supported", 2],
    ["FROM debian:bookworm\nRUN <<EOF\necho never closed\n", "has no closing EOF line", 2],
    ["FROM debian:bookworm AS a\nCOPY --from=a /x /y\n", "can only copy from an earlier one", 2],
    ["FROM debian:bookworm\nCOPY --from=1 /x /y\n", "can only copy from an earlier one", 2],
    ["FROM debian:bookworm\nCOPY --chmod=u+x a /b\n", "only octal modes", 2],
    ["FROM debian:bookworm\nCOPY --parents a /b\n", "flag --parents is not supported", 2],
    ["FROM debian:bookworm\nADD https://example.com/a.tgz /a\n", "ADD from a URL", 2],
    ["FROM debian:bookworm\nCOPY ../secret /x\n", "outside the build context", 2],
    ["FROM debian:bookworm\nEXPOSE http\n", "EXPOSE needs ports", 2],
    ["RUN true\n", "expected FROM", 1],
    ["FROM debian:bookworm\nHEALTHCHECK --interval=soon CMD true\n", "bad duration", 2],
  ];
  it.each(bad)("refuses %j naming the line", (text, message, line) => {
    const err = refusal(() => planDockerfile(text, { parentConfig: noParents }));
    expect(err.code).toBe("ValidationError");
    expect(err.message).toContain(`Dockerfile line ${line}: `);
    expect(err.message).toContain(message);
    expect(err.details).toMatchObject({ field: "dockerfile", line });
  });

  it("refuses build args no ARG declares", () => {
    const err = refusal(() => planDockerfile("FROM debian:bookworm\n", { buildArgs: { NOPE: "1" }, parentConfig: noParents }));
    expect(err.message).toContain("build args NOPE are not declared");
  });

  it("plans a multi-stage build: stages by name and number, images named by COPY --from, --target, only the stages needed", () => {
    const text = [
      "ARG GO=1.22",
      "FROM golang:${GO} AS build", // 2
      "WORKDIR /src",
      "COPY . .",
      "RUN go build -o /out/app ./cmd/app",
      "FROM build AS test", // 6
      "RUN go test ./...",
      "FROM debian:bookworm-slim AS docs", // 8
      "RUN echo unused",
      "FROM scratch", // 10
      "COPY --from=build /out/app /app",
      "COPY --from=0 /src/config/*.yaml /etc/app/",
      "COPY --from=nginx:1.27 /etc/nginx/mime.types /etc/",
      "COPY --from=ghcr.io/acme/tools@sha256:" + "a".repeat(64) + " /bin/tool /bin/",
      'ENTRYPOINT ["/app"]',
    ].join("\n");
    const plan = planDockerfile(text, { parentConfig: noParents });
    expect(plan.stages.map((s) => [s.index, s.name, s.base.kind])).toEqual([
      [0, "build", "registry"],
      [1, "test", "stage"],
      [2, "docs", "managed"],
      [3, undefined, "scratch"],
      [4, undefined, "registry"],
      [5, undefined, "registry"],
    ]);
    expect(plan.stages[0]!.base).toEqual({ kind: "registry", ref: { registry: "docker.io", repository: "library/golang", tag: "1.22" } });
    expect(plan.stages[5]!.base).toMatchObject({ ref: { registry: "ghcr.io", repository: "acme/tools", digest: `sha256:${"a".repeat(64)}` } });
    // The target (last stage) needs build, nginx and tools; test and docs are skipped.
    expect(plan.target).toBe(3);
    expect(plan.order).toEqual([0, 4, 5, 3]);
    expect(plan.stages[0]!.exports).toEqual(["out/app", "src/config/*.yaml"]);
    expect(plan.stages[4]!.exports).toEqual(["etc/nginx/mime.types"]);
    expect(plan.stages[3]!.steps).toMatchObject([
      { kind: "copy", from: 0, sources: ["out/app"], dest: "/app" },
      { kind: "copy", from: 0, sources: ["src/config/*.yaml"], dest: "/etc/app/" },
      { kind: "copy", from: 4 },
      { kind: "copy", from: 5 },
    ]);
    expect(plan.config.argv).toEqual(["/app"]);

    const test = planDockerfile(text, { parentConfig: noParents, target: "test" });
    expect([test.target, test.order]).toEqual([1, [0, 1]]);
    expect(test.stages[1]!.config.workdir).toBe("/src"); // inherited from the stage it is FROM
    const err = refusal(() => planDockerfile(text, { parentConfig: noParents, target: "nope" }));
    expect(err.details).toMatchObject({ field: "target" });
  });

  it("plans SHELL, STOPSIGNAL, VOLUME, heredocs and ARG before FROM", () => {
    const plan = planDockerfile(
      [
        "ARG BASE=python",
        "FROM ${BASE}",
        "ARG TARGETARCH",
        'SHELL ["/bin/bash", "-o", "pipefail", "-c"]',
        "RUN echo $TARGETARCH | tee /arch",
        "RUN <<EOF",
        "set -e",
        "echo one",
        "EOF",
        "RUN <<'PY'",
        "#!/usr/bin/env python3",
        "print('hi')",
        "PY",
        "RUN python3 - <<EOF",
        "print(1)",
        "EOF",
        "ENV NAME=world",
        "COPY --chmod=0600 <<EOF /etc/greeting",
        "hello $NAME",
        "EOF",
        "COPY <<'EOF' app.conf",
        "literal $NAME",
        "EOF",
        "STOPSIGNAL SIGINT",
        'VOLUME ["/data", "/cache"]',
        "CMD serve --port 80",
      ].join("\n"),
      { parentConfig: noParents },
    );
    const [stage] = plan.stages;
    expect(stage!.base).toEqual({ kind: "managed", name: "python" });
    const bash = ["/bin/bash", "-o", "pipefail", "-c"];
    expect(stage!.steps).toMatchObject([
      { kind: "run", command: [...bash, "echo $TARGETARCH | tee /arch"], env: { TARGETARCH: "amd64" } },
      { kind: "run", command: [...bash, "set -e\necho one\n"] },
      { kind: "run", command: ["/bin/sh", "-c", expect.stringContaining("mktemp")], stdin: "#!/usr/bin/env python3\nprint('hi')\n" },
      { kind: "run", command: [...bash, "python3 - <<EOF\nprint(1)\nEOF"] },
      { kind: "write", dest: "/etc/greeting", content: "hello world\n", chmod: "0600" },
      { kind: "write", dest: "/app.conf", content: "literal $NAME\n" },
      { kind: "mkdir", path: "/data" },
      { kind: "mkdir", path: "/cache" },
    ]);
    expect(plan.config).toMatchObject({ stopSignal: "SIGINT", volumes: ["/data", "/cache"], shell: bash, argv: [...bash, "serve --port 80"] });
  });

  it("reads a Dockerfile with CRLF line ends as one with LF (heredocs included)", () => {
    const plan = planDockerfile("FROM base\r\nRUN <<EOF\r\nset -e\r\necho ok\r\nEOF\r\nRUN apt-get update \\\r\n  && true\r\n", { parentConfig: noParents });
    expect(plan.stages[0]!.steps).toMatchObject([{ command: "set -e\necho ok\n" }, { command: "apt-get update   && true" }]);
  });

  it("copies onto . and .. as directories", () => {
    const plan = planDockerfile("FROM scratch\nWORKDIR /srv/app\nCOPY a .\nCOPY b ..\nCOPY c ./\nCOPY d ./d\n", { parentConfig: noParents });
    expect(plan.stages[0]!.steps.filter((s) => s.kind === "copy").map((s) => (s as { dest: string }).dest)).toEqual(["/srv/app/", "/srv/", "/srv/app/", "/srv/app/d"]);
  });

  it("lets the Dockerfile's EXPOSE replace the base image's app port, and takes a pulled image's config", () => {
    const pulled: ImageConfig = { ...EMPTY_CONFIG, env: { PATH: "/usr/local/bin:/usr/bin", LANG: "C.UTF-8" }, workdir: "/app", appPort: 80, cmd: ["python3"], argv: ["python3"] };
    const plan = planDockerfile("FROM python:3.12-slim\nENV PATH=/venv/bin:$PATH\nEXPOSE 8080\n", {
      parentConfig: noParents,
      registryConfig: (ref) => (ref.repository === "library/python" && ref.tag === "3.12-slim" ? pulled : undefined),
    });
    expect(plan.config).toMatchObject({ env: { PATH: "/venv/bin:/usr/local/bin:/usr/bin", LANG: "C.UTF-8" }, workdir: "/app", appPort: 8080, argv: ["python3"] });
    // Before the pull (at create), a placeholder stands in: the plan is only checked.
    expect(planDockerfile("FROM python:3.12-slim\nENV PATH=/venv/bin:$PATH\n", { parentConfig: noParents }).config.env.PATH).toMatch(/^\/venv\/bin:\/usr\/local\/sbin/);
  });
});

describe("inspectArchive", () => {
  const dirs: string[] = [];
  afterAll(async () => {
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });
  async function inspect(entries: ZipEntry[], limits = DEFAULT_ARCHIVE_LIMITS) {
    const dir = await mkdtemp(join(tmpdir(), "cocoon-zip-"));
    dirs.push(dir);
    const zip = makeZip(entries);
    await writeFile(join(dir, "c.zip"), zip);
    return inspectArchive(join(dir, "c.zip"), zip.length, limits);
  }

  it("lists entries with implied parents, honours .dockerignore and finds the Dockerfile", async () => {
    const a = await inspect([
      { name: "Dockerfile", data: "FROM scratch\n" },
      { name: ".dockerignore", data: "secrets\n*.log\n!keep.log\n" },
      { name: "src/app/main.py", data: "print(1)", mode: 0o100755 },
      { name: "src/link", symlink: "app/main.py" },
      { name: "secrets/key", data: "k" },
      { name: "debug.log", data: "l" },
      { name: "keep.log", data: "l" },
    ]);
    expect(a.dockerfile).toBe("FROM scratch\n");
    expect(a.entries.map((e) => `${e.type}:${e.path}`)).toEqual([
      "file:.dockerignore",
      "file:Dockerfile",
      "file:keep.log",
      "dir:src",
      "dir:src/app",
      "file:src/app/main.py",
      "symlink:src/link",
    ]);
    expect(a.entries.find((e) => e.path === "src/app/main.py")?.mode).toBe(0o755);
  });

  it("refuses a file under a symlinked directory", async () => {
    await expect(inspect([{ name: "d", symlink: "." }, { name: "d/x", data: "1" }])).rejects.toThrow('entry "d/x" lies under the symlink d');
  });

  it("refuses an archive past its uncompressed limit", async () => {
    const limits = { ...DEFAULT_ARCHIVE_LIMITS, maxUncompressedBytes: 10 };
    await expect(inspect([{ name: "a", data: "0123456789abc" }], limits)).rejects.toThrow("past its uncompressed limit of 10 bytes");
  });

  it("refuses Windows paths and device entries", async () => {
    await expect(inspect([{ name: "..\\evil", data: "1" }])).rejects.toThrow("backslash");
    await expect(inspect([{ name: "dev", data: "", mode: 0o020644 }])).rejects.toThrow("device, FIFO or socket");
  });
});
