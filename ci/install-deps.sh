#!/usr/bin/env bash
# Installs the system packages dm needs to build and test (Debian, as root).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(libclang-dev fuse3 attr fio git postgresql postgresql-contrib busybox-static python3 procps)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# FUSE: allow_other for non-root mounts, and the device.
grep -q '^user_allow_other' /etc/fuse.conf 2>/dev/null || echo user_allow_other >> /etc/fuse.conf
[ -e /dev/fuse ] || { echo "ci: /dev/fuse is missing: FUSE tests cannot run" >&2; exit 1; }
# Users other than root mount through fusermount3: Debian's fuse3 makes it
# setuid root and /dev/fuse mode 0666; some images strip both.
chmod 0666 /dev/fuse
chmod u+s "$(command -v fusermount3)"
