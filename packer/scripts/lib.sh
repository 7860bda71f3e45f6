#!/usr/bin/env bash
# Shared by the provisioning scripts (sourced, not run): logging, the pins
# table and checksum-verified downloads. Every script is idempotent: run
# twice, it leaves the image as once.
#
# Environment (the template sets it):
#   IMAGE_DIR           what the file provisioners staged (scripts, files, pins)
#   KUBERNETES_VERSION  e.g. 1.31.2 (no leading v)
#   ARCH                amd64 | arm64
#   CACHE_DIR           downloads (default /var/cache/kubeboot-image; removed
#                       by 90-cleanup.sh)
# Not KUBEBOOT_*: kubeboot reads every such variable as a setting, and
# 70-kubeboot.sh runs it.
set -euo pipefail
# A failure inside $(...) fails the script too.
shopt -s inherit_errexit

IMAGE_DIR=${IMAGE_DIR:?IMAGE_DIR is not set (the directory the image files were staged in)}
CACHE_DIR=${CACHE_DIR:-/var/cache/kubeboot-image}
pins_file=$IMAGE_DIR/pins

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

case ${ARCH:-} in
  amd64 | arm64) ;;
  *) die "ARCH='${ARCH:-}': expected amd64 or arm64" ;;
esac
[[ ${KUBERNETES_VERSION:-} =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] \
  || die "KUBERNETES_VERSION='${KUBERNETES_VERSION:-}': expected MAJOR.MINOR.PATCH such as 1.31.2 (no leading v)"

# pin NAME [VERSION]: prints "VERSION SHA256 URL" of NAME for $ARCH from
# packer/pins. Without VERSION the table must hold exactly one version of
# NAME for the architecture.
pin() {
  local name=$1 version=${2:-} lines
  lines=$(awk -v n="$name" -v v="$version" -v a="$ARCH" \
    '$1 !~ /^#/ && $1 == n && $3 == a && (v == "" || $2 == v) { print $2, $4, $5 }' "$pins_file")
  [ -n "$lines" ] || die "no pin for $name ${version:-(any version)} on $ARCH in packer/pins: add its version, arch, sha256 and url"
  [ "$(printf '%s\n' "$lines" | wc -l)" -eq 1 ] \
    || die "packer/pins lists more than one $name ${version:-version} for $ARCH: keep one"
  printf '%s\n' "$lines"
}

# fetch NAME [VERSION]: downloads NAME's pinned URL into the cache, checks
# its sha256 and prints the file's path. A cached file is used only if its
# sha256 is the pin's. Call it as `file=$(fetch NAME)` on a line of its own:
# an argument's $(...) failure would not stop the caller.
fetch() {
  local name=$1 version=${2:-} ver sha url file
  read -r ver sha url < <(pin "$name" "$version")
  [[ $sha =~ ^[0-9a-f]{64}$ ]] || die "packer/pins: $name $ver $ARCH has no sha256 ('$sha')"
  url=${url//@VERSION@/$ver}
  url=${url//@ARCH@/$ARCH}
  file=$CACHE_DIR/$name-$ver-$ARCH-$(basename "$url")
  mkdir -p "$CACHE_DIR"
  if [ ! -f "$file" ] || ! printf '%s  %s\n' "$sha" "$file" | sha256sum --check --status; then
    log "downloading $name $ver ($ARCH)"
    curl --fail --silent --show-error --location --proto '=https' --tlsv1.2 \
      --connect-timeout 10 --max-time 600 --retry 5 --retry-delay 2 \
      --output "$file.partial" "$url" || die "download of $url failed"
    printf '%s  %s\n' "$sha" "$file.partial" | sha256sum --check --status \
      || die "$url: sha256 is $(sha256sum "$file.partial" | cut -d' ' -f1), packer/pins says $sha"
    mv "$file.partial" "$file"
  fi
  printf '%s\n' "$file"
}

# install_file MODE SOURCE DEST: installs SOURCE as DEST (root-owned).
install_file() {
  install -D -o root -g root -m "$1" "$2" "$3"
}
