//! What ships is not what the tests run: the crash and stall points the
//! crash-matrix and watchdog tests use (`KBTEST_CRASH_AT`, `KBTEST_STALL_AT`)
//! must not exist in the binary the AMI installs, or an environment variable
//! on a node could abort the agent mid-join or hang its daemon.

use kubeboot_tests::workspace::{kubeboot_bin, workspace_root};
use std::process::Command;

/// Building the agent package alone (what `cargo build --release -p kubeboot`
/// and the image build do) does not enable the `failpoints` feature; only the
/// test crate does.
#[test]
fn the_shipped_package_build_has_no_failpoints() {
    let tree = |package: &str| {
        let out = Command::new(env!("CARGO"))
            .args([
                "tree",
                "--offline",
                "--locked",
                "-e",
                "features",
                "--prefix",
                "none",
            ])
            .args(["-p", package, "-i", "kubeboot"])
            .current_dir(workspace_root())
            .output()
            .expect("cargo tree runs");
        assert!(
            out.status.success(),
            "cargo tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let shipped = tree("kubeboot");
    assert!(
        !shipped.contains("\"failpoints\""),
        "building kubeboot alone enables failpoints:\n{shipped}"
    );
    let tests = tree("kubeboot-tests");
    assert!(
        tests.contains("kubeboot feature \"failpoints\""),
        "the test crate no longer enables failpoints (the crash-matrix tests would pass vacuously):\n{tests}"
    );
}

/// The binary the tests run says it is a test build, so one that reached an
/// image by mistake is caught by `kubeboot --version`.
#[test]
fn a_test_build_says_so_in_its_version() {
    let out = Command::new(kubeboot_bin())
        .arg("--version")
        .output()
        .expect("kubeboot runs");
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains("test build: failpoints compiled in"),
        "{version}"
    );
}

/// No code outside the failpoint module reads a `KBTEST_` variable: every
/// test hook goes through the module that compiles away.
#[test]
fn only_the_failpoint_module_reads_test_variables() {
    let src = workspace_root().join("agent/src");
    let mut offenders = Vec::new();
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("agent/src is readable") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("failpoint.rs")
            {
                let text = std::fs::read_to_string(&path).expect("source is readable");
                for (n, line) in text.lines().enumerate() {
                    // The catalogue's generated-docs banner names the bless variable of a test.
                    if line.contains("\"KBTEST_") || line.contains("var(\"KBTEST") {
                        offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "test variables read outside failpoint.rs:\n{}",
        offenders.join("\n")
    );
}
