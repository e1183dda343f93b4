import type { NetBackend, PortForward } from "../qemu.ts";
import { DnsBudget, DnsFilter, DNS_LIMITS } from "./dns.ts";
import { ensureTable, hostNets, installVm, refreshHostNets, removeVm, ResolvedSet, TABLE } from "./nft.ts";
import { passtPaths, startPasst, stopPasst } from "./passt.ts";
import { egressPrivateAllow, nameAllowed, parseEgress, splitAllowList, type Egress } from "./policy.ts";

export { InvalidEgressError, parseEgress, type Egress } from "./policy.ts";

/** What a VM record keeps about its network (so resume and re-adoption rebuild it). */
export interface VmNetworkRecord {
  egress: Egress;
  /** uid of the VM's passt (egress other than "none"): the VM's own uid, which its QEMU runs as too. */
  uid?: number;
}

/**
 * Per-VM networking on the host (see docs/networking.md):
 * - egress "none": QEMU's user-mode netdev with restrict=on, nothing else;
 * - "internet" / allow list: a passt process as a uid of the VM's own, nftables
 *   rules matching that uid, and a DNS filter in this process.
 * The DNS filters live in the server process: a restarted server recreates them
 * with `adopt`; VMs keep running meanwhile (only name lookups pause). They
 * share one budget of queries in flight (DNS_LIMITS).
 */
export class NetworkManager {
  private readonly dns = new Map<number, { filter: DnsFilter; resolved?: ResolvedSet }>();
  private readonly dnsBudget = new DnsBudget(DNS_LIMITS.inFlightTotal);
  /** While any VM has rules: the host's networks are re-read every few seconds and host_nets rewritten when they change. */
  private hostNetsWatch: { timer: NodeJS.Timeout; last: string } | undefined;

  constructor(private readonly log?: (msg: string) => void) {
    egressPrivateAllow(); // a bad COCOON_EGRESS_PRIVATE_ALLOW stops the server at start, not its first VM
  }

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
    const dns = this.dns.get(net.uid);
    dns?.filter.close();
    dns?.resolved?.close();
    this.dns.delete(net.uid);
    if (this.dns.size === 0 && this.hostNetsWatch) {
      clearInterval(this.hostNetsWatch.timer);
      this.hostNetsWatch = undefined;
    }
  }

  private async rules(net: VmNetworkRecord): Promise<void> {
    const uid = net.uid!;
    const allow = typeof net.egress === "object" ? splitAllowList(net.egress.allow) : { cidrs: [], names: [], suffixes: [] };
    const mode = net.egress === "internet" ? "internet" : "allow";
    const privateAllow = egressPrivateAllow();
    this.detach(net);
    const resolved = mode === "allow" ? new ResolvedSet(`inet ${TABLE} dns_${uid}`, { privateAllow, log: this.log }) : undefined;
    const filter = await DnsFilter.start({
      log: this.log,
      budget: this.dnsBudget,
      allowName: mode === "allow" ? (q) => nameAllowed(allow, q) : undefined,
      onResolved: resolved && ((ips, ttl) => resolved.add(ips, ttl)),
    });
    this.dns.set(uid, { filter, resolved });
    await ensureTable();
    await installVm({ uid, dnsPort: filter.port, mode, allow, privateAllow });
    this.watchHostNets();
  }

  private watchHostNets(): void {
    if (this.hostNetsWatch) return;
    const poll = () => {
      const nets = hostNets();
      if (JSON.stringify(nets) === watch.last) return;
      watch.last = JSON.stringify(nets);
      refreshHostNets(nets).catch((err: Error) => this.log?.(`refreshing the host's networks in nftables: ${err.message}`));
    };
    const watch = { last: JSON.stringify(hostNets()), timer: setInterval(poll, HOST_NETS_POLL_MS).unref() };
    this.hostNetsWatch = watch;
  }
}

/** How often the host's networks are compared with host_nets (getifaddrs, no process). The host's own addresses need no poll: `fib daddr type local` is live. */
const HOST_NETS_POLL_MS = 5000;
