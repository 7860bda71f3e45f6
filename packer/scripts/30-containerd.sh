#!/usr/bin/env bash
# The container runtime: containerd (its unit from the repo, the binaries
# from the pinned release), runc, the CNI plugins and crictl. containerd's
# config uses the systemd cgroup driver (the kubelet's, which kubeadm sets)
# and the pause image kubeadm of this Kubernetes version runs (kubeadm warns
# on a mismatch, and the node would pull two sandbox images).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

containerd=$(fetch containerd)
runc=$(fetch runc)
cni_plugins=$(fetch cni-plugins)
crictl=$(fetch crictl)
tar -C /usr/local -xzf "$containerd" bin/
install_file 0755 "$runc" /usr/local/sbin/runc
mkdir -p /opt/cni/bin
tar -C /opt/cni/bin -xzf "$cni_plugins"
tar -C /usr/local/bin -xzf "$crictl" crictl
install_file 0644 "$IMAGE_DIR/files/crictl.yaml" /etc/crictl.yaml
install_file 0644 "$IMAGE_DIR/files/containerd.service" /usr/lib/systemd/system/containerd.service

# The pause image kubeadm of this version runs (its constants, asked of the
# kubeadm 20-kubernetes.sh installed): the sandbox image must be the same.
pause_image=$(/usr/bin/kubeadm config images list --kubernetes-version "v$KUBERNETES_VERSION" | grep '/pause:') \
  || die "kubeadm v$KUBERNETES_VERSION lists no pause image"
mkdir -p /etc/containerd
/usr/local/bin/containerd config default > /etc/containerd/config.toml.new
sed -i -E \
  -e 's@^([[:space:]]*SystemdCgroup[[:space:]]*=[[:space:]]*).*@\1true@' \
  -e "s@^([[:space:]]*sandbox_image[[:space:]]*=[[:space:]]*).*@\\1\"$pause_image\"@" \
  /etc/containerd/config.toml.new
grep -q '^[[:space:]]*SystemdCgroup = true' /etc/containerd/config.toml.new \
  || die "containerd's default config has no SystemdCgroup key to set: check the containerd pin"
grep -q "^[[:space:]]*sandbox_image = \"$pause_image\"" /etc/containerd/config.toml.new \
  || die "containerd's default config has no sandbox_image key to set: check the containerd pin"
mv /etc/containerd/config.toml.new /etc/containerd/config.toml

systemctl daemon-reload
systemctl enable --now containerd.service
crictl info > /dev/null || die "containerd does not answer on its CRI socket"
