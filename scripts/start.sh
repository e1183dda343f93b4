#!/usr/bin/env bash
# `npm start -- [--listen HOST:PORT] [--data-dir DIR]`: installs what is missing, then runs the server
# under its supervisor (restarted within seconds if it ever exits; VMs run on and are re-adopted).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec node packages/cli/bin/cocoon.js server --supervise "$@"
