#!/usr/bin/env bash
# Installs everything the tests and the local demo need on a fresh Debian 12
# machine. Idempotent and non-interactive; run as root (or with sudo available).
#
#   scripts/setup.sh            # apt packages + Python tools (pinned)
#
# Python tools go into ignored virtualenvs under .venv/ in the checkout:
#   .venv/moto   moto[server]  (AWS emulator used by the tests and the demo)
#   .venv/lint   cfn-lint, checkov (template linters)
# They are kept apart because checkov pins many libraries that moto also uses.
set -euo pipefail

MOTO_VERSION=5.2.5
CFN_LINT_VERSION=1.58.0
CHECKOV_VERSION=3.3.30

APT_PACKAGES=(
  etcd-server      # real etcd 3.4 for the test clusters
  etcd-client      # etcdctl, handy when a test fails and you want to look
  protobuf-compiler # etcd-client (Rust) compiles .proto files at build time
  libprotobuf-dev  # ...and imports google/protobuf/*.proto from it
  shellcheck       # scripts are linted in scripts/test.sh
  python3-venv
  systemd          # systemd-analyze verify|security for the units in systemd/
  packer           # packer validate on packer/kubeboot.pkr.hcl (Debian's 1.6.6, offline)
  ca-certificates
  curl
)

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "apt packages present"
    return
  fi
  log "installing apt packages: ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # The package enables a system etcd on 127.0.0.1:2379; the tests start their
  # own members and need nothing listening there.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    as_root systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
}

install_kubectl() {
  # The add-on manifests go through kubectl's client-side dry run. Any
  # kubectl on PATH does (this machine kind has one); else Debian's
  # kubernetes-client (1.20), whose /usr/bin/kubectl another package may own.
  if command -v kubectl >/dev/null 2>&1; then
    log "kubectl present: $(command -v kubectl)"
    return
  fi
  log "installing kubernetes-client (kubectl)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client
}

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

install_apt
install_kubectl
command -v cargo-nextest >/dev/null 2>&1 || cargo install --locked cargo-nextest
make_venv moto "moto[server]==$MOTO_VERSION"
make_venv lint "cfn-lint==$CFN_LINT_VERSION" "checkov==$CHECKOV_VERSION"
log "done: etcd $(etcd --version 2>/dev/null | head -n1 | awk '{print $3}'), moto $MOTO_VERSION, cfn-lint $CFN_LINT_VERSION, checkov $CHECKOV_VERSION"
