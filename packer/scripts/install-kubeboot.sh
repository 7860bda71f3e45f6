#!/usr/bin/env bash
# Installs kubeboot into ROOT: the binary, its systemd units (enabled), the
# image's configuration, the cluster add-on manifests and the directories,
# with their owners and modes.
# Packer runs it with ROOT=/ (scripts/70-kubeboot.sh); the repo's image test
# runs it into a real-systemd machine's root before that machine boots.
# Idempotent: a second run leaves ROOT as the first did.
#
#   install-kubeboot.sh [--binary FILE] [--units DIR] [--config FILE] [--doc FILE] [--addons DIR] ROOT
#
# Defaults are the repo's: target/release/kubeboot, systemd/,
# packer/files/kubeboot/config.toml, README.md (the units' Documentation=), addons/.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
binary=$repo/target/release/kubeboot
units=$repo/systemd
config=$repo/packer/files/kubeboot/config.toml
doc=$repo/README.md
addons=$repo/addons

die() { printf 'install-kubeboot: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

root=
while [ $# -gt 0 ]; do
  case $1 in
    --binary) binary=${2:?--binary needs a file}; shift 2 ;;
    --units) units=${2:?--units needs a directory}; shift 2 ;;
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --doc) doc=${2:?--doc needs a file}; shift 2 ;;
    --addons) addons=${2:?--addons needs a directory}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option '$1' (expected --binary, --units, --config, --doc, --addons or ROOT)" ;;
    *)
      [ -z "$root" ] || die "one ROOT only, got '$root' and '$1'"
      root=$1; shift ;;
  esac
done
[ -n "$root" ] || { usage >&2; die "ROOT is missing (/ for this machine)"; }
[ -d "$root" ] || die "ROOT '$root' is not a directory"
[ -x "$binary" ] || die "--binary '$binary' is not an executable file (cargo build --release -p kubeboot)"
[ -f "$config" ] || die "--config '$config' is not a file"
[ -f "$doc" ] || die "--doc '$doc' is not a file"
# flannel is the default pod network (addons.pod_network): no image without it.
[ -f "$addons/flannel.yaml" ] || die "--addons '$addons' has no flannel.yaml"
unit_names=(kubeboot-bootstrap.service kubeboot.service kubeboot-journal.service)
for u in "${unit_names[@]}"; do
  [ -f "$units/$u" ] || die "--units '$units' has no $u"
done
root=${root%/}

install -D -o root -g root -m 0755 "$binary" "$root/usr/bin/kubeboot"
for u in "${unit_names[@]}"; do
  install -D -o root -g root -m 0644 "$units/$u" "$root/usr/lib/systemd/system/$u"
done
# The image's settings: no secrets (those are in Secrets Manager), but only
# root configures the node. config.d/ takes an operator's drop-ins.
install -d -o root -g root -m 0755 "$root/etc/kubeboot" "$root/etc/kubeboot/config.d"
install -o root -g root -m 0644 "$config" "$root/etc/kubeboot/config.toml"
# State (checkpoint, downloads) is root's alone; the log copy the CloudWatch
# agent (root) reads is not for other users either.
install -d -o root -g root -m 0700 "$root/var/lib/kubeboot"
install -d -o root -g root -m 0750 "$root/var/log/kubeboot"
install -D -o root -g root -m 0644 "$doc" "$root/usr/share/doc/kubeboot/README.md"
# The add-on manifests control planes apply (addons.directory's default).
install -d -o root -g root -m 0755 "$root/usr/share/kubeboot/addons"
install -o root -g root -m 0644 "$addons"/*.yaml "$root/usr/share/kubeboot/addons/"
# Enabled offline (no running systemd needed): the [Install] sections'
# symlinks under ROOT/etc/systemd/system.
systemctl --root="$root" --quiet enable "${unit_names[@]}"
printf 'install-kubeboot: kubeboot %s installed into %s, units enabled: %s\n' \
  "$("$root/usr/bin/kubeboot" --version 2> /dev/null | head -n1 || echo '?')" "$root" "${unit_names[*]}"
