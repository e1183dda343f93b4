/**
 * API and router benchmark: create→RUNNING, endpoint first byte, the router's
 * added latency against going straight to the VM's forwarded port, requests/s
 * through the router, and resume-on-request. Writes bench/results/api.{json,md}.
 */
import { request } from "node:http";
import type { MicroVmService } from "../src/lifecycle/microvms.ts";
import type { Engine } from "../src/vmm/engine.ts";
import { startApiStack } from "./api-stack.ts";
import { summarize, summaryTable, timed, writeResults } from "./stats.ts";

const root = process.env.COCOON_BENCH_DIR ?? "/tmp/cocoon-bench";
const CREATES = Number(process.env.BENCH_CREATES ?? 20);
const REQUESTS = Number(process.env.BENCH_REQUESTS ?? 200);
const RESUMES = Number(process.env.BENCH_RESUMES ?? 8);
const log = (line: string) => console.error(`[bench] ${line}`);

/** Same counting app as test/api/endpoint.test.ts: perl-base is in the base image, python is not. */
const APP = `nohup perl -MIO::Socket::INET -e 'my $s = IO::Socket::INET->new(LocalPort => 8080, Listen => 64, ReuseAddr => 1) or die; my $n = 0; while (my $c = $s->accept) { while (my $l = <$c>) { last if $l eq "\\r\\n" } $n++; my $b = "count=$n\\n"; print $c "HTTP/1.1 200 OK\\r\\nContent-Length: " . length($b) . "\\r\\nConnection: close\\r\\n\\r\\n$b"; close $c }' >/dev/null 2>&1 &`;
/** Waits until the app's port accepts (bash, not dash: /dev/tcp is a bash feature). */
const WAIT_FOR_APP = ["bash", "-c", "for i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && exit 0; sleep 0.2; done; exit 1"];

/** One GET; resolves with the time to the first byte of the body and to its end, in ms. */
function get(port: number, path: string, headers: Record<string, string>): Promise<{ firstByteMs: number; totalMs: number; status: number }> {
  const t = performance.now();
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path, headers, agent: false }, (res) => {
      let first = 0;
      res.on("data", () => (first ||= performance.now() - t));
      res.on("end", () => resolve({ firstByteMs: first, totalMs: performance.now() - t, status: res.statusCode ?? 0 }));
    });
    req.on("error", reject);
    req.end();
  });
}

/**
 * One request to a SUSPENDED VM, step by step (ms): the router up to the
 * lifecycle, the lifecycle's lock and admission up to the engine, each phase
 * of the engine's resume (its `phases` event) and the rest of its call, the
 * lifecycle's work after it (hook, RUNNING recorded), then the connection to
 * the app and its first byte, and the rest of the body. The lifecycle's and
 * the engine's calls are timed by wrapping them for this one request.
 */
async function traceResumeOnRequest(engine: Engine, microvms: MicroVmService, send: () => Promise<{ firstByteMs: number; totalMs: number }>): Promise<Record<string, number>> {
  const at: Record<string, number> = {};
  let phases: Record<string, number> = {};
  const onPhases = (operation: string, p: Record<string, number>) => operation === "resume" && (phases = p);
  const runningVm = microvms.runningVm;
  const resume = engine.resume;
  microvms.runningVm = async (...args) => {
    at.lifecycle ??= performance.now();
    try {
      return await runningVm.apply(microvms, args);
    } finally {
      at.running ??= performance.now();
    }
  };
  engine.resume = async (...args) => {
    at.engine = performance.now();
    try {
      return await resume.apply(engine, args);
    } finally {
      at.resumed = performance.now();
    }
  };
  engine.on("phases", onPhases);
  const sent = performance.now();
  try {
    const r = await send();
    const phaseSum = Object.values(phases).reduce((a, b) => a + b, 0);
    return {
      "router → lifecycle": at.lifecycle! - sent,
      "lifecycle → engine (lock, admission, RESUMING)": at.engine! - at.lifecycle!,
      ...Object.fromEntries(Object.entries(phases).map(([k, v]) => [`engine: ${k}`, v])),
      "engine: rest (ports, files)": at.resumed! - at.engine! - phaseSum,
      "lifecycle after engine (hook, RUNNING)": at.running! - at.resumed!,
      "connect → app's first byte": r.firstByteMs - (at.running! - sent),
      "rest of the answer": r.totalMs - r.firstByteMs,
      total: r.totalMs,
    };
  } finally {
    delete (microvms as Partial<MicroVmService>).runningVm;
    delete (engine as Partial<Engine>).resume;
    engine.off("phases", onPhases);
  }
}

/** Requests per second with `concurrency` clients for `durationMs`. */
async function throughput(port: number, path: string, headers: Record<string, string>, concurrency = 8, durationMs = 5000): Promise<number> {
  let done = 0;
  const end = Date.now() + durationMs;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (Date.now() < end) {
        if ((await get(port, path, headers)).status === 200) done++;
      }
    }),
  );
  return Math.round(done / (durationMs / 1000));
}

async function main(): Promise<void> {
  const { runtime, microvms, port, api, close } = await startApiStack({ root, dataDirName: "api-data", warmPoolSize: 1, log });
  try {
    log(`POST /v1/microvms → RUNNING ×${CREATES} (warm pool of 1, refilled between creates)`);
    const create: number[] = [];
    for (let i = 0; i < CREATES; i++) {
      await runtime.engine.prewarm(runtime.baseImage);
      const [vm, ms] = await timed(() => api("POST", "/v1/microvms", { image: "base" }));
      create.push(ms);
      await api("DELETE", `/v1/microvms/${vm.microVmId}`);
    }

    log("starting an app VM");
    const vm = await api("POST", "/v1/microvms", { image: "base", appPort: 8080, idlePolicy: { suspendAfterSeconds: 0 } });
    await api("POST", `/v1/microvms/${vm.microVmId}/exec`, { command: APP });
    await api("POST", `/v1/microvms/${vm.microVmId}/exec`, { command: WAIT_FOR_APP, timeoutSeconds: 120 });
    const auth = { authorization: `Bearer ${vm.endpoint.token}` };
    const routed = `/v1/microvms/${vm.microVmId}/http/`;
    const directPort = runtime.engine.get(vm.microVmId).hostPort(8080)!;
    for (let i = 0; i < 20; i++) await get(port, routed, auth); // warm both paths
    log(`endpoint requests ×${REQUESTS}, routed and direct`);
    const viaRouter: number[] = [];
    const firstByte: number[] = [];
    const direct: number[] = [];
    for (let i = 0; i < REQUESTS; i++) {
      const r = await get(port, routed, auth);
      viaRouter.push(r.totalMs);
      firstByte.push(r.firstByteMs);
      direct.push((await get(directPort, "/", {})).totalMs);
    }
    // BENCH_REQUESTS=0 (with BENCH_CREATES=0): the resume on request alone.
    log("throughput, 8 clients × 5 s, routed and direct");
    const rpsRouter = REQUESTS ? await throughput(port, routed, auth) : NaN;
    const rpsDirect = REQUESTS ? await throughput(directPort, "/", {}) : NaN;

    log(`resume on request ×${RESUMES}`);
    const resumeOnRequest: number[] = [];
    const resumeSteps: Record<string, number[]> = {};
    for (let i = 0; i < RESUMES; i++) {
      await api("POST", `/v1/microvms/${vm.microVmId}/suspend`);
      const steps = await traceResumeOnRequest(runtime.engine, microvms, () => get(port, routed, auth));
      resumeOnRequest.push(steps.total!);
      for (const [step, ms] of Object.entries(steps)) (resumeSteps[step] ??= []).push(ms);
    }
    await api("DELETE", `/v1/microvms/${vm.microVmId}`);

    const addedP50 = Math.round((summarize(viaRouter).p50 - summarize(direct).p50) * 10) / 10;
    const figures = {
      createToRunningMs: summarize(create),
      endpointFirstByteMs: summarize(firstByte),
      routedRequestMs: summarize(viaRouter),
      directRequestMs: summarize(direct),
      routerAddedLatencyP50Ms: addedP50,
      requestsPerSecond: { router: rpsRouter, direct: rpsDirect, concurrency: 8 },
      resumeOnRequestMs: summarize(resumeOnRequest),
      resumeOnRequestStepsMs: Object.fromEntries(Object.entries(resumeSteps).map(([k, v]) => [k, summarize(v)])),
      resumeOnRequestRawMs: resumeSteps,
    };
    const md = [
      `# API and router benchmark (${new Date().toISOString()})`,
      "",
      `Accelerator **${runtime.engine.accelerator}**, base image (1 vCPU, 512 MiB); the app is a single-threaded perl HTTP server in the guest.`,
      "",
      ...summaryTable("ms", [
      ["POST /v1/microvms → 201 RUNNING", figures.createToRunningMs],
      ["endpoint first byte (through the router)", figures.endpointFirstByteMs],
      ["request through the router", figures.routedRequestMs],
      ["request straight to the VM's forwarded port", figures.directRequestMs],
      ["request to a SUSPENDED VM (resume on request)", figures.resumeOnRequestMs],
      ]),
      "",
      `- Router's added latency (p50): **${addedP50} ms**`,
      `- Requests/s with 8 clients: **${rpsRouter}** through the router, ${rpsDirect} direct`,
      "",
      "Where a request to a SUSPENDED VM spends its time:",
      "",
      ...summaryTable("ms", Object.entries(figures.resumeOnRequestStepsMs)),
      "",
    ].join("\n");
    await writeResults("api", { at: new Date().toISOString(), accelerator: runtime.engine.accelerator, ...figures }, md);
    console.log(md);
  } finally {
    await close();
  }
  process.exit(0);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
