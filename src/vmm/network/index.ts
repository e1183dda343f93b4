import type { PortForward } from "../qemu.ts";
import { DnsFilter } from "./dns.ts";
import { allowResolved, ensureTable, installVm, removeVm } from "./nft.ts";
import { passtPaths, startPasst, stopPasst } from "./passt.ts";
import { nameAllowed, parseEgress, splitAllowList, type Egress } from "./policy.ts";

export { InvalidEgressError, parseEgress, type Egress } from "./policy.ts";

/** What a VM record keeps about its network (so resume and re-adoption rebuild it). */
export interface VmNetworkRecord {
  egress: Egress;
  /** uid of the VM's passt (egress other than "none"): the VM's own uid, which its QEMU runs as too. */
  uid?: number;
}

/** How QEMU attaches `net0`: user-mode (no egress; hostfwd) or a passt socket. */
export type NetBackend = { kind: "user" } | { kind: "passt"; socket: string };

/**
 * Per-VM networking on the host (see docs/networking.md):
 * - egress "none": QEMU's user-mode netdev with restrict=on, nothing else;
 * - "internet" / allow list: a passt process as a uid of the VM's own, nftables
 *   rules matching that uid, and a DNS filter in this process.
 * The DNS filters live in the server process: a restarted server recreates them
 * with `adopt`; VMs keep running meanwhile (only name lookups pause).
 */
export class NetworkManager {
  private readonly dns = new Map<number, DnsFilter>();

  constructor(private readonly log?: (msg: string) => void) {}

  /** A record for a new VM whose processes run as `uid`: validates the policy. */
  allocate(egress: unknown, uid: number): VmNetworkRecord {
    const parsed = parseEgress(egress);
    return parsed === "none" ? { egress: parsed } : { egress: parsed, uid };
  }

  /**
   * Sets up the host side for a VM about to start (launch or resume) and
   * returns how QEMU must attach. For passt the forwards are passt's; for
   * user-mode QEMU's hostfwd does them.
   */
  async start(net: VmNetworkRecord, forwards: PortForward[]): Promise<NetBackend> {
    if (net.egress === "none" || net.uid === undefined) return { kind: "user" };
    const uid = net.uid;
    try {
      await this.rules(net);
      await startPasst(uid, forwards);
    } catch (err) {
      await this.stop(net);
      throw err;
    }
    return { kind: "passt", socket: passtPaths(uid).socket };
  }

  /** After a server restart: the VM (and its passt) run on; rebuild the DNS filter and rules. */
  async adopt(net: VmNetworkRecord): Promise<void> {
    if (net.egress !== "none" && net.uid !== undefined) await this.rules(net);
  }

  /** Removes everything the VM had on the host: passt, DNS filter, nftables objects. Idempotent. */
  async stop(net: VmNetworkRecord | undefined): Promise<void> {
    if (!net || net.uid === undefined) return;
    await stopPasst(net.uid);
    this.detach(net);
    await removeVm(net.uid);
  }

  /** Closes the VM's DNS filter only (server shutdown; the VM runs on). */
  detach(net: VmNetworkRecord | undefined): void {
    if (net?.uid === undefined) return;
    this.dns.get(net.uid)?.close();
    this.dns.delete(net.uid);
  }

  private async rules(net: VmNetworkRecord): Promise<void> {
    const uid = net.uid!;
    const allow = typeof net.egress === "object" ? splitAllowList(net.egress.allow) : { cidrs: [], names: [], suffixes: [] };
    const mode = net.egress === "internet" ? "internet" : "allow";
    this.detach(net);
    const dns = await DnsFilter.start({
      log: this.log,
      allowName: mode === "allow" ? (q) => nameAllowed(allow, q) : undefined,
      onResolved: mode === "allow" ? (ips, ttl) => allowResolved(uid, ips, ttl) : undefined,
    });
    this.dns.set(uid, dns);
    await ensureTable();
    await installVm({ uid, dnsPort: dns.port, mode, allow });
  }
}
