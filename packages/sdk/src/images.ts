import { CocoonError, ValidationError } from "./errors.ts";
import { textChunks, type CallOpts, type Transport } from "./http.ts";
import type { CreateImageOpts, ImageInfo } from "./types.ts";

const imagePath = (idOrName: string, rest = "") => `/v1/images/${encodeURIComponent(idOrName)}${rest}`;

/** `client.images`: build images from a Dockerfile and code, and find them. */
export class Images {
  /** @internal */
  constructor(private readonly http: Transport) {}

  /**
   * Starts building an image; returns at once with state BUILDING. Follow it
   * with `buildLog(id, {follow: true})` or `waitUntilReady(id)`.
   * With `code` the request is `multipart/form-data` (fields `name`,
   * `dockerfile`, `code` as `code.zip`); with `codeUri` it is JSON.
   */
  async create(opts: CreateImageOpts, call?: CallOpts): Promise<ImageInfo> {
    if ((opts.code === undefined) === (opts.codeUri === undefined)) {
      throw new ValidationError({ code: "ValidationError", status: 400, message: "images.create needs exactly one of code and codeUri", details: { field: "code" } });
    }
    if (opts.codeUri !== undefined) {
      return this.http.json<ImageInfo>({ method: "POST", path: "/v1/images", json: { name: opts.name, dockerfile: opts.dockerfile, codeUri: opts.codeUri } }, call);
    }
    const form = new FormData();
    form.set("name", opts.name);
    form.set("dockerfile", opts.dockerfile);
    const code = opts.code instanceof Blob ? opts.code : new Blob([opts.code as Uint8Array<ArrayBuffer>], { type: "application/zip" });
    form.set("code", code, "code.zip");
    return this.http.json<ImageInfo>({ method: "POST", path: "/v1/images", body: form }, call);
  }

  /** Describes an image by id or name. @throws NotFoundError if there is none. */
  get(idOrName: string, call?: CallOpts): Promise<ImageInfo> {
    return this.http.json<ImageInfo>({ method: "GET", path: imagePath(idOrName) }, call);
  }

  /** The tenant's images, the built-in `base` included. */
  async list(call?: CallOpts): Promise<ImageInfo[]> {
    return (await this.http.json<{ images: ImageInfo[] }>({ method: "GET", path: "/v1/images" }, call)).images;
  }

  /** Deletes an image. @throws ConflictError while microVMs still use it, unless `force`. */
  async delete(idOrName: string, opts: { force?: boolean } = {}, call?: CallOpts): Promise<void> {
    await this.http.json({ method: "DELETE", path: imagePath(idOrName), query: { force: opts.force ? "true" : undefined } }, call);
  }

  /** The build output as text chunks; with `follow: true` until the build ends. `call.timeoutMs` bounds only the wait for the first byte. */
  async *buildLog(idOrName: string, opts: { follow?: boolean } = {}, call: CallOpts = {}): AsyncGenerator<string> {
    const { body } = await this.http.stream({ method: "GET", path: imagePath(idOrName, "/build-log"), query: { follow: opts.follow ? "true" : undefined } }, call);
    yield* textChunks(body);
  }

  /**
   * Polls until the image is READY and returns it; `onPoll` sees each description.
   * @throws CocoonError (code `ImageBuildFailed`) if the build fails.
   */
  async waitUntilReady(
    idOrName: string,
    opts: {
      /** @default 1000 */
      pollIntervalMs?: number;
      onPoll?: (image: ImageInfo) => void;
    } = {},
    call: CallOpts = {},
  ): Promise<ImageInfo> {
    for (;;) {
      const image = await this.get(idOrName, call);
      opts.onPoll?.(image);
      if (image.state === "READY") return image;
      if (image.state === "FAILED") {
        throw new CocoonError({ code: "ImageBuildFailed", status: 0, message: `image ${image.name} failed to build${image.stateReason ? `: ${image.stateReason}` : ""}`, details: { imageId: image.imageId } });
      }
      await sleep(opts.pollIntervalMs ?? 1000, call.signal);
    }
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    signal?.throwIfAborted();
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
