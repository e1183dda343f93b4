import { defineConfig } from "vitest/config";

/*
 * Two tiers. `unit`: pure logic and real local processes (nftables, UDP,
 * HTTP on loopback), never QEMU: `npm run test:unit`, seconds. `integration`:
 * real microVMs; the global setup builds the guest assets and the base
 * snapshot once. `npm test` runs both.
 */
export default defineConfig({
  test: {
    testTimeout: 120_000,
    hookTimeout: 600_000,
    reporters: ["default"],
    projects: [
      { test: { name: "unit", include: ["test/unit/**/*.test.ts"] } },
      {
        test: {
          name: "integration",
          include: ["test/**/*.test.ts"],
          exclude: ["test/unit/**"],
          globalSetup: ["test/support/global-setup.ts"],
          // Real VMs under TCG share two cores: one test file at a time keeps timings sane.
          fileParallelism: false,
          testTimeout: 120_000,
          hookTimeout: 600_000,
        },
      },
    ],
  },
});
