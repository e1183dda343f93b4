import { join } from "node:path";

/**
 * Root of everything tests write. Kept short and under /tmp: QMP and migration
 * sockets live in VM directories, and unix socket paths are limited to 107 bytes.
 * Guest assets and the base snapshot are cached here between runs (keyed by
 * their inputs, like the server's own cache).
 */
export const TEST_ROOT = process.env.COCOON_TEST_DIR ?? `/tmp/cocoon-test-${process.getuid?.() ?? 0}`;
export const TEST_ASSETS = join(TEST_ROOT, "assets");
export const TEST_IMAGES = join(TEST_ROOT, "images");
