/** A content descriptor in a manifest (OCI image-spec). */
export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { os?: string; architecture?: string; variant?: string };
  annotations?: Record<string, string>;
}

/** A single-platform image manifest. */
export interface ImageManifest {
  config: Descriptor;
  layers: Descriptor[];
}

const INDEX_TYPES = new Set(["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"]);
const MANIFEST_TYPES = new Set(["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"]);
const DIGEST = /^sha256:[a-f0-9]{64}$/;

/** The platform this host runs guests of, as OCI names it. */
export function hostPlatform(): { os: string; architecture: string } {
  return { os: "linux", architecture: process.arch === "x64" ? "amd64" : process.arch };
}

/** What a manifest (as fetched, untrusted) is: a list to pick from, or an image. Throws an Error naming what is wrong. */
export function parseManifest(text: string): { kind: "index"; manifests: Descriptor[] } | { kind: "image"; manifest: ImageManifest } {
  let doc: Record<string, unknown>;
  try {
    doc = JSON.parse(text) as Record<string, unknown>;
  } catch {
    throw new Error("the registry's manifest is not JSON");
  }
  if (typeof doc !== "object" || doc === null) throw new Error("the registry's manifest is not an object");
  if (doc.schemaVersion === 1) throw new Error("the image has a schema 1 manifest (deprecated by Docker in 2019): push it again with a current client");
  if (doc.schemaVersion !== 2) throw new Error(`the manifest has schemaVersion ${JSON.stringify(doc.schemaVersion)}, not 2`);
  const mediaType = typeof doc.mediaType === "string" ? doc.mediaType : undefined;
  if ((mediaType && INDEX_TYPES.has(mediaType)) || (!mediaType && Array.isArray(doc.manifests))) {
    if (!Array.isArray(doc.manifests) || doc.manifests.length > 1024) throw new Error("the manifest list has no valid manifests array");
    return { kind: "index", manifests: doc.manifests.map((d, i) => descriptor(d, `manifests[${i}]`)) };
  }
  if ((mediaType && MANIFEST_TYPES.has(mediaType)) || (!mediaType && Array.isArray(doc.layers))) {
    if (!Array.isArray(doc.layers) || doc.layers.length > 4096) throw new Error("the manifest has no valid layers array");
    return { kind: "image", manifest: { config: descriptor(doc.config, "config"), layers: doc.layers.map((d, i) => descriptor(d, `layers[${i}]`)) } };
  }
  throw new Error(`the manifest has media type ${String(mediaType).slice(0, 100)}, not an image or an image index`);
}

/**
 * The host platform's entry of a manifest list (attestations and other
 * platforms skipped; a variant-less entry is preferred, as Docker does for
 * amd64), or an Error listing the platforms there are.
 */
export function selectPlatform(manifests: Descriptor[], want = hostPlatform()): Descriptor {
  const images = manifests.filter((m) => m.annotations?.["vnd.docker.reference.type"] !== "attestation-manifest");
  const matches = images.filter((m) => m.platform?.os === want.os && m.platform?.architecture === want.architecture);
  const chosen = matches.find((m) => !m.platform?.variant) ?? matches[0];
  if (chosen) return chosen;
  const have = [...new Set(images.map((m) => `${m.platform?.os ?? "?"}/${m.platform?.architecture ?? "?"}${m.platform?.variant ? `/${m.platform.variant}` : ""}`))];
  throw new Error(`the image has no ${want.os}/${want.architecture} variant (it has ${have.join(", ") || "none"})`);
}

function descriptor(v: unknown, field: string): Descriptor {
  const d = v as Record<string, unknown>;
  if (typeof d !== "object" || d === null) throw new Error(`manifest ${field} is not a descriptor`);
  if (typeof d.digest !== "string" || !DIGEST.test(d.digest)) throw new Error(`manifest ${field} has no sha256 digest`);
  if (typeof d.size !== "number" || !Number.isSafeInteger(d.size) || d.size < 0) throw new Error(`manifest ${field} has no valid size`);
  const p = d.platform as Record<string, unknown> | undefined;
  const annotations = typeof d.annotations === "object" && d.annotations !== null ? (d.annotations as Record<string, string>) : undefined;
  return {
    mediaType: typeof d.mediaType === "string" ? d.mediaType : "",
    digest: d.digest,
    size: d.size,
    platform:
      typeof p === "object" && p !== null
        ? { os: strOrUndef(p.os), architecture: strOrUndef(p.architecture), variant: strOrUndef(p.variant) }
        : undefined,
    annotations,
  };
}

const strOrUndef = (v: unknown) => (typeof v === "string" ? v : undefined);
