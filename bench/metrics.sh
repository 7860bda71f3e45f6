#!/usr/bin/env bash
# Metrics sink benchmark: does a metric sink that is down or slow delay
# `kubeboot bootstrap`? The worker path with kubeadm replaced by the
# stand-in's no-op mode (KBTEST_KUBEADM_NOOP=1), N runs in each sink mode
# (file, a healthy agent, a refused port, a stalled endpoint, off),
# interleaved round-robin; process start to READY=1 ("node bootstrapped")
# and to exit, and the documents the sink received. Writes
# bench/metrics/REPORT.md. Figures, not assertions.
#
#   bench/metrics.sh                  # 20 runs per mode
#   bench/metrics.sh --runs 50
#   bench/metrics.sh --runs 10 --logs /tmp/agent-logs
set -euo pipefail
root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"
scripts/setup.sh
# The agent, the kubeadm stand-in and the driver (debug builds, as the tests use).
cargo build -p kubeboot --bin kubeboot --locked
cargo build -p kubeboot-tests --bin kubeadm --bin kubeboot-bench-metrics --locked
mkdir -p bench/metrics
# The agent was just built from the sources as they are: name it, so the
# harness's mtime freshness check cannot refuse it when agent sources are
# touched while the benchmark runs.
KBTEST_KUBEBOOT_BIN="$root_dir/target/debug/kubeboot" \
  KBBENCH_COMMAND="bench/metrics.sh${*:+ $*}" \
  target/debug/kubeboot-bench-metrics --out bench/metrics/REPORT.md "$@"
