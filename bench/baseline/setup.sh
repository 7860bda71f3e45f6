#!/usr/bin/env bash
# Installs the AWS CLI the baseline scripts use: awscli (v1, from PyPI),
# pinned, in the ignored virtualenv .venv/awscli of the checkout. Idempotent:
# a venv already holding this exact requirement is left as it is.
#
#   bench/baseline/setup.sh     # then: .venv/awscli/bin/aws
#
# Needs python3 with the venv module (scripts/setup.sh installs python3-venv).
# 1.46.x honours the per-service endpoint variables the scripts rely on
# (AWS_ENDPOINT_URL_DYNAMODB, AWS_ENDPOINT_URL_SSM,
# AWS_ENDPOINT_URL_SECRETS_MANAGER; botocore has read them since 1.31).
set -euo pipefail

AWSCLI_VERSION=1.46.3

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

log() { printf 'baseline setup: %s\n' "$*" >&2; }

python_bin() {
  # Prefer the interpreter on PATH (pyenv on the dev machines), else Debian's.
  command -v python3
}

make_venv() { # name, pip requirement...
  local name=$1; shift
  local dir="$root_dir/.venv/$name"
  local stamp="$dir/.kubeboot-requirements"
  local want="$*"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "venv $name up to date"
    return
  fi
  log "creating venv $name: $want"
  rm -rf "$dir"
  "$(python_bin)" -m venv "$dir"
  "$dir/bin/pip" install --quiet --disable-pip-version-check "$@"
  printf '%s' "$want" >"$stamp"
}

make_venv awscli "awscli==$AWSCLI_VERSION"
log "done: $("$root_dir/.venv/awscli/bin/aws" --version 2>&1)"
