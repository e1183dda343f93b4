import { createCipheriv, createDecipheriv, hkdfSync, randomBytes } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { writeFileAtomic } from "../util/files.ts";

const MASTER_KEY_FILE = "master.key";
const SEALED_PREFIX = "v1.";

/**
 * The server's master key (`<dataDir>/master.key`, 32 random bytes, mode
 * 0600, made on first start) and what is derived from it: sealed secrets
 * (AES-256-GCM) and purpose-bound subkeys (HKDF-SHA256). The database alone
 * never reveals a secret: a sealed value is useless without this file, which
 * is never stored in the database or sent anywhere (SECURITY.md).
 */
export class ServerSecrets {
  private readonly sealKey: Buffer;

  private constructor(private readonly master: Buffer) {
    this.sealKey = this.derive("sealed-secrets");
  }

  /** Reads the master key, or creates it; refuses a key file other users can read. */
  static async open(dataDir: string): Promise<ServerSecrets> {
    const path = join(dataDir, MASTER_KEY_FILE);
    const st = await stat(path).catch(() => undefined);
    if (!st) {
      await writeFileAtomic(path, randomBytes(32).toString("hex") + "\n", 0o600);
      return ServerSecrets.open(dataDir);
    }
    if ((st.mode & 0o077) !== 0) throw new Error(`${path} is readable by other users (mode ${(st.mode & 0o777).toString(8)}): chmod 600 it`);
    const hex = (await readFile(path, "utf8")).trim();
    if (!/^[0-9a-f]{64}$/.test(hex)) throw new Error(`${path} must hold 64 hex digits (a 32-byte key)`);
    return new ServerSecrets(Buffer.from(hex, "hex"));
  }

  /** A 32-byte key for one purpose; the same master key and purpose always give the same key. */
  derive(purpose: string): Buffer {
    return Buffer.from(hkdfSync("sha256", this.master, Buffer.alloc(0), `cocoon/${purpose}`, 32));
  }

  /** Encrypts `plaintext`, bound to `context` (e.g. the row's id): a sealed value moved to another row does not open. */
  seal(plaintext: string, context: string): string {
    const iv = randomBytes(12);
    const cipher = createCipheriv("aes-256-gcm", this.sealKey, iv);
    cipher.setAAD(Buffer.from(context));
    const body = Buffer.concat([cipher.update(plaintext, "utf8"), cipher.final()]);
    return SEALED_PREFIX + Buffer.concat([iv, cipher.getAuthTag(), body]).toString("base64url");
  }

  /** The plaintext of a `seal` result; throws if it was altered, sealed for another context or under another master key. */
  unseal(sealed: string, context: string): string {
    if (!sealed.startsWith(SEALED_PREFIX)) throw new Error("not a sealed value");
    const raw = Buffer.from(sealed.slice(SEALED_PREFIX.length), "base64url");
    const decipher = createDecipheriv("aes-256-gcm", this.sealKey, raw.subarray(0, 12));
    decipher.setAAD(Buffer.from(context));
    decipher.setAuthTag(raw.subarray(12, 28));
    return Buffer.concat([decipher.update(raw.subarray(28)), decipher.final()]).toString("utf8");
  }
}
