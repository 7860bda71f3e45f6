#!/usr/bin/env bash
# The control-plane images kubeadm of this version runs (kube-apiserver,
# -controller-manager, -scheduler, kube-proxy, etcd, CoreDNS, pause) and
# the cluster add-ons' (every image: line of the staged addons/*.yaml),
# pulled into containerd now so a node in a subnet without NAT still
# initializes, joins and gets its pod network. The tags are kubeadm's own
# for $KUBERNETES_VERSION and the manifests' pins; containerd verifies
# every layer against its digest.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

systemctl is-active --quiet containerd.service || systemctl start containerd.service
/usr/bin/kubeadm config images pull \
  --kubernetes-version "v$KUBERNETES_VERSION" \
  --cri-socket unix:///run/containerd/containerd.sock
mapfile -t addon_images < <(
  sed -nE 's/^[[:space:]-]*image:[[:space:]]*"?([^"[:space:]#]+)"?.*$/\1/p' "$IMAGE_DIR"/addons/*.yaml | sort -u
)
[ "${#addon_images[@]}" -gt 0 ] || die "no image: lines in $IMAGE_DIR/addons/*.yaml"
for image in "${addon_images[@]}"; do
  /usr/bin/crictl --runtime-endpoint unix:///run/containerd/containerd.sock pull "$image"
done
log "pre-pulled: kubeadm's images for v$KUBERNETES_VERSION and ${addon_images[*]}"
