//! `kubeadm certs renew all` and `kubeadm certs check-expiration`.

use crate::api::kubeconfig_server;
use crate::cli::parse_flags;
use crate::helpers::{guard_paths, parent, plain_err, R};
use crate::DEFAULT_CERT_DIR;
use k8s_openapi::jiff::Timestamp;
use kubeboot_tests::pki;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

/// One certificate `kubeadm certs` handles: kubeadm's name, its long name
/// for messages, where it lives (a file stem under the cert dir, or a
/// kubeconfig under the kubernetes dir) and the CA that signs it.
pub(crate) struct Handled {
    pub(crate) name: &'static str,
    pub(crate) long: &'static str,
    pub(crate) file: &'static str,
    pub(crate) kubeconfig: bool,
    pub(crate) ca: &'static str,
}

/// kubeadm's renewal handlers, sorted by name as `Manager.Certificates()`
/// returns them (upstream `cmd/kubeadm/app/phases/certs/renewal/manager.go`,
/// long names from `phases/certs/certlist.go`). `kubelet.conf` is not
/// renewed: the kubelet rotates its own client certificate.
pub(crate) const HANDLED: [Handled; 11] = [
    Handled { name: "admin.conf", long: "certificate embedded in the kubeconfig file for the admin to use and for kubeadm itself", file: "admin.conf", kubeconfig: true, ca: "ca" },
    Handled { name: "apiserver", long: "certificate for serving the Kubernetes API", file: "apiserver", kubeconfig: false, ca: "ca" },
    Handled { name: "apiserver-etcd-client", long: "certificate the apiserver uses to access etcd", file: "apiserver-etcd-client", kubeconfig: false, ca: "etcd/ca" },
    Handled { name: "apiserver-kubelet-client", long: "certificate for the API server to connect to kubelet", file: "apiserver-kubelet-client", kubeconfig: false, ca: "ca" },
    Handled { name: "controller-manager.conf", long: "certificate embedded in the kubeconfig file for the controller manager to use", file: "controller-manager.conf", kubeconfig: true, ca: "ca" },
    Handled { name: "etcd-healthcheck-client", long: "certificate for liveness probes to healthcheck etcd", file: "etcd/healthcheck-client", kubeconfig: false, ca: "etcd/ca" },
    Handled { name: "etcd-peer", long: "certificate for etcd nodes to communicate with each other", file: "etcd/peer", kubeconfig: false, ca: "etcd/ca" },
    Handled { name: "etcd-server", long: "certificate for serving etcd", file: "etcd/server", kubeconfig: false, ca: "etcd/ca" },
    Handled { name: "front-proxy-client", long: "certificate for the front proxy client", file: "front-proxy-client", kubeconfig: false, ca: "front-proxy-ca" },
    Handled { name: "scheduler.conf", long: "certificate embedded in the kubeconfig file for the scheduler manager to use", file: "scheduler.conf", kubeconfig: true, ca: "ca" },
    Handled { name: "super-admin.conf", long: "certificate embedded in the kubeconfig file for the super-admin", file: "super-admin.conf", kubeconfig: true, ca: "ca" },
];

/// kubeadm's default `certificateValidityPeriod` (v1beta4): one year.
pub(crate) const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

impl Handled {
    pub(crate) fn path(&self, k8s: &Path, pki: &Path) -> PathBuf {
        if self.kubeconfig {
            k8s.join(self.file)
        } else {
            pki.join(format!("{}.crt", self.file))
        }
    }

    /// Its notAfter, or kubeadm's error text.
    pub(crate) fn not_after(&self, k8s: &Path, pki: &Path) -> Result<SystemTime, String> {
        let path = self.path(k8s, pki);
        let pem = if self.kubeconfig {
            pki::kubeconfig_client_pem(&path)?.ok_or_else(|| {
                format!(
                    "failed to load existing certificate {}: no client certificate in it",
                    self.name
                )
            })?
        } else {
            std::fs::read_to_string(&path)
                .map_err(|e| format!("failed to load existing certificate {}: {e}", self.name))?
        };
        pki::not_after_of(&pem)
    }
}

/// A CA is "external" when its certificate is there without its key
/// (`certsphase.UsingExternalCA`); kubeadm never treats etcd's CA so.
pub(crate) fn externally_managed(pki: &Path, ca: &str) -> bool {
    ca != "etcd/ca"
        && pki.join(format!("{ca}.crt")).exists()
        && !pki.join(format!("{ca}.key")).exists()
}

/// `Jan 02, 2006 15:04 UTC`, as check-expiration prints dates.
pub(crate) fn expiry_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Timestamp::from_second(secs)
        .ok()
        .and_then(|ts| k8s_openapi::jiff::fmt::strtime::format("%b %d, %Y %H:%M UTC", ts).ok())
        .unwrap_or_default()
}

/// apimachinery's `duration.ShortHumanDuration` of the time left.
pub(crate) fn residual(t: SystemTime) -> String {
    let Ok(left) = t.duration_since(SystemTime::now()) else {
        return "<invalid>".into();
    };
    let (s, d) = (left.as_secs(), left.as_secs() / 86_400);
    if d > 365 * 2 {
        format!("{}y", d / 365)
    } else if d >= 1 {
        format!("{d}d")
    } else if s >= 3600 {
        format!("{}h", s / 3600)
    } else {
        format!("{}m", s / 60)
    }
}

/// `kubeadm certs renew all` and `kubeadm certs check-expiration`
/// (upstream `cmd/kubeadm/app/cmd/certs.go`, `renewCert` and
/// `newCmdCertsExpiration`; `phases/certs/renewal/manager.go`,
/// `RenewUsingLocalCA`). Renewal re-signs each certificate with the local
/// CA, keeping its names and usages, valid for a year from now; a missing
/// certificate is reported `MISSING!` and skipped; one whose CA key is not
/// on the node (an external CA) is reported and skipped (exit 0, as
/// kubeadm); a missing etcd CA key fails, as kubeadm fails loading it.
/// Either reads the certificates of `--cert-dir` and the kubeconfigs next
/// to it; neither restarts anything (kubeadm tells you to).
pub(crate) async fn certs(args: &[String]) -> R<()> {
    let (sub, rest) = match args.split_first() {
        Some((s, r)) => (s.as_str(), r),
        None => return Err(plain_err(
            "Usage:\n  kubeadm certs [command]\n\nAvailable Commands:\n  check-expiration, renew",
        )),
    };
    let (renew, rest) = match (sub, rest.first().map(String::as_str)) {
        ("renew", Some("all")) => (true, &rest[1..]),
        ("renew", other) => {
            return Err(plain_err(format!(
                "the stand-in models only `kubeadm certs renew all`, not {other:?}"
            )))
        }
        ("check-expiration", _) => (false, rest),
        (other, _) => {
            return Err(plain_err(format!(
                "unknown command {other:?} for \"kubeadm certs\""
            )))
        }
    };
    let flags = parse_flags(
        rest,
        &[("cert-dir", true), ("config", true), ("kubeconfig", true)],
    )?;
    let pki = PathBuf::from(flags.value("cert-dir").unwrap_or(DEFAULT_CERT_DIR));
    let k8s = parent(&pki);
    guard_paths(&[&k8s])?;
    let kubeconfig_path = flags
        .value("kubeconfig")
        .map(PathBuf::from)
        .unwrap_or_else(|| k8s.join("admin.conf"));
    let verb = if renew { "renew" } else { "check-expiration" };
    match kubeconfig_server(&kubeconfig_path) {
        Ok(_) => {
            println!("[{verb}] Reading configuration from the \"kubeadm-config\" ConfigMap in namespace \"kube-system\"...");
            println!("[{verb}] Use 'kubeadm init phase upload-config --config your-config-file' to re-upload it.");
        }
        Err(_) => println!("[{verb}] Error reading configuration from the Cluster. Falling back to default configuration"),
    }
    println!();
    if renew {
        let not_after = SystemTime::now() + LEAF_VALIDITY;
        for h in &HANDLED {
            if !h.path(&k8s, &pki).exists() {
                println!("MISSING! {}", h.long);
                continue;
            }
            if externally_managed(&pki, h.ca) {
                println!("Detected external {}, {} can't be renewed", h.ca, h.long);
                continue;
            }
            let ca_key = pki.join(format!("{}.key", h.ca));
            if !ca_key.exists() {
                return Err(plain_err(format!(
                    "failure loading {} certificate authority: couldn't load the private key file {}: open {}: no such file or directory",
                    h.ca,
                    ca_key.display(),
                    ca_key.display()
                )));
            }
            let renewed = if h.kubeconfig {
                pki::renew_kubeconfig(&h.path(&k8s, &pki), &pki, not_after)
            } else {
                pki::renew_leaf(&pki, h.file, not_after)
            };
            renewed
                .map_err(|e| plain_err(format!("failed to renew certificate {}: {e}", h.name)))?;
            println!("{} renewed", h.long);
        }
        println!();
        println!("Done renewing certificates. You must restart the kube-apiserver, kube-controller-manager, kube-scheduler and etcd, so that they can use the new certificates.");
        return Ok(());
    }
    println!(
        "{:<26} {:<24} {:<15} {:<23} EXTERNALLY MANAGED",
        "CERTIFICATE", "EXPIRES", "RESIDUAL TIME", "CERTIFICATE AUTHORITY"
    );
    for h in &HANDLED {
        if !h.path(&k8s, &pki).exists() {
            println!("!MISSING! {}", h.name);
            continue;
        }
        let at = h.not_after(&k8s, &pki).map_err(plain_err)?;
        let external = if externally_managed(&pki, h.ca) {
            "yes"
        } else {
            "no"
        };
        let ca = h.ca.rsplit('/').next().unwrap_or(h.ca);
        let ca = if h.ca == "etcd/ca" { "etcd-ca" } else { ca };
        println!(
            "{:<26} {:<24} {:<15} {:<23} {external}",
            h.name,
            expiry_date(at),
            residual(at),
            ca
        );
    }
    println!();
    println!(
        "{:<23} {:<24} {:<15} EXTERNALLY MANAGED",
        "CERTIFICATE AUTHORITY", "EXPIRES", "RESIDUAL TIME"
    );
    for (name, stem) in [
        ("ca", "ca"),
        ("etcd-ca", "etcd/ca"),
        ("front-proxy-ca", "front-proxy-ca"),
    ] {
        let path = pki.join(format!("{stem}.crt"));
        let Ok(pem) = std::fs::read_to_string(&path) else {
            println!("!MISSING! {name}");
            continue;
        };
        let at = pki::not_after_of(&pem).map_err(plain_err)?;
        let external = if externally_managed(&pki, stem) {
            "yes"
        } else {
            "no"
        };
        println!(
            "{name:<23} {:<24} {:<15} {external}",
            expiry_date(at),
            residual(at)
        );
    }
    Ok(())
}
