/**
 * A minimal writer for the "newc" cpio format the kernel unpacks as an
 * initramfs. Written by hand so the archive can hold device nodes without
 * root (mknod) and is byte-for-byte reproducible (fixed owners and times).
 */
export type CpioEntry =
  | { kind: "dir"; path: string; mode?: number }
  | { kind: "file"; path: string; data: Buffer; mode?: number }
  | { kind: "chardev"; path: string; major: number; minor: number; mode?: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFCHR = 0o020000;

const hex8 = (n: number) => n.toString(16).padStart(8, "0");
const pad4 = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);

function header(ino: number, mode: number, size: number, name: string, rdevMajor = 0, rdevMinor = 0): Buffer {
  const nameBuf = Buffer.from(`${name}\0`);
  const fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, rdevMajor, rdevMinor, nameBuf.length, 0];
  const head = Buffer.from(`070701${fields.map(hex8).join("")}`);
  return Buffer.concat([head, nameBuf, pad4(head.length + nameBuf.length)]);
}

export function buildCpio(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  entries.forEach((e, i) => {
    const ino = i + 1;
    const path = e.path.replace(/^\/+/, "");
    switch (e.kind) {
      case "dir":
        parts.push(header(ino, S_IFDIR | (e.mode ?? 0o755), 0, path));
        break;
      case "file":
        parts.push(header(ino, S_IFREG | (e.mode ?? 0o644), e.data.length, path), e.data, pad4(e.data.length));
        break;
      case "chardev":
        parts.push(header(ino, S_IFCHR | (e.mode ?? 0o600), 0, path, e.major, e.minor));
        break;
      default: {
        const never: never = e;
        throw new Error(`unknown cpio entry ${JSON.stringify(never)}`);
      }
    }
  });
  parts.push(header(0, 0, 0, "TRAILER!!!"));
  return Buffer.concat(parts);
}
