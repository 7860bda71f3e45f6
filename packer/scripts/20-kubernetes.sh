#!/usr/bin/env bash
# kubeadm, kubelet and kubectl of $KUBERNETES_VERSION, with the kubelet's
# unit and kubeadm's drop-in as the Kubernetes packages ship them
# (kubernetes/release: cmd/krel/templates/latest/kubelet and kubeadm). The
# kubelet is enabled: kubeadm's preflight warns when it is not, and after a
# reboot the kubelet must come back by itself to run the static Pods.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

for tool in kubeadm kubelet kubectl; do
  file=$(fetch "$tool" "$KUBERNETES_VERSION")
  install_file 0755 "$file" "/usr/bin/$tool"
done
installed=$(/usr/bin/kubeadm version -o short)
[ "$installed" = "v$KUBERNETES_VERSION" ] \
  || die "kubeadm reports $installed, the image is for v$KUBERNETES_VERSION"

install_file 0644 "$IMAGE_DIR/files/kubelet.service" /usr/lib/systemd/system/kubelet.service
install_file 0644 "$IMAGE_DIR/files/10-kubeadm.conf" /usr/lib/systemd/system/kubelet.service.d/10-kubeadm.conf
mkdir -p /etc/kubernetes/manifests /var/lib/kubelet
systemctl daemon-reload
systemctl enable kubelet.service
