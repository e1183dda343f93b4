import { randomBytes } from "node:crypto";
import { ApiError } from "../errors.ts";

/** How long a ticket is good for, once. */
export const TICKET_TTL_MS = 30_000;
/** Outstanding tickets kept at most (each ~100 bytes); past it the oldest are dropped. */
const MAX_OUTSTANDING = 10_000;

/**
 * One-time tickets for the terminal WebSocket, so a browser need not put its
 * API key in a URL (where proxies and logs keep it): `POST …/terminal/tickets`
 * with the key, then `?ticket=` on the upgrade. A ticket names its tenant and
 * VM, lives 30 s and is gone once used. Held in this server's memory: a
 * ticket is redeemed on the host that issued it.
 */
export class TerminalTickets {
  private readonly tickets = new Map<string, { tenantId: string; vmId: string; expiresAtMs: number }>();

  issue(tenantId: string, vmId: string, nowMs = Date.now()): { ticket: string; expiresAt: string } {
    for (const [t, v] of this.tickets) if (v.expiresAtMs <= nowMs || this.tickets.size >= MAX_OUTSTANDING) this.tickets.delete(t);
    const ticket = `tt_${randomBytes(24).toString("base64url")}`;
    const expiresAtMs = nowMs + TICKET_TTL_MS;
    this.tickets.set(ticket, { tenantId, vmId, expiresAtMs });
    return { ticket, expiresAt: new Date(expiresAtMs).toISOString() };
  }

  /** The tenant a ticket was issued to, for `vmId`; the ticket is used up. 401 if unknown, used, expired or for another VM. */
  redeem(ticket: string, vmId: string, nowMs = Date.now()): string {
    const entry = this.tickets.get(ticket);
    this.tickets.delete(ticket);
    if (!entry || entry.expiresAtMs <= nowMs || entry.vmId !== vmId) throw new ApiError("Unauthorized", "unknown, used or expired terminal ticket (tickets last 30 s and open one terminal)");
    return entry.tenantId;
  }
}
