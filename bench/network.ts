/**
 * Networking benchmark: the passt path (egress "internet" / allow list) vs
 * plain QEMU user-mode networking (egress "none"):
 * - HTTP latency and requests/s to the guest through the host→guest forward
 *   (the agent's GET /health, the same forward an app port uses);
 * - MB/s host→guest through the forward (a file upload to the agent);
 * - MB/s downloaded in the guest from an HTTP server on a local test host (a
 *   network namespace on 10.213.1.0/30; user-mode with restrict=on has no egress,
 *   so that row exists for passt only).
 * `npx tsx bench/network.ts`; writes bench/results/network.{json,md}.
 */
import { execFileSync } from "node:child_process";
import { mkdir, rm } from "node:fs/promises";
import { cpus } from "node:os";
import { join } from "node:path";
import { request, Agent } from "node:http";
import { startRuntime } from "../src/server/runtime.ts";
import type { MicroVm } from "../src/vmm/engine.ts";
import type { Egress } from "../src/vmm/network/index.ts";
import { summarize, writeResults, type Summary } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const REQUESTS = Number(process.env.BENCH_HTTP_REQUESTS ?? 200);
const SECONDS = Number(process.env.BENCH_HTTP_SECONDS ?? 5);
const DOWNLOAD_MIB = Number(process.env.BENCH_DOWNLOAD_MIB ?? 64);
const NS = `cocoon-bench${process.pid}`;
const VETH = `cb${process.pid}`;
const sh = (cmd: string) => execFileSync("bash", ["-c", cmd], { encoding: "utf8" });
const log = (line: string) => console.error(`[bench] ${line}`);

function get(agent: Agent, port: number, token: string): Promise<number> {
  const t = performance.now();
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path: "/health", agent, headers: { authorization: `Bearer ${token}` } }, (res) => {
      res.resume();
      res.on("end", () => (res.statusCode === 200 ? resolve(performance.now() - t) : reject(new Error(`HTTP ${res.statusCode}`))));
    });
    req.on("error", reject);
    req.end();
  });
}

interface Row {
  latencyMs: Summary;
  requestsPerSecond: number;
  uploadMBps: number;
  downloadMBps?: number;
}

async function measure(vm: MicroVm, withDownload: boolean): Promise<Row> {
  const agent = new Agent({ keepAlive: true, maxSockets: 8 });
  const { agentPort, token } = vm.record;
  for (let i = 0; i < 20; i++) await get(agent, agentPort, token); // warm the TCG translation cache
  const lat: number[] = [];
  for (let i = 0; i < REQUESTS; i++) lat.push(await get(agent, agentPort, token));
  let done = 0;
  const until = performance.now() + SECONDS * 1000;
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (performance.now() < until) {
        await get(agent, agentPort, token);
        done++;
      }
    }),
  );
  agent.destroy();
  const data = Buffer.alloc(32 << 20, 7);
  const t = performance.now();
  await vm.agent.writeFile("/tmp/upload", data);
  const uploadMBps = data.length / 1e6 / ((performance.now() - t) / 1000);
  let downloadMBps: number | undefined;
  if (withDownload) {
    const r = await vm.agent.exec({
      command: [
        "bash",
        "-c",
        `s=$(date +%s%N); exec 3<>/dev/tcp/10.213.1.2/8081; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; n=$(cat <&3 | wc -c); e=$(date +%s%N); echo $n $((e-s))`,
      ],
      timeoutMs: 300_000,
    });
    const [bytes, ns] = r.stdout.trim().split(" ").map(Number);
    if (!bytes || bytes < DOWNLOAD_MIB << 20) throw new Error(`download failed: ${r.stdout}${r.stderr}`);
    downloadMBps = bytes / 1e6 / (ns! / 1e9);
  }
  const round = (v: number) => Math.round(v * 10) / 10;
  return { latencyMs: summarize(lat), requestsPerSecond: round(done / SECONDS), uploadMBps: round(uploadMBps), downloadMBps: downloadMBps && round(downloadMBps) };
}

async function main(): Promise<void> {
  const dataDir = join(root, "net-data");
  await rm(dataDir, { recursive: true, force: true });
  await mkdir(dataDir, { recursive: true });
  sh(`ip netns add ${NS}
      ip link add ${VETH}h type veth peer name ${VETH}n && ip link set ${VETH}n netns ${NS}
      ip addr add 10.213.1.1/30 dev ${VETH}h && ip link set ${VETH}h up
      ip -n ${NS} addr add 10.213.1.2/30 dev ${VETH}n && ip -n ${NS} link set ${VETH}n up`);
  const server = `const b=Buffer.alloc(1<<20,97);require("http").createServer((q,r)=>{r.writeHead(200,{"content-length":${DOWNLOAD_MIB}*b.length});let i=0;const w=()=>{while(i<${DOWNLOAD_MIB}){i++;if(!r.write(b))return r.once("drain",w)}r.end()};w()}).listen(8081,"0.0.0.0")`;
  const serverPid = Number(sh(`ip netns exec ${NS} setsid node -e '${server}' >/dev/null 2>&1 & echo $!`).trim());
  process.env.COCOON_EGRESS_PRIVATE_ALLOW = "10.213.1.0/30"; // the test host's private range, opened as an operator would
  const { engine, baseImage } = await startRuntime({ dataDir, assetsDir: join(root, "assets"), warmPoolSize: 0, log });
  const results: Record<string, unknown> = { host: { cpus: cpus().length, accelerator: engine.accelerator }, at: new Date().toISOString() };
  try {
    await new Promise((r) => setTimeout(r, 500));
    const modes: [string, Egress][] = [
      ["user-mode (egress none)", "none"],
      ["passt (egress allow 10.213.1.2/32)", { allow: ["10.213.1.2/32"] }],
    ];
    for (const [label, egress] of modes) {
      log(label);
      const vm = await engine.launch(baseImage, { egress });
      results[label] = await measure(vm, egress !== "none");
      await engine.terminate(vm.id);
      log(JSON.stringify(results[label]));
    }
  } finally {
    await engine.close();
    sh(`kill ${serverPid} 2>/dev/null || true; ip link del ${VETH}h 2>/dev/null || true; ip netns del ${NS} 2>/dev/null || true`);
    await rm(dataDir, { recursive: true, force: true });
  }
  const rows = Object.entries(results).filter(([k]) => k.includes("(")) as [string, Row][];
  const md = [
    "# Network benchmark",
    "",
    `${results.at as string}, ${cpus().length} cores, ${engine.accelerator}. HTTP: agent GET /health through the host→guest forward (${REQUESTS} sequential; 8 concurrent keep-alive clients for ${SECONDS} s). Upload: 32 MiB file host→guest through the forward. Download: ${DOWNLOAD_MIB} MiB in the guest (bash /dev/tcp) from a server on a local network namespace.`,
    "",
    "| path | latency p50 / p95 ms | requests/s | upload MB/s | download MB/s |",
    "|---|---|---|---|---|",
    ...rows.map(([k, r]) => `| ${k} | ${r.latencyMs.p50} / ${r.latencyMs.p95} | ${r.requestsPerSecond} | ${r.uploadMBps} | ${r.downloadMBps ?? "n/a (no egress)"} |`),
    "",
  ].join("\n");
  await writeResults("network", results, md);
  console.log(md);
}

await main();
