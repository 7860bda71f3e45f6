//! What the agent's black-box tests share: the binary run with a clean
//! environment, its output, the workspace's examples, and the source trees
//! some tests read.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_kubeboot");

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The example configurations the repository ships.
pub(crate) fn examples() -> PathBuf {
    root().join("examples")
}

/// Runs `cmd` (the kubeboot binary) with nothing of the test's environment
/// but a `PATH`.
pub(crate) fn run(mut cmd: Command) -> Output {
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("kubeboot runs")
}

/// Runs kubeboot with `args` and a clean environment.
pub(crate) fn kubeboot(args: &[&str]) -> Output {
    kubeboot_with(args, &[])
}

/// Runs kubeboot with `args` and a clean environment plus `env`.
pub(crate) fn kubeboot_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().env("PATH", "/usr/bin:/bin").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("kubeboot runs")
}

pub(crate) fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `.rs` files below `dir`, at any depth.
pub(crate) fn rust_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}
