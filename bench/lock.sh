#!/usr/bin/env bash
# Lock benchmark: acquire latency, DynamoDB calls per operation, takeover
# latency by lease. Writes bench/lock/REPORT.md. Figures, not assertions.
#
#   bench/lock.sh                       # 200 acquires, 5 takeovers per lease
#   KBBENCH_ACQUIRES=1000 bench/lock.sh
set -euo pipefail
root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"
scripts/setup.sh
cargo build -p kubeboot-tests --bin kubeboot-bench-lock --locked
mkdir -p bench/lock
target/debug/kubeboot-bench-lock | tee bench/lock/REPORT.md
