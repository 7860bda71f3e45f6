#!/usr/bin/env bash
# etcd's client tools: etcdutl, which `kubeboot restore` runs to lay a
# snapshot down (binaries.etcd_restore_tool in /etc/kubeboot/config.toml),
# and etcdctl for an operator's hands. The etcd server itself is kubeadm's
# static Pod, not installed here.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

tarball=$(fetch etcd)
read -r etcd_version _ < <(pin etcd)
dir=etcd-v$etcd_version-linux-$ARCH
tar -C /usr/local/bin --strip-components=1 -xzf "$tarball" "$dir/etcdctl" "$dir/etcdutl"
/usr/local/bin/etcdutl version > /dev/null || die "etcdutl does not run"
