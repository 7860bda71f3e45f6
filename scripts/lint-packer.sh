#!/usr/bin/env bash
# Validates the AMI template offline with Debian's packer (1.6.6) and checks
# its formatting.
#
#   scripts/lint-packer.sh
#
# packer/plugins.pkr.hcl (the required_plugins block current Packer needs) is
# left out: 1.6.6 rejects that block, so kubeboot.pkr.hcl is validated alone.
# The release binary is not built here: a placeholder file stands in for it
# (validate checks that every provisioned file exists).
set -euo pipefail

root_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root_dir/packer"

command -v packer > /dev/null || { echo "lint-packer: packer is not installed: run scripts/setup.sh" >&2; exit 1; }
placeholder=$(mktemp)
trap 'rm -f "$placeholder"' EXIT

for f in kubeboot.pkr.hcl plugins.pkr.hcl; do
  packer fmt -check "$f" > /dev/null || { echo "lint-packer: $f is not packer-fmt formatted (packer fmt packer/$f)" >&2; exit 1; }
done
packer validate \
  -var base_ami=ami-0123456789abcdef0 \
  -var region=eu-west-1 \
  -var "kubeboot_binary=$placeholder" \
  kubeboot.pkr.hcl
for arch in amd64 arm64; do
  packer validate -syntax-only -var "arch=$arch" kubeboot.pkr.hcl > /dev/null
done
echo "lint-packer: kubeboot.pkr.hcl valid"
