#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every check CI runs.
#
#   scripts/test.sh
#
# Steps: setup (idempotent) -> rustfmt check -> shellcheck (every script) ->
# packer validate -> rust-version check
# (scripts/check-msrv.sh) -> module graph check (scripts/modules.py) -> cfn-lint +
# checkov on infra/ -> build the binaries the integration tests start and the
# tests -> all tests (nextest) -> clippy -D warnings, which runs beside every
# step after rustfmt (see below) and is waited for last.
set -euo pipefail

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"

# Each step's wall time, printed at the end (and on failure) so a slow run says
# where its time went.
timings=()
step_name=""
step_start=$SECONDS
run_start=$SECONDS
end_step() {
  if [ -n "$step_name" ]; then
    timings+=("$(printf '%6ss  %s' "$((SECONDS - step_start))" "$step_name")")
  fi
  step_name=""
}
report() {
  end_step
  printf '\n==> wall time per step\n' >&2
  printf '%s\n' "${timings[@]}" >&2
  printf '%6ss  total\n' "$((SECONDS - run_start))" >&2
}
# Clippy's check build shares nothing with the real build (it makes
# metadata-only artifacts), and the tests mostly wait (the CPU is half idle
# while they run): so clippy runs beside the other steps, at the lowest CPU
# priority, in its own target directory (in the shared one, cargo's lock
# would hold the build back until clippy finished), in its own process group
# so that a failed run stops it.
clippy_pid=""
clippy_log="$root_dir/target/clippy.log"
clippy_start=0
stop_clippy() {
  if [ -n "$clippy_pid" ]; then kill -- "-$clippy_pid" 2>/dev/null || true; fi
}
trap 'stop_clippy; report' EXIT
step() {
  end_step
  step_name="$*"
  step_start=$SECONDS
  printf '\n==> %s\n' "$*" >&2
}

step "setup"
scripts/setup.sh

step "cargo fmt --check"
cargo fmt --all -- --check

mkdir -p target
printf '\n==> cargo clippy -D warnings: started beside the steps below (%s)\n' "$clippy_log" >&2
clippy_start=$SECONDS
setsid nice -n 19 cargo clippy --workspace --all-targets --locked \
  --target-dir target/clippy -- -D warnings >"$clippy_log" 2>&1 &
clippy_pid=$!

step "shellcheck: every shell script in the repo"
# Tracked files whose first line is a sh or bash shebang ($0 is awk's).
# shellcheck disable=SC2016
mapfile -t shell_scripts < <(git ls-files -z | xargs -0 awk 'FNR == 1 { if ($0 ~ /^#!(\/usr\/bin\/env (ba)?sh|\/bin\/(ba)?sh)/) print FILENAME; nextfile }' | sort)
shellcheck -x "${shell_scripts[@]}"

step "packer validate (packer/)"
scripts/lint-packer.sh

step "rust-version covers the locked dependencies"
scripts/check-msrv.sh

step "module dependencies: no import cycle, ARCHITECTURE's picture and table match the tree"
python3 scripts/modules.py check

step "infra templates: cfn-lint and checkov"
scripts/lint-infra.sh

# The binaries and the tests in one build: the tests' dev-dependencies turn
# on tokio's test-util, and a build of the binaries alone would compile tokio
# and every crate above it (the AWS SDKs, kube) a second time for the tests.
step "build the binaries the tests start, and the tests"
# A clean CI build gains nothing from incremental compilation's bookkeeping.
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi
cargo build --workspace --bins --tests --locked

step "tests"
profile=default
if [ "${CI:-}" = "true" ]; then profile=ci; fi
cargo nextest run --workspace --locked --profile "$profile"

step "cargo clippy -D warnings (waiting for it)"
clippy_status=0
wait "$clippy_pid" || clippy_status=$?
clippy_pid=""
timings+=("$(printf '%6ss  %s' "$((SECONDS - clippy_start))" "(clippy beside the steps above, from its start)")")
if [ "$clippy_status" -ne 0 ]; then
  cat "$clippy_log" >&2
  printf 'clippy failed (exit %s): its output is above and in %s\n' "$clippy_status" "$clippy_log" >&2
  exit 1
fi
