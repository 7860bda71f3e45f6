#!/usr/bin/env bash
# Lints the CloudFormation templates in infra/ and fails on any finding.
#
#   scripts/lint-infra.sh                      # every infra/*.json
#   scripts/lint-infra.sh infra/network.json   # only the named templates
#
# cfn-lint: any error or warning fails (informational findings are not shown).
# checkov:  any failed check or unparsable template fails. Skips are allowed
#           only inline, in the resource's Metadata.checkov.skip with a comment.
# Both tools come from the .venv/lint virtualenv that scripts/setup.sh creates.
set -euo pipefail

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir"

venv=.venv/lint
cfn_lint=$venv/bin/cfn-lint
checkov=$venv/bin/checkov

die() { printf 'lint-infra: %s\n' "$*" >&2; exit 1; }

if [ ! -x "$cfn_lint" ] || [ ! -x "$checkov" ]; then
  die "$venv is missing cfn-lint or checkov: run scripts/setup.sh"
fi

if [ $# -gt 0 ]; then
  templates=("$@")
  for t in "${templates[@]}"; do
    [ -f "$t" ] || die "no such template: $t"
  done
else
  shopt -s nullglob
  templates=(infra/*.json)
  shopt -u nullglob
  [ ${#templates[@]} -gt 0 ] || die "no templates found in infra/"
fi

status=0

# --- cfn-lint: one line per finding (path:line:col:endline:endcol:rule:message).
cfn_rc=0
cfn_out=$("$cfn_lint" --format parseable --non-zero-exit-code warning -- "${templates[@]}" 2>&1) || cfn_rc=$?
[ -z "$cfn_out" ] || printf '%s\n' "$cfn_out"
cfn_errors=$(printf '%s\n' "$cfn_out" | grep -cE ':E[0-9]{4}:' || true)
cfn_warnings=$(printf '%s\n' "$cfn_out" | grep -cE ':W[0-9]{4}:' || true)
printf 'cfn-lint: %d template(s), %d error(s), %d warning(s) (exit %d)\n' \
  "${#templates[@]}" "$cfn_errors" "$cfn_warnings" "$cfn_rc"
if [ "$cfn_rc" -ne 0 ] || [ "$cfn_errors" -ne 0 ] || [ "$cfn_warnings" -ne 0 ]; then
  status=1
fi

# --- checkov: the whole directory, or -f per named template.
if [ $# -gt 0 ]; then
  checkov_target=()
  for t in "${templates[@]}"; do checkov_target+=(-f "$t"); done
else
  checkov_target=(-d infra)
fi
# --skip-download: no call to the Prisma Cloud API (offline machines, CI).
ck_rc=0
ck_out=$("$checkov" --framework cloudformation "${checkov_target[@]}" --quiet --compact --skip-download 2>&1) || ck_rc=$?
[ -z "$ck_out" ] || printf '%s\n' "$ck_out"
# "Passed checks: N, Failed checks: N, Skipped checks: N[, Parsing errors: N]"
summary=$(printf '%s\n' "$ck_out" | grep -E '^Passed checks: [0-9]+, Failed checks: [0-9]+' | tail -n1 || true)
count() { # label -> number from $summary (0 when absent)
  local n
  n=$(printf '%s\n' "$summary" | sed -nE "s/.*$1: ([0-9]+).*/\\1/p")
  printf '%s' "${n:-0}"
}
ck_passed=$(count 'Passed checks')
ck_failed=$(count 'Failed checks')
ck_skipped=$(count 'Skipped checks')
ck_parse=$(count 'Parsing errors')
printf 'checkov: %d passed, %d failed, %d skipped, %d parsing error(s) (exit %d)\n' \
  "$ck_passed" "$ck_failed" "$ck_skipped" "$ck_parse" "$ck_rc"
if [ -z "$summary" ]; then
  printf 'lint-infra: checkov printed no summary: nothing was scanned\n' >&2
  status=1
fi
if [ "$ck_rc" -ne 0 ] || [ "$ck_failed" -ne 0 ] || [ "$ck_parse" -ne 0 ]; then
  status=1
fi

if [ "$status" -ne 0 ]; then
  printf 'lint-infra: FAILED\n' >&2
fi
exit "$status"
