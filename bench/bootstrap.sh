#!/usr/bin/env bash
# Bootstrap benchmark: agent overhead of `kubeboot bootstrap` on the init
# path and on the worker path, with kubeadm replaced by the stand-in's no-op
# mode (KBTEST_KUBEADM_NOOP=1), from process start to exit; and AWS API calls
# per bootstrap, counted by the AWS proxy. Writes bench/bootstrap/REPORT.md.
# Figures, not assertions.
#
#   bench/bootstrap.sh                  # 20 runs per path
#   bench/bootstrap.sh --runs 50
#   bench/bootstrap.sh --init-runs 10 --worker-runs 40 --logs /tmp/agent-logs
set -euo pipefail
root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"
scripts/setup.sh
# The agent, the kubeadm stand-in and the driver (debug builds, as the tests use).
cargo build -p kubeboot --bin kubeboot --locked
cargo build -p kubeboot-tests --bin kubeadm --bin kubeboot-bench-bootstrap --locked
mkdir -p bench/bootstrap
# The agent was just built from the sources as they are: name it, so the
# harness's mtime freshness check cannot refuse it when agent sources are
# touched while the benchmark runs.
KBTEST_KUBEBOOT_BIN="$root_dir/target/debug/kubeboot" \
  KBBENCH_COMMAND="bench/bootstrap.sh${*:+ $*}" \
  target/debug/kubeboot-bench-bootstrap --out bench/bootstrap/REPORT.md "$@"
