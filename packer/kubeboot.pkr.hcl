# The kubeboot node image: Debian 12 (systemd 252, the version the repo's
# real-systemd tests boot) with containerd, runc, the CNI plugins, crictl,
# kubeadm/kubelet/kubectl, etcd's etcdctl/etcdutl, the CloudWatch agent,
# kubeboot (release build) and its units, enabled.
#
#   cargo build --release -p kubeboot
#   packer init packer/                       # Packer >= 1.7 (plugins.pkr.hcl)
#   packer build -var base_ami=ami-... -var region=eu-west-1 packer/
#
# base_ami: Debian publishes the current bookworm AMI of each region and
# architecture as a public SSM parameter:
#   aws ssm get-parameter --region eu-west-1 \
#     --name /aws/service/debian/release/bookworm/latest/amd64 \
#     --query Parameter.Value --output text
#
# Every download the scripts make is pinned in packer/pins (version, arch,
# sha256) and verified before use; a version without a pin stops the build.

variable "kubernetes_version" {
  type        = string
  default     = "1.31.2"
  description = "Kubernetes version of kubeadm, kubelet and kubectl; the clusters' cluster.kubernetes_version (infra/ KubernetesVersion) must equal it. packer/pins must list its checksums. scripts/lib.sh refuses any other form than MAJOR.MINOR.PATCH (packer 1.6.6 has no regex in validation blocks)."
}

variable "base_ami" {
  type        = string
  description = "Debian 12 (bookworm) AMI id for the architecture and region (see the SSM parameter above)."
}

variable "arch" {
  type        = string
  default     = "amd64"
  description = "Image architecture: amd64 or arm64 (Debian's names; the instance must match)."
  validation {
    condition     = contains(["amd64", "arm64"], var.arch)
    error_message = "The arch value must be amd64 or arm64."
  }
}

variable "region" {
  type        = string
  description = "Region the image is built and registered in."
}

variable "instance_type" {
  type        = string
  default     = ""
  description = "Build instance type; empty: t3.medium for amd64, t4g.medium for arm64."
}

variable "kubeboot_binary" {
  type        = string
  default     = ""
  description = "The kubeboot release binary for the architecture; empty: target/release/kubeboot of this checkout."
}

variable "ssh_username" {
  type        = string
  default     = "admin"
  description = "Login user of the base image (Debian's AMIs: admin)."
}

locals {
  instance_types = {
    amd64 = "t3.medium"
    arm64 = "t4g.medium"
  }
  instance_type   = var.instance_type != "" ? var.instance_type : local.instance_types[var.arch]
  kubeboot_binary = var.kubeboot_binary != "" ? var.kubeboot_binary : "${path.root}/../target/release/kubeboot"
  stamp           = formatdate("YYYYMMDDhhmmss", timestamp())
  # Where the file provisioner stages what the scripts install; removed by
  # 90-cleanup.sh.
  staging = "/tmp/kubeboot-image"
}

source "amazon-ebs" "node" {
  region          = var.region
  source_ami      = var.base_ami
  instance_type   = local.instance_type
  ssh_username    = var.ssh_username
  ami_name        = "kubeboot-k8s-${var.kubernetes_version}-${var.arch}-${local.stamp}"
  ami_description = "kubeboot node: Kubernetes ${var.kubernetes_version} (kubeadm), containerd, kubeboot"
  # IMDSv2 for the nodes is infra/'s launch templates' MetadataOptions
  # (tokens required, hop limit 1). metadata_options / imds_support here
  # would need the external Amazon plugin, which packer 1.6.6 (the lint)
  # does not know.
  encrypt_boot = true
  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 20
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }
  tags = {
    Name                = "kubeboot-k8s-${var.kubernetes_version}-${var.arch}"
    "kubeboot:k8s"      = var.kubernetes_version
    "kubeboot:base-ami" = var.base_ami
  }
}

build {
  sources = ["source.amazon-ebs.node"]

  provisioner "shell" {
    inline = ["mkdir -p ${local.staging}/systemd"]
  }

  # The scripts, their pins and files, the agent and its units.
  provisioner "file" {
    source      = "${path.root}/scripts"
    destination = local.staging
  }
  provisioner "file" {
    source      = "${path.root}/files"
    destination = local.staging
  }
  provisioner "file" {
    source      = "${path.root}/pins"
    destination = "${local.staging}/pins"
  }
  provisioner "file" {
    source      = local.kubeboot_binary
    destination = "${local.staging}/kubeboot"
  }
  provisioner "file" {
    source      = "${path.root}/../systemd/kubeboot-bootstrap.service"
    destination = "${local.staging}/systemd/kubeboot-bootstrap.service"
  }
  provisioner "file" {
    source      = "${path.root}/../systemd/kubeboot.service"
    destination = "${local.staging}/systemd/kubeboot.service"
  }
  provisioner "file" {
    source      = "${path.root}/../systemd/kubeboot-journal.service"
    destination = "${local.staging}/systemd/kubeboot-journal.service"
  }
  provisioner "file" {
    source      = "${path.root}/../README.md"
    destination = "${local.staging}/README.md"
  }
  # The cluster add-on manifests (docs/ADDONS.md): installed with kubeboot,
  # their images pre-pulled.
  provisioner "file" {
    source      = "${path.root}/../addons"
    destination = local.staging
  }

  # The staged scripts run where they were staged (each finds lib.sh and
  # the pins beside it), as root, with the variables below: Packer passes
  # environment_vars only through {{ .Vars }}.
  provisioner "shell" {
    execute_command = "sudo env {{ .Vars }} bash -eu '{{ .Path }}'"
    environment_vars = [
      "IMAGE_DIR=${local.staging}",
      "KUBERNETES_VERSION=${var.kubernetes_version}",
      "ARCH=${var.arch}",
    ]
    inline = [
      "bash ${local.staging}/scripts/10-base.sh",
      "bash ${local.staging}/scripts/20-kubernetes.sh",
      "bash ${local.staging}/scripts/30-containerd.sh",
      "bash ${local.staging}/scripts/40-etcd-tools.sh",
      "bash ${local.staging}/scripts/50-cloudwatch-agent.sh",
      "bash ${local.staging}/scripts/60-images.sh",
      "bash ${local.staging}/scripts/70-kubeboot.sh",
      "bash ${local.staging}/scripts/90-cleanup.sh",
    ]
  }
}
