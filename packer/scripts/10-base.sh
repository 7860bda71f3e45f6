#!/usr/bin/env bash
# What kubeadm's preflight checks on every node that the image must settle:
# no swap, the overlay and br_netfilter modules loaded at boot, packet
# forwarding and bridged traffic through iptables, and the host tools the
# kubelet and kubeadm call (conntrack, socat, ethtool, iptables, ip).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

export DEBIAN_FRONTEND=noninteractive
# cloud-init (and apt's daily jobs) may still hold the dpkg lock on a
# fresh build instance.
cloud-init status --wait > /dev/null 2>&1 || true
apt_wait=(-o DPkg::Lock::Timeout=600)
log "apt packages"
apt-get "${apt_wait[@]}" update -qq
apt-get "${apt_wait[@]}" install -y -qq --no-install-recommends \
  ca-certificates curl jq conntrack socat ethtool iptables iproute2 ebtables kmod gnupg logrotate

log "no swap (kubelet refuses to start with swap on by default; preflight Swap)"
swapoff -a
# Comment out swap lines of fstab (idempotent: commented lines are kept).
sed -i -E 's@^([^#].*[[:space:]]swap[[:space:]].*)$@# kubeboot: no swap # \1@' /etc/fstab
systemctl mask --quiet swap.target

log "kernel modules and sysctls"
install_file 0644 "$IMAGE_DIR/files/modules-load.d/kubernetes.conf" /etc/modules-load.d/kubernetes.conf
install_file 0644 "$IMAGE_DIR/files/sysctl.d/90-kubernetes.conf" /etc/sysctl.d/90-kubernetes.conf
while read -r module; do
  case $module in '' | '#'*) continue ;; esac
  modprobe "$module"
done < /etc/modules-load.d/kubernetes.conf
sysctl --quiet --system
[ "$(sysctl -n net.ipv4.ip_forward)" = 1 ] || die "net.ipv4.ip_forward is not 1 after sysctl --system"
[ "$(sysctl -n net.bridge.bridge-nf-call-iptables)" = 1 ] \
  || die "net.bridge.bridge-nf-call-iptables is not 1 (br_netfilter loaded?)"
