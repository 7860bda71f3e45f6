#!/usr/bin/env bash
# The main job, locally: kubeboot against a simulated cluster on loopback
# (moto_server as AWS, real etcd members, an IMDSv2 double per node).
#
#   scripts/demo.sh
#
# Installs what it needs (scripts/setup.sh), builds, and runs kubeboot-sim,
# which prints a timeline and stops everything it started when it exits.
set -euo pipefail

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"

scripts/setup.sh
cargo build --workspace --bins --locked
exec target/debug/kubeboot-sim
