/**
 * Image references as Docker reads them (distribution's reference grammar):
 * `[registry/]repository[:tag][@sha256:…]`. A first component with a `.` or
 * a `:`, or `localhost`, is a registry; otherwise the image is on Docker Hub
 * (`docker.io`), and a one-component name is an official image under
 * `library/`.
 */
export interface ImageReference {
  /** Lower-case host[:port]; Docker Hub is always `docker.io`. */
  registry: string;
  /** e.g. `library/python`, `owner/app`. */
  repository: string;
  /** Absent only when `digest` is given (a bare name means `latest`). */
  tag?: string;
  /** `sha256:<64 hex>`: pins the manifest (or manifest list). */
  digest?: string;
}

export const DOCKER_HUB = "docker.io";
/** Names Docker Hub is also known by; credentials and references use `docker.io`. */
const DOCKER_HUB_ALIASES = new Set(["docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"]);

const HOST = /^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*(?::\d{1,5})?$/;
const PATH_COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const DIGEST = /^sha256:[a-f0-9]{64}$/;

/** A registry host as credentials and references store it (lower case, Docker Hub as `docker.io`), or undefined if it is not a host[:port]. */
export function normalizeRegistryHost(host: string): string | undefined {
  const h = host.trim().toLowerCase().replace(/^https?:\/\//, "").replace(/\/+$/, "");
  if (h.length > 255 || !HOST.test(h)) return undefined;
  const port = h.includes(":") ? Number(h.split(":")[1]) : undefined;
  if (port !== undefined && (port < 1 || port > 65535)) return undefined;
  return DOCKER_HUB_ALIASES.has(h) ? DOCKER_HUB : h;
}

/** Parses a reference; undefined if it is not one (the caller names the line or field). */
export function parseImageReference(text: string): ImageReference | undefined {
  if (text.length > 512) return undefined;
  let rest = text;
  let digest: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) return undefined;
  }
  let tag: string | undefined;
  const lastSlash = rest.lastIndexOf("/");
  const colon = rest.lastIndexOf(":");
  if (colon > lastSlash) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG.test(tag)) return undefined;
  }
  const parts = rest.split("/");
  let registry = DOCKER_HUB;
  const first = parts[0]!;
  if (parts.length > 1 && (first.includes(".") || first.includes(":") || first === "localhost")) {
    const host = /^[A-Za-z0-9.:-]+$/.test(first) ? normalizeRegistryHost(first) : undefined;
    if (!host) return undefined;
    registry = host;
    parts.shift();
  }
  if (parts.length === 0 || !parts.every((p) => PATH_COMPONENT.test(p))) return undefined;
  if (registry === DOCKER_HUB && parts.length === 1) parts.unshift("library");
  const repository = parts.join("/");
  if (registry.length + repository.length + 1 > 255) return undefined;
  return { registry, repository, tag: tag ?? (digest ? undefined : "latest"), digest };
}

/** `registry/repository[:tag][@digest]`, fully qualified. */
export function formatReference(ref: ImageReference): string {
  return `${ref.registry}/${ref.repository}${ref.tag ? `:${ref.tag}` : ""}${ref.digest ? `@${ref.digest}` : ""}`;
}

/** The same repository pinned to a digest (what is pulled once the manifest is resolved). */
export function pinned(ref: ImageReference, digest: string): ImageReference {
  return { registry: ref.registry, repository: ref.repository, digest };
}
