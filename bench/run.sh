#!/usr/bin/env bash
# Every benchmark, with the release build of the agent (what the AMI
# installs), side by side with the bash + aws-cli reference where one exists
# (bench/baseline/). Writes bench/REPORT.md, the summary against the goals,
# and the reports it links: bench/compare/, bench/lifecycle/, bench/lock/,
# bench/backup/. Figures, not assertions; keep the machine otherwise idle.
#
#   bench/run.sh            # the full run, about 30 minutes on 2 cores
#   bench/run.sh --quick    # a few runs of each, reports in a scratch
#                           # directory (checks the drivers; figures too
#                           # thin to quote)
set -euo pipefail
root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit "$1"
}
quick=false
case "${1:-}" in
  "") ;;
  --quick) quick=true ;;
  -h | --help) usage 0 ;;
  *)
    printf 'bench/run.sh: unknown argument %q\n' "$1" >&2
    usage 2
    ;;
esac

scripts/setup.sh
bench/baseline/setup.sh
# The agent as shipped, and the drivers and the kubeadm stand-in (debug
# builds, as the tests use: they only drive and observe).
cargo build --release -p kubeboot --bin kubeboot --locked
cargo build -p kubeboot-tests --locked --bin kubeadm --bin kubeboot-bench-compare \
  --bin kubeboot-bench-lifecycle --bin kubeboot-bench-lock --bin kubeboot-bench-backup

export KBTEST_KUBEBOOT_BIN="$root_dir/target/release/kubeboot"
export KBBENCH_COMMAND="bench/run.sh${*:+ $*}"
work=$(mktemp -d "${TMPDIR:-/tmp}/kbbench-run.XXXXXX")
if $quick; then
  reports=$work
  compare=(--init-pairs 2 --worker-pairs 4 --storm 20 --reference-storm 20 --idle-seconds 10)
  lifecycle=(--runs 1 --failover-runs 1)
  backup=(--mib 128 --small-mib 32 --runs 1)
  export KBBENCH_TAKEOVERS=1 KBBENCH_ACQUIRES=20
else
  trap 'rm -rf "$work"' EXIT
  reports=bench
  compare=(--init-pairs 10 --worker-pairs 20 --storm 100 --storm 300 --reference-storm 100)
  lifecycle=(--runs 5 --failover-runs 3)
  backup=()
fi
mkdir -p "$reports"/{compare,lifecycle,lock,backup}

echo "bench: orchestration, join storms, footprint" >&2
target/debug/kubeboot-bench-compare "${compare[@]}" \
  --out "$reports/compare/REPORT.md" --json "$work/compare.json" >/dev/null
echo "bench: lifecycle removal" >&2
target/debug/kubeboot-bench-lifecycle "${lifecycle[@]}" \
  --out "$reports/lifecycle/REPORT.md" --json "$work/lifecycle.json" >/dev/null
echo "bench: lock takeover" >&2
KBBENCH_JSON="$work/lock.json" target/debug/kubeboot-bench-lock >"$reports/lock/REPORT.md"
echo "bench: backup" >&2
KBBENCH_JSON="$work/backup.json" target/debug/kubeboot-bench-backup "${backup[@]}" \
  --out "$reports/backup/REPORT.md" >/dev/null

python3 bench/summary.py --work "$work" --agent "$KBTEST_KUBEBOOT_BIN" \
  --command "$KBBENCH_COMMAND" --out "$reports/REPORT.md"
echo "bench: $reports/REPORT.md" >&2
