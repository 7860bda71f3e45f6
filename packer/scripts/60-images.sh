#!/usr/bin/env bash
# The control-plane images kubeadm of this version runs (kube-apiserver,
# -controller-manager, -scheduler, kube-proxy, etcd, CoreDNS, pause),
# pulled into containerd now so a node in a subnet without NAT still
# initializes or joins. The tags are kubeadm's own for $KUBERNETES_VERSION;
# containerd verifies every layer against its digest.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

systemctl is-active --quiet containerd.service || systemctl start containerd.service
/usr/bin/kubeadm config images pull \
  --kubernetes-version "v$KUBERNETES_VERSION" \
  --cri-socket unix:///run/containerd/containerd.sock
