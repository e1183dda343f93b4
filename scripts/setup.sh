#!/usr/bin/env bash
# Installs what Cocoon needs on Debian 12: host packages (apt, when root) and
# npm dependencies. Safe to run repeatedly; does nothing when all is present.
set -euo pipefail
cd "$(dirname "$0")/.."

# Host tools: QEMU 10 (microvm machine) and qemu-img (BACKPORTS), mmdebstrap + mke2fs for the
# base root filesystem, Go 1.23 for the in-guest agent (BACKPORTS), apt-get for the guest kernel;
# passt, nftables and iproute2 for VM egress (src/vmm/network, docs/networking.md);
# chromium for the web console's end-to-end test (test/console); openssl (a
# self-signed certificate) and busybox-static (a FROM scratch binary) for
# test/api/images-sources.test.ts; python3 with venv, setuptools and wheel
# (an offline `pip install --no-build-isolation`) and pytest for the Python SDK
# (packages/python-sdk, test/python); skopeo (registry pulls into an OCI layout)
# and umoci (layers unpacked into a root filesystem) for FROM <registry image>
# (src/images/registry); docker-registry (distribution v2) and apache2-utils
# (htpasswd, bcrypt) for the registry the tests run on loopback; postgresql
# (15) for the many-hosts store (docs/cluster.md; the tests start their own);
# OpenStack Swift (its s3api middleware is in python3-swift) for the many-hosts
# object store the tests start on loopback (test/support/swift.ts);
# bubblewrap, runc and runsc (gVisor) for the baselines npm run bench
# measures (bench/baselines.ts).
PACKAGES=(mmdebstrap e2fsprogs ca-certificates passt nftables iproute2 chromium openssl busybox-static
  python3 python3-venv python3-setuptools python3-wheel python3-pytest skopeo umoci docker-registry apache2-utils
  postgresql swift swift-proxy swift-object swift-container swift-account python3-swift bubblewrap runc runsc)
# From Debian's bookworm-backports: Go 1.23 (/usr/lib/go-1.23, beside bookworm's
# 1.19) for SysProcAttr.CgroupFD, which the agent needs (agent/internal/process);
# QEMU 10.0, whose TCG runs guest code faster than bookworm's 7.2 (the exec
# round trip x1.8; a restore's first answer is ~20 % slower) and which maps
# snapshot memory files read-only (SPECIFICATION.md "QEMU 7.2 and 10.0 side
# by side", SECURITY.md). Snapshots record the QEMU build (src/vmm/snapshot.ts):
# after an upgrade the base image is rebuilt, other images and suspended VMs
# of the old build are refused with a message saying what to do.
BACKPORTS=(golang-1.23-go qemu-system-x86 qemu-utils)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# A backport counts only in its backports version (bookworm's own may be installed).
backported() { installed "$1" && dpkg-query -W -f='${Version}' "$1" | grep -q '~bpo'; }
missing=() missing_backports=()
for pkg in "${PACKAGES[@]}"; do installed "$pkg" || missing+=("$pkg"); done
for pkg in "${BACKPORTS[@]}"; do backported "$pkg" || missing_backports+=("$pkg"); done
# The guest kernel comes from apt's package lists; they must exist and be recent.
lists_fresh=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)
if [ ${#missing[@]} -gt 0 ] || [ ${#missing_backports[@]} -gt 0 ] || [ -z "$lists_fresh" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "[setup] apt-get update; missing: ${missing[*]:-} ${missing_backports[*]:-}" >&2
    grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ ||
      echo "deb http://deb.debian.org/debian bookworm-backports main" >/etc/apt/sources.list.d/bookworm-backports.list
    apt-get update -qq
    [ ${#missing[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    [ ${#missing_backports[@]} -eq 0 ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports "${missing_backports[@]}" >&2
  else
    echo "[setup] missing Debian packages: ${missing[*]:-} ${missing_backports[*]:-} (apt lists may also be stale)." >&2
    echo "[setup] run as root: apt-get update && apt-get install -y ${PACKAGES[*]} && apt-get install -y -t bookworm-backports ${BACKPORTS[*]}" >&2
    exit 1
  fi
fi
# The docker-registry package enables a registry on :5000 where systemd runs;
# the tests start their own on loopback, nothing else should listen.
if [ "$(id -u)" -eq 0 ] && command -v systemctl >/dev/null && systemctl is-enabled docker-registry >/dev/null 2>&1; then
  systemctl disable --now docker-registry >&2 || true
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "[setup] npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
fi

# The web console (packages/console), served by the server under /console/:
# built when its output is missing or older than its sources.
console=packages/console
if [ ! -f $console/dist/index.html ] || [ -n "$(find $console/src $console/index.html $console/vite.config.ts $console/package.json $console/tsconfig.json package-lock.json -newer $console/dist/index.html 2>/dev/null | head -1)" ]; then
  echo "[setup] building the web console" >&2
  npm run build -w $console --silent >&2
fi
