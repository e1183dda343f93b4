import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { inspectArchive, DEFAULT_ARCHIVE_LIMITS } from "../../src/images/archive.ts";
import { planDockerfile, type ImageConfig } from "../../src/images/dockerfile.ts";
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
    expect(plan.base).toEqual({ kind: "debian" });
    expect(plan.steps.map((s) => [s.kind, s.line])).toEqual([
      ["workdir", 6],
      ["run", 7],
      ["run", 9],
      ["copy", 10],
      ["copy", 11],
    ]);
    expect(plan.steps[1]).toMatchObject({ command: "apt-get update &&     apt-get install -y python3", cwd: "/srv/app", user: "root", env: { VERSION: "7" } });
    expect(plan.steps[2]).toMatchObject({ command: ["echo", "exec form"] });
    expect(plan.steps[3]).toMatchObject({ sources: ["src"], dest: "/srv/app/src/", chown: "app:app", add: false });
    expect(plan.steps[4]).toMatchObject({ sources: ["vendor.tar.gz"], dest: "/opt/", add: true });
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
    expect(plan.base).toEqual({ kind: "image", name: "counter" });
    expect(plan.config).toMatchObject({ env: { A: "1", B: "1-2" }, workdir: "/app", user: "app", argv: ["run"], appPort: 80 });
  });

  const bad: [string, string, number][] = [
    ["FROM ubuntu:22.04\n", "FROM ubuntu:22.04: only debian:bookworm", 1],
    ["FROM debian:bookworm AS build\n", "named build stages", 1],
    ["FROM debian:bookworm\nRUN true\nFROM debian:bookworm\n", "multi-stage builds", 3],
    ["FROM debian:bookworm\nSHELL [\"/bin/bash\"]\n", "SHELL is not supported", 2],
    ["FROM debian:bookworm\nADD https://example.com/a.tgz /a\n", "ADD from a URL", 2],
    ["FROM debian:bookworm\nCOPY ../secret /x\n", "outside the build context", 2],
    ["FROM debian:bookworm\nCOPY --from=build /a /b\n", "flag --from is not supported", 2],
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
