#!/usr/bin/env bash
# `npm run bench`: measures the engine on this machine; writes bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec npx tsx bench/engine.ts "$@"
