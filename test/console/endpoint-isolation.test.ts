import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium, type BrowserContext, type Page } from "playwright-core";
import { afterAll, describe, expect, it } from "vitest";
import { useApi } from "../support/api-fixture.ts";
import { serveStatic } from "../support/guest-apps.ts";

/**
 * Endpoints in a real browser (Debian's headless chromium): a page served by
 * VM A, on either endpoint form, must not reach VM B's endpoint with the
 * cookies the browser holds for B, nor take over the API's origin (the
 * console's stored key, a service worker over /console/).
 */
const CHROMIUM = process.env.COCOON_CHROMIUM ?? "/usr/bin/chromium";
if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium (as root)`);

const api = await useApi();
const port = Number(new URL(api.url).port);
const key = await api.tenantKey("judy");

/** What a page tried and what came of it: "blocked: …" or what it got. */
const PROBE = `
async function attempt(fn) { try { return await fn(); } catch (e) { return "blocked: " + (e && e.name); } }
function driveSocket(url) {
  return new Promise((resolve) => {
    let ws;
    try { ws = new WebSocket(url); } catch (e) { return resolve("blocked: " + e.name); }
    ws.onopen = () => ws.send("drive");
    ws.onmessage = (e) => { resolve("drove: " + e.data); ws.close(); };
    ws.onerror = () => resolve("blocked: error");
    ws.onclose = () => resolve("blocked: closed");
    setTimeout(() => resolve("blocked: timeout"), 15000);
  });
}
async function probe(target) {
  return {
    read: await attempt(async () => { const r = await fetch(target.http, { credentials: "include" }); return "read " + r.status + ": " + (await r.text()); }),
    post: await attempt(async () => { const r = await fetch(target.http, { method: "POST", credentials: "include" }); return "posted " + r.status; }),
    socket: await driveSocket(target.ws),
    storage: await attempt(async () => "read " + sessionStorage.getItem("cocoon.apiKey")),
    serviceWorker: await attempt(async () => { await navigator.serviceWorker.register(target.sw, { scope: "/console/" }); return "registered"; }),
  };
}
const q = new URLSearchParams(location.search);
window.results = probe({ http: q.get("http"), ws: q.get("ws"), sw: q.get("sw") });
`;

async function createVm(files: Record<string, string>, endpoint: { public: boolean }) {
  const res = await api.call("POST", "/v1/microvms", { key, body: { image: "base", appPort: 8080, idlePolicy: { suspendAfterSeconds: 0 }, endpoint } });
  expect(res.status, res.text).toBe(201);
  const vm = res.body as { microVmId: string; endpoint: { token: string } };
  await serveStatic(api, key, vm.microVmId, 8080, files);
  return { id: vm.microVmId, token: vm.endpoint.token, host: `${vm.microVmId}.vm.localhost:${port}` };
}

const page = `<!doctype html><title>probe</title><script>${PROBE}</script>`;
// A is the attacker's: public, so anyone's browser loads its pages. B is private.
const a = await createVm({ "probe.html": page, "sw.js": "self.addEventListener('fetch', () => {});", "sw.js.headers": "Service-Worker-Allowed: /\r\n" }, { public: true });
const b = await createVm({ "probe.html": page, "secret.txt": "B-SECRET" }, { public: false });

const profile = await mkdtemp(join(tmpdir(), "cocoon-chromium-"));
const context: BrowserContext = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
afterAll(async () => {
  await context.close();
  await rm(profile, { recursive: true, force: true });
});
const tab: Page = context.pages()[0] ?? (await context.newPage());

type Results = { read: string; post: string; socket: string; storage: string; serviceWorker: string };
async function probeFrom(url: string, target: { http: string; ws: string; sw: string }): Promise<Results> {
  const query = new URLSearchParams(target).toString();
  await tab.goto(`${url}${url.includes("?") ? "&" : "?"}${query}`);
  return tab.evaluate(() => (window as unknown as { results: Promise<Results> }).results);
}

describe("endpoints in the browser", () => {
  it("the victim holds B's cookies, and B's own page uses them (the control)", async () => {
    // The user opens B's endpoint on both forms with its token once: the cookies are set.
    await tab.goto(`${api.url}/v1/microvms/${b.id}/http/secret.txt?cocoon_token=${b.token}`);
    expect(await tab.textContent("body")).toBe("B-SECRET");
    await tab.goto(`http://${b.host}/secret.txt?cocoon_token=${b.token}`);
    expect(await tab.textContent("body")).toBe("B-SECRET");
    // The console's key in the API origin's session storage, as a signed-in user has it.
    await tab.goto(`${api.url}/v1/health`);
    await tab.evaluate((k) => sessionStorage.setItem("cocoon.apiKey", k), key);
    // B's page on B's own host reaches B, WebSocket included, with its cookie.
    const own = await probeFrom(`http://${b.host}/probe.html`, { http: `http://${b.host}/secret.txt`, ws: `ws://${b.host}/ws`, sw: "/sw.js" });
    expect(own.read).toBe("read 200: B-SECRET");
    expect(own.socket).toBe("drove: echo:drive");
  });

  it("a page of A on the path form (the API's origin) cannot read B, drive B's WebSocket, read the console's key or register a service worker over /console/", async () => {
    const results = await probeFrom(`${api.url}/v1/microvms/${a.id}/http/probe.html`, {
      http: `${api.url}/v1/microvms/${b.id}/http/secret.txt`,
      ws: `ws://127.0.0.1:${port}/v1/microvms/${b.id}/http/ws`,
      sw: `/v1/microvms/${a.id}/http/sw.js`,
    });
    expect(results.read).toMatch(/^blocked/);
    expect(results.socket).toMatch(/^blocked/);
    expect(results.storage).toMatch(/^blocked: SecurityError/);
    expect(results.serviceWorker).toMatch(/^blocked/);
    expect(results.post).not.toMatch(/^posted 2/);
  });

  it("a page of A on its own host (same site as B's) cannot read B or drive B's WebSocket", async () => {
    const results = await probeFrom(`http://${a.host}/probe.html`, { http: `http://${b.host}/secret.txt`, ws: `ws://${b.host}/ws`, sw: "/sw.js" });
    expect(results.read).toMatch(/^blocked/);
    expect(results.socket).toMatch(/^blocked/);
    // The console's key lives in another origin.
    expect(results.storage).toBe("read null");
  });
});
