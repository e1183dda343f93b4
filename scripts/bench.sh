#!/usr/bin/env bash
# `npm run bench`: measures this machine, one suite after another (they share
# the CPU, so never in parallel); each prints p50/p95 tables and writes
# bench/results/<suite>.{json,md}. `npm run bench -- engine api` runs some.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(engine launch jail api network images faults density baselines)
for suite in "${suites[@]}"; do
  echo "== bench/$suite.ts" >&2
  npx tsx "bench/$suite.ts"
done
