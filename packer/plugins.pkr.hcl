# The Amazon plugin this template needs. Current Packer (1.7 and later)
# reads this block (`packer init packer/`); Debian's packer 1.6.6, which the
# repo's lint runs offline, rejects it, so it lives in a file of its own and
# scripts/lint-packer.sh validates kubeboot.pkr.hcl alone.
packer {
  required_plugins {
    amazon = {
      version = ">= 1.3.0, < 2.0.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}
