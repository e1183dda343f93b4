import { spawn } from "node:child_process";
import { run } from "../../util/process.ts";
import { vmUidRange } from "../jail/index.ts";
import { BLOCKED_V4, type AllowList } from "./policy.ts";

/**
 * nftables state for egress. One shared table; each VM's passt (and its jailed
 * QEMU) runs as a uid of its own (from the VM uid range, `vmUidRange`) and is
 * matched by `meta skuid`:
 *
 *   table inet cocoon
 *     chain output (filter, hook output): meta skuid vmap @vm_filter; any other
 *       uid of the range → only replies (QEMU's host-loopback forwards answer),
 *       else drop: a VM without egress, or whose chain is missing, sends nothing
 *     chain nat_output (nat, hook output): meta skuid vmap @vm_nat
 *     chain deny: TCP reset, else ICMP admin-prohibited, counted (Debian 12's
 *       passt does not relay the failure: the guest's connect times out)
 *     chain vm_<uid>: established → accept; DNS (DNAT-ed) → accept; host's own
 *       addresses → deny; non-IPv4 → drop; explicit allow CIDRs → accept;
 *       host on-link nets, private/link-local/multicast/reserved → deny;
 *       then internet: accept | allow list: names resolved by the VM's DNS filter
 *       (set dns_<uid>, with timeouts) → accept, else deny
 *     chain vmnat_<uid>: 10.0.2.3:53/udp → 127.0.0.1:<dns filter port>
 */
export const TABLE = "cocoon";
export async function nft(script: string): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const child = spawn("nft", ["-f", "-"], { stdio: ["pipe", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("error", (err: NodeJS.ErrnoException) =>
      reject(err.code === "ENOENT" ? new Error("nft is not installed (Debian package nftables; run scripts/setup.sh)") : err),
    );
    child.on("close", (code) => (code === 0 ? resolve() : reject(new Error(`nft failed (exit ${code}): ${stderr.trim().slice(-800)}\n${script}`))));
    child.stdin.end(script);
  });
}

/** The host's on-link IPv4 subnets (its LAN): never reachable from a guest. */
async function hostNets(): Promise<string[]> {
  const routes = JSON.parse(await run("ip", ["-4", "-j", "route", "show", "table", "main"])) as { dst: string; scope?: string }[];
  return routes.filter((r) => r.scope === "link" && r.dst !== "default").map((r) => (r.dst.includes("/") ? r.dst : `${r.dst}/32`));
}

/** Creates the shared table if absent (idempotent) and refreshes the host's on-link subnets. */
export async function ensureTable(): Promise<void> {
  const uids = vmUidRange();
  const range = `${uids.first}-${uids.first + uids.count - 1}`;
  const nets = await hostNets();
  await nft(`
add table inet ${TABLE}
add set inet ${TABLE} host_nets { type ipv4_addr; flags interval; auto-merge; }
add map inet ${TABLE} vm_filter { typeof meta skuid : verdict; }
add map inet ${TABLE} vm_nat { typeof meta skuid : verdict; }
add chain inet ${TABLE} deny
flush chain inet ${TABLE} deny
add rule inet ${TABLE} deny meta l4proto tcp counter reject with tcp reset
add rule inet ${TABLE} deny counter reject with icmpx type admin-prohibited
add chain inet ${TABLE} output { type filter hook output priority 0; policy accept; }
add chain inet ${TABLE} nat_output { type nat hook output priority -100; policy accept; }
flush chain inet ${TABLE} output
flush chain inet ${TABLE} nat_output
add rule inet ${TABLE} output meta skuid vmap @vm_filter
add rule inet ${TABLE} output meta skuid ${range} ct state established,related accept
add rule inet ${TABLE} output meta skuid ${range} drop
add rule inet ${TABLE} nat_output meta skuid vmap @vm_nat
flush set inet ${TABLE} host_nets
${nets.length ? `add element inet ${TABLE} host_nets { ${nets.join(", ")} }` : ""}
`);
}

export interface VmRules {
  uid: number;
  /** 127.0.0.1 UDP port of the VM's DNS filter. */
  dnsPort: number;
  mode: "internet" | "allow";
  allow: AllowList;
}

/** Installs (or replaces) one VM's chains, sets and map entries in one transaction. */
export async function installVm(r: VmRules): Promise<void> {
  await removeVm(r.uid);
  const u = r.uid;
  const t = `inet ${TABLE}`;
  const lines = [
    `add set ${t} allow_${u} { type ipv4_addr; flags interval; auto-merge; }`,
    r.allow.cidrs.length ? `add element ${t} allow_${u} { ${r.allow.cidrs.join(", ")} }` : "",
    `add set ${t} dns_${u} { type ipv4_addr; flags timeout; }`,
    `add chain ${t} vm_${u}`,
    `add rule ${t} vm_${u} ct state established,related accept`,
    `add rule ${t} vm_${u} ip daddr 127.0.0.1 udp dport ${r.dnsPort} ct status dnat accept`,
    `add rule ${t} vm_${u} fib daddr type { local, broadcast, multicast, anycast } goto deny`,
    `add rule ${t} vm_${u} meta nfproto != ipv4 drop`,
    `add rule ${t} vm_${u} ip daddr @allow_${u} accept`,
    `add rule ${t} vm_${u} ip daddr @host_nets goto deny`,
    `add rule ${t} vm_${u} ip daddr { ${BLOCKED_V4.join(", ")}, 255.255.255.255 } goto deny`,
    r.mode === "internet" ? `add rule ${t} vm_${u} accept` : `add rule ${t} vm_${u} ip daddr @dns_${u} accept`,
    `add rule ${t} vm_${u} goto deny`,
    `add chain ${t} vmnat_${u}`,
    `add rule ${t} vmnat_${u} ip daddr 10.0.2.3 udp dport 53 dnat ip to 127.0.0.1:${r.dnsPort}`,
    `add element ${t} vm_filter { ${u} : jump vm_${u} }`,
    `add element ${t} vm_nat { ${u} : jump vmnat_${u} }`,
  ];
  await nft(lines.filter(Boolean).join("\n"));
}

/** Lets a VM reach `ips` (answers to an allowed name) for `ttlSeconds`. */
export async function allowResolved(uid: number, ips: string[], ttlSeconds: number): Promise<void> {
  if (ips.length === 0) return;
  const set = `inet ${TABLE} dns_${uid}`;
  // add + delete + add: refreshes the timeout of an element that is already there.
  const el = ips.join(", ");
  await nft(`add element ${set} { ${el} }\ndelete element ${set} { ${el} }\nadd element ${set} { ${ips.map((ip) => `${ip} timeout ${ttlSeconds}s`).join(", ")} }`);
}

/** Removes everything `installVm` added for `uid`; absent parts are skipped. */
export async function removeVm(uid: number): Promise<void> {
  const t = `inet ${TABLE}`;
  const steps = [
    `delete element ${t} vm_filter { ${uid} }`,
    `delete element ${t} vm_nat { ${uid} }`,
    `flush chain ${t} vm_${uid}`,
    `delete chain ${t} vm_${uid}`,
    `flush chain ${t} vmnat_${uid}`,
    `delete chain ${t} vmnat_${uid}`,
    `delete set ${t} allow_${uid}`,
    `delete set ${t} dns_${uid}`,
  ];
  try {
    await nft(steps.join("\n"));
  } catch {
    for (const s of steps) await nft(s).catch(() => undefined);
  }
}

/** Every nft object of the table that belongs to `uid` (for tests and leak checks). */
export async function vmObjects(uid: number): Promise<string[]> {
  const out = await run("nft", ["list", "table", "inet", TABLE]).catch(() => "");
  return out.split("\n").filter((l) => l.includes(String(uid)));
}
