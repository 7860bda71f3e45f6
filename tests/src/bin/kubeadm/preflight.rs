//! Preflight checks, as kubeadm runs them before `init` and `join`.

use crate::helpers::{check_name, dir_is_empty, phase_err, R};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::net::TcpListener;
use std::path::Path;
use std::path::PathBuf;

pub(crate) struct Preflight {
    pub(crate) errors: Vec<String>,
    pub(crate) ignored: BTreeSet<String>,
}

impl Preflight {
    pub(crate) fn new(ignore: Option<&str>) -> Self {
        Preflight {
            errors: Vec::new(),
            ignored: ignore
                .unwrap_or("")
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
        }
    }

    pub(crate) fn fail(&mut self, name: String, msg: String) {
        if self.ignored.contains("all") || self.ignored.contains(&name.to_ascii_lowercase()) {
            println!("\t[WARNING {name}]: {msg}");
        } else {
            self.errors.push(format!("\t[ERROR {name}]: {msg}"));
        }
    }

    pub(crate) fn port(&mut self, ip: &IpAddr, port: u16) {
        if TcpListener::bind((*ip, port)).is_err() {
            self.fail(format!("Port-{port}"), format!("Port {port} is in use"));
        }
    }

    pub(crate) fn file_available(&mut self, path: &Path) {
        if path.exists() {
            self.fail(
                check_name("FileAvailable", path),
                format!("{} already exists", path.display()),
            );
        }
    }

    pub(crate) fn dir_available(&mut self, path: &Path) {
        if !dir_is_empty(path) {
            self.fail(
                check_name("DirAvailable", path),
                format!("{} is not empty", path.display()),
            );
        }
    }

    pub(crate) fn finish(self) -> R<()> {
        if self.errors.is_empty() {
            return Ok(());
        }
        Err(phase_err(
            "preflight",
            format!(
                "[preflight] Some fatal errors occurred:\n{}\n[preflight] If you know what you are doing, you can make a check non-fatal with `--ignore-preflight-errors=...`",
                self.errors.join("\n")
            ),
        ))
    }
}

pub(crate) fn manifest_files(manifests: &Path) -> Vec<PathBuf> {
    [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "etcd",
    ]
    .iter()
    .map(|c| manifests.join(format!("{c}.yaml")))
    .collect()
}
