#!/usr/bin/env bash
# `npm test`: installs what is missing, type-checks, tests the agent (go test),
# then runs the suite, which boots real microVMs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
npx tsc --noEmit
npm run typecheck -w packages/console --silent
(cd agent && CGO_ENABLED=0 go vet ./... && CGO_ENABLED=0 go test ./...)
npx vitest run "$@"
