import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium, type BrowserContext, type Page } from "playwright-core";
import { afterAll, describe, expect, it } from "vitest";
import { CONSOLE_DIST } from "../../src/api/routes/console.ts";
import { useServerProcess } from "../support/server-process.ts";
import { makeZip } from "../support/zip.ts";

// The web console in headless Debian chromium against a real `cocoon server` with real VMs.
const CHROMIUM = process.env.COCOON_CHROMIUM ?? "/usr/bin/chromium";
const ARTIFACTS = join(process.cwd(), "test-artifacts", "console");

// scripts/setup.sh builds the console; a direct `vitest run` of this file builds it too.
if (!existsSync(join(CONSOLE_DIST, "index.html"))) execFileSync("npm", ["run", "build", "-w", "packages/console"], { stdio: "inherit" });
if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium (as root)`);

const server = await useServerProcess();
await mkdir(ARTIFACTS, { recursive: true });
const profile = await mkdtemp(join(tmpdir(), "cocoon-chromium-"));
const context: BrowserContext = await chromium.launchPersistentContext(profile, {
  executablePath: CHROMIUM,
  headless: true,
  viewport: { width: 1366, height: 768 },
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
afterAll(async () => {
  await context.close();
  await rm(profile, { recursive: true, force: true });
});

const page: Page = context.pages()[0] ?? (await context.newPage());
const pageErrors: string[] = [];
const foreignRequests: string[] = [];
page.on("pageerror", (err) => pageErrors.push(err.message));
page.on("request", (req) => {
  if (!req.url().startsWith(server.url) && !req.url().startsWith(server.url.replace("http", "ws"))) foreignRequests.push(req.url());
});

const shot = (name: string) => page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });
const badge = (state: string) => page.locator("#vmTitle .badge").filter({ hasText: new RegExp(`^${state}$`) });
const api = async (path: string) => (await fetch(`${server.url}${path}`, { headers: { authorization: `Bearer ${server.adminKey}` } })).json() as Promise<{ state: string; forkedFrom?: string }>;

describe("web console", () => {
  it("signs in, creates a VM, runs a command in its terminal, suspends, resumes and terminates it", { timeout: 240_000 }, async () => {
    await page.goto(`${server.url}/console/`);
    await page.getByLabel("API key").fill("not-a-key");
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("alert").filter({ hasText: "not valid" }).waitFor();
    await shot("sign-in");
    await page.getByLabel("API key").fill(server.adminKey);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("heading", { name: "MicroVMs" }).waitFor();
    expect(await page.evaluate(() => [sessionStorage.length, localStorage.length])).toEqual([1, 0]);

    // Create: an out-of-range value shows the API's message next to its field.
    await page.getByRole("link", { name: "Create microVM" }).click();
    await page.getByLabel("Memory (MiB)").fill("64");
    await page.getByRole("button", { name: "Create" }).click();
    const memoryError = page.locator("#f-memoryMiB-error");
    await memoryError.waitFor();
    expect(await memoryError.textContent()).toContain("memoryMiB");
    expect(await page.getByLabel("Memory (MiB)").getAttribute("aria-invalid")).toBe("true");
    await shot("create");
    await page.getByLabel("Memory (MiB)").fill("512");
    await page.getByLabel("Suspend after idle (s)").fill("0");
    await page.getByLabel("Environment (NAME=value per line)").fill("GREETING=hi");
    await page.getByRole("button", { name: "Create" }).click();
    await page.waitForURL(/#\/vms\/vm-/, { timeout: 120_000 });
    const id = decodeURIComponent(new URL(page.url()).hash.split("/")[2]!);
    await badge("RUNNING").waitFor();
    await page.locator(".timeline li").first().waitFor();
    await page.getByRole("button", { name: "Copy endpoint URL with token" }).waitFor();
    expect(await page.locator(".endpoint code").textContent()).toMatch(new RegExp(`^http://${id}\\.vm\\.localhost:\\d+/\\?cocoon_token=`));
    await page.locator(".chart polyline").first().waitFor({ timeout: 20_000 });
    await shot("vm-details");

    // The list shows it with its live state.
    await page.getByRole("link", { name: "MicroVMs", exact: true }).click();
    await page.locator(`tr[data-vm-id="${id}"]`).filter({ hasText: "RUNNING" }).waitFor();
    await shot("vm-list");
    await page.locator(`a[href="#/vms/${id}"]`).click();

    // Terminal: xterm over the WebSocket.
    await page.getByRole("link", { name: "Terminal" }).click();
    await page.locator('[data-terminal-status="connected"]').waitFor({ timeout: 60_000 });
    await runInTerminal(page, "echo hello-$((6*7))", "hello-42");
    await shot("terminal");
    await page.keyboard.press("Control+BracketRight");
    expect(await page.evaluate(() => document.activeElement?.textContent)).toBe("Reconnect");

    // Suspend and resume with the buttons.
    await page.getByRole("link", { name: "Overview" }).click();
    await page.getByRole("button", { name: "Suspend" }).click();
    await badge("SUSPENDED").waitFor({ timeout: 60_000 });
    expect((await api(`/v1/microvms/${id}`)).state).toBe("SUSPENDED");
    await page.getByRole("button", { name: "Resume" }).click();
    await badge("RUNNING").waitFor({ timeout: 60_000 });
    expect((await api(`/v1/microvms/${id}`)).state).toBe("RUNNING");
    // The state history chart, drawn from the events, shows the round trip.
    await page.locator('svg[aria-label="State history: running, then suspended, then running"]').waitFor({ timeout: 10_000 });
    await shot("vm-state-history");

    // Snapshot and fork with the buttons; the child's page names its parent.
    await page.getByRole("textbox", { name: "Snapshot image name" }).fill("console-snap");
    await page.getByRole("button", { name: "Snapshot", exact: true }).click();
    await page.getByRole("status").filter({ hasText: "Snapshot console-snap version 1 is READY" }).waitFor({ timeout: 60_000 });
    await page.getByRole("button", { name: "Fork" }).click();
    await page.getByRole("link", { name: id }).waitFor({ timeout: 60_000 });
    const child = decodeURIComponent(new URL(page.url()).hash.split("/")[2]!);
    expect((await api(`/v1/microvms/${child}`)).forkedFrom).toBe(id);
    await shot("vm-forked");
    await fetch(`${server.url}/v1/microvms/${child}`, { method: "DELETE", headers: { authorization: `Bearer ${server.adminKey}` } });
    await page.getByRole("link", { name: id }).click();
    await badge("RUNNING").waitFor({ timeout: 10_000 });

    // The terminal resumes a suspended VM.
    await page.getByRole("button", { name: "Suspend" }).click();
    await badge("SUSPENDED").waitFor({ timeout: 60_000 });
    await page.getByRole("link", { name: "Terminal" }).click();
    await page.locator('[data-terminal-status="connected"]').waitFor({ timeout: 60_000 });
    await runInTerminal(page, "echo again-$((2+3))", "again-5");
    await badge("RUNNING").waitFor({ timeout: 10_000 });

    // Logs show the VM's console output (what the guest printed to its serial console).
    await fetch(`${server.url}/v1/microvms/${id}/exec`, {
      method: "POST",
      headers: { authorization: `Bearer ${server.adminKey}`, "content-type": "application/json" },
      body: JSON.stringify({ command: "echo hello-from-the-console > /dev/ttyS0" }),
    });
    await page.getByRole("link", { name: "Logs" }).click();
    await page.locator('[data-logs-status="following…"]').waitFor({ timeout: 20_000 });
    await page.locator("pre.logs").filter({ hasText: "hello-from-the-console" }).waitFor({ timeout: 20_000 });
    await shot("logs");

    // Terminate asks first.
    await page.getByRole("button", { name: "Terminate" }).click();
    await page.getByRole("alertdialog").waitFor();
    await page.getByRole("button", { name: "Yes, terminate" }).click();
    await badge("TERMINATED").waitFor({ timeout: 60_000 });
    expect((await api(`/v1/microvms/${id}`)).state).toBe("TERMINATED");
    await shot("vm-terminated");

    expect(pageErrors).toEqual([]);
    expect(foreignRequests).toEqual([]);
  });

  it("builds an image from a Dockerfile and a zip with its build log streaming, describes and deletes it", { timeout: 240_000 }, async () => {
    await page.getByRole("link", { name: "Images", exact: true }).click();
    await page.getByRole("heading", { name: "Images" }).waitFor();
    await shot("images");
    const code = { name: "code.zip", mimeType: "application/zip", buffer: makeZip([{ name: "hello.txt", data: "hello from the console\n" }]) };
    await page.getByLabel("Name", { exact: true }).fill("console-demo");
    // A Dockerfile the API refuses: its message is shown.
    await page.getByLabel("Dockerfile").fill("FROM debian:bookworm-slim\nONBUILD RUN true\n");
    await page.getByLabel("Code (.zip)").setInputFiles(code);
    await page.getByRole("button", { name: "Build image" }).click();
    await page.getByRole("alert").filter({ hasText: "line 2" }).waitFor();

    await page.getByLabel("Dockerfile").fill('FROM debian:bookworm-slim\nCOPY hello.txt /srv/\nCMD ["sleep", "infinity"]\n');
    await page.getByLabel("Code (.zip)").setInputFiles(code);
    await page.getByRole("button", { name: "Build image" }).click();
    await page.waitForURL(/#\/images\/[^/]+$/);
    const imageId = decodeURIComponent(new URL(page.url()).hash.split("/")[2]!);
    await page.locator("pre.logs").filter({ hasText: /\S/ }).waitFor({ timeout: 60_000 });
    await page.locator("#imageTitle .badge").filter({ hasText: /^READY$/ }).waitFor({ timeout: 180_000 });
    await page.locator("pre.logs").filter({ hasText: "READY in" }).waitFor({ timeout: 10_000 });
    await page.locator("table.list tr", { hasText: "console-demo" }).filter({ hasText: "READY" }).waitFor();
    await shot("image-details");
    await page.getByRole("link", { name: "Launch a microVM" }).click();
    // The URL changes before the launch form replaces the images page, whose
    // "Images" region, search box and table match the label "Image" too: read
    // the field inside the launch form, once it is there.
    await page.waitForURL(/#\/vms\/new\//);
    const launchForm = page.getByRole("region", { name: "Create a microVM" });
    expect(await launchForm.getByLabel("Image", { exact: true }).inputValue()).toBe("console-demo");
    await page.goBack();

    await page.getByRole("button", { name: "Delete image" }).click();
    await page.getByRole("button", { name: "Yes, delete" }).click();
    await page.waitForURL(/#\/images$/);
    const res = await fetch(`${server.url}/v1/images/${imageId}`, { headers: { authorization: `Bearer ${server.adminKey}` } });
    expect(res.status).toBe(404);
    expect(pageErrors).toEqual([]);
    expect(foreignRequests).toEqual([]);
  });

  it("creates a volume, shows the API's message for a bad one, and deletes it", async () => {
    await page.getByRole("link", { name: "Volumes", exact: true }).click();
    const form = page.getByRole("form", { name: "Create a volume" });
    await form.getByLabel("Name").fill("Bad Name");
    await form.getByRole("button", { name: "Create" }).click();
    await form.getByRole("alert").filter({ hasText: "name must match" }).waitFor();
    await form.getByLabel("Name").fill("console-vol");
    await form.getByLabel("Size (GiB)").fill("2");
    await form.getByRole("button", { name: "Create" }).click();
    const row = page.locator("table.list tr", { hasText: "console-vol" });
    await row.filter({ hasText: "AVAILABLE" }).filter({ hasText: "2 GiB" }).waitFor();
    await shot("volumes");
    await page.getByRole("button", { name: "Delete volume console-vol" }).click();
    await row.waitFor({ state: "detached" });
    expect((await fetch(`${server.url}/v1/volumes/console-vol`, { headers: { authorization: `Bearer ${server.adminKey}` } })).status).toBe(404);
    expect(pageErrors).toEqual([]);
  });
});

/** Types a command into the xterm and waits for `expected` in its rendered rows. */
async function runInTerminal(page: Page, command: string, expected: string): Promise<void> {
  await page.locator(".xterm-helper-textarea").focus();
  await page.keyboard.type(command);
  await page.keyboard.press("Enter");
  try {
    await page.locator(".xterm-rows").filter({ hasText: expected }).waitFor({ timeout: 30_000 });
  } catch (err) {
    await page.screenshot({ path: join(ARTIFACTS, "failed-terminal.png") });
    throw err;
  }
}
