#!/usr/bin/env bash
# Backup benchmark: `kubeboot backup now` streaming a >= 1 GiB etcd database
# into S3 (moto) against `etcdctl snapshot save` followed by an upload of
# the file, same run; each one's wall time and peak RSS. Writes
# bench/backup/REPORT.md. Figures, not assertions.
#
#   bench/backup.sh                     # about 1100 MiB, 2 rounds
#   bench/backup.sh --mib 2048 --runs 3 # etcd's default quota is 2 GiB
set -euo pipefail
root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"
scripts/setup.sh
# The agent, the kubeadm stand-in and the driver (debug builds, as the tests use).
cargo build -p kubeboot --bin kubeboot --locked
cargo build -p kubeboot-tests --bin kubeadm --bin kubeboot-bench-backup --locked
mkdir -p bench/backup
KBTEST_KUBEBOOT_BIN="$root_dir/target/debug/kubeboot" \
  KBBENCH_COMMAND="bench/backup.sh${*:+ $*}" \
  target/debug/kubeboot-bench-backup --out bench/backup/REPORT.md "$@"
