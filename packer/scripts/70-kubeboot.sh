#!/usr/bin/env bash
# kubeboot itself: install-kubeboot.sh (the same script the repo's image
# test runs into a machine's root) with what the file provisioners staged.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "$0")/lib.sh"

bash "$IMAGE_DIR/scripts/install-kubeboot.sh" \
  --binary "$IMAGE_DIR/kubeboot" \
  --units "$IMAGE_DIR/systemd" \
  --config "$IMAGE_DIR/files/kubeboot/config.toml" \
  --doc "$IMAGE_DIR/README.md" \
  --addons "$IMAGE_DIR/addons" \
  /
/usr/bin/kubeboot --version
# The image's own settings must be well-formed: unknown keys or bad values
# fail the build, not the first boot. Checked with the least user-data a
# node gets (the required keys), as a file: no instance metadata here.
sample=$(mktemp)
trap 'rm -f "$sample"' EXIT
printf '[cluster]\nname = "image-check"\nkubernetes_version = "%s"\ncontrol_plane_endpoint = "api.image-check.internal:6443"\n[node]\nrole = "worker"\n[aws]\ntable = "kubeboot-image-check"\n' \
  "$KUBERNETES_VERSION" > "$sample"
/usr/bin/kubeboot config check --user-data "$sample" \
  || die "/etc/kubeboot/config.toml (the image's settings) has problems, above"
log "kubeboot installed"
