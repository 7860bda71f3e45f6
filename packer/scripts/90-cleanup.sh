#!/usr/bin/env bash
# What must not be baked into every instance of the image: this build's
# machine id (journald and DHCP identify a machine by it), its journal,
# cloud-init's record of this instance, apt lists and the staged files.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

apt-get clean
rm -rf /var/lib/apt/lists/* "$CACHE_DIR"
cloud-init clean --logs 2> /dev/null || rm -rf /var/lib/cloud/instances /var/log/cloud-init*.log
journalctl --rotate > /dev/null 2>&1 || true
journalctl --vacuum-time=1s > /dev/null 2>&1 || true
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -rf /var/lib/kubeboot/* /var/log/kubeboot/*
rm -rf "$IMAGE_DIR"
log "cleaned"
