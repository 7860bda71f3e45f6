#!/usr/bin/env bash
# The CloudWatch agent: it receives kubeboot's EMF metrics on
# tcp://127.0.0.1:25888 (kubeboot's metrics.agent_endpoint) and ships
# /var/log/kubeboot/kubeboot.log, kubeboot-journal.service's copy of the
# kubeboot units' journal lines (the agent reads files, not the journal), to
# the cluster's log group. That group is the cluster's, not the image's:
# kubeboot-cloudwatch.service runs /usr/libexec/kubeboot/cloudwatch-agent-setup
# at boot, before bootstrap, which reads it from kubeboot's configuration
# (user-data's metrics.log_group), writes the agent's config and starts it.
#
# The package is pinned by version and sha256 (packer/pins) and, as AWS
# documents ("Verifying the signature of the CloudWatch agent package"),
# by its GPG signature against the agent's key, whose fingerprint is
# pinned here.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

key_fingerprint=937616F3450B7D806CBD9725D58167303B789C72
key_url=https://amazoncloudwatch-agent.s3.amazonaws.com/assets/amazon-cloudwatch-agent.gpg

deb=$(fetch cloudwatch-agent)
read -r version _ url < <(pin cloudwatch-agent)
url=${url//@VERSION@/$version}
url=${url//@ARCH@/$ARCH}

gnupg=$(mktemp -d)
trap 'rm -rf "$gnupg"' EXIT
curl --fail --silent --show-error --location --proto '=https' --connect-timeout 10 --max-time 120 \
  --retry 5 --output "$gnupg/key.gpg" "$key_url" || die "download of $key_url failed"
curl --fail --silent --show-error --location --proto '=https' --connect-timeout 10 --max-time 120 \
  --retry 5 --output "$gnupg/agent.deb.sig" "$url.sig" || die "download of $url.sig failed"
gpg --homedir "$gnupg" --batch --quiet --import "$gnupg/key.gpg" \
  || die "$key_url is not a GPG public key"
# The signature must be good and made by the pinned key (VALIDSIG names the
# signing key's fingerprint), not merely by some key in the keyring.
status=$(gpg --homedir "$gnupg" --batch --status-fd 1 --trust-model always \
  --verify "$gnupg/agent.deb.sig" "$deb" 2> /dev/null) || true
printf '%s\n' "$status" | grep -q "^\[GNUPG:\] VALIDSIG $key_fingerprint " \
  || die "$url: no valid signature by the CloudWatch agent key $key_fingerprint (gpg said: $(printf '%s' "$status" | tr '\n' ' '))"

dpkg -i "$deb"
install_file 0644 "$IMAGE_DIR/files/cloudwatch-agent.json" /usr/share/kubeboot/cloudwatch-agent.json
install_file 0755 "$IMAGE_DIR/files/cloudwatch-agent-setup" /usr/libexec/kubeboot/cloudwatch-agent-setup
install_file 0644 "$IMAGE_DIR/files/kubeboot-cloudwatch.service" /usr/lib/systemd/system/kubeboot-cloudwatch.service
install_file 0644 "$IMAGE_DIR/files/logrotate-kubeboot" /etc/logrotate.d/kubeboot
systemctl daemon-reload
systemctl enable kubeboot-cloudwatch.service
