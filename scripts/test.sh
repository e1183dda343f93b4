#!/usr/bin/env bash
# `npm test`: installs what is missing, type-checks and lints, tests the agent
# (go test), then runs the suite: the unit tier (no QEMU; alone: `npm run
# test:unit`) and the integration tier, which boots real microVMs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
npx tsc --noEmit
npx eslint .
npm run typecheck -w packages/console --silent
# Go 1.23 from bookworm-backports (src/vmm/guest/agent.ts: GO).
(cd agent && CGO_ENABLED=0 /usr/lib/go-1.23/bin/go vet ./... && CGO_ENABLED=0 /usr/lib/go-1.23/bin/go test ./...)
npx vitest run "$@"
