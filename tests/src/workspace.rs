//! Where the workspace and its build outputs live, so tests can run the real
//! agent binary and find tools installed by `scripts/setup.sh`.

use std::path::{Path, PathBuf};

/// Root of the cargo workspace, so tests can find `.venv/` and friends without
/// depending on the directory `cargo test` or nextest happened to start in.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate must live one level below the workspace root")
        .to_path_buf()
}

/// Directory holding the debug build outputs (`<target>/debug`).
///
/// Derived from the running test executable (which lives in
/// `<target>/debug/deps/`) so `--target-dir` works; falls back to
/// `CARGO_TARGET_DIR` and then `<workspace>/target`.
pub fn target_debug_dir() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(deps) = exe.parent() {
            if deps.file_name().is_some_and(|n| n == "deps") {
                if let Some(profile_dir) = deps.parent() {
                    return profile_dir.to_path_buf();
                }
            }
        }
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            let dir = if dir.is_relative() {
                workspace_root().join(dir)
            } else {
                dir
            };
            dir.join("debug")
        }
        None => workspace_root().join("target").join("debug"),
    }
}

/// Path of the built `kubeboot` agent binary, so end-to-end tests run exactly
/// what ships. `KBTEST_KUBEBOOT_BIN` overrides it.
///
/// Panics if it does not exist: cargo does not build a *different* package's
/// binaries for integration tests, so it must be built beforehand.
pub fn kubeboot_bin() -> PathBuf {
    let path = match std::env::var_os("KBTEST_KUBEBOOT_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_debug_dir().join("kubeboot"),
    };
    assert!(
        path.is_file(),
        "agent binary not found at {}: run `cargo build --bins` first (scripts/test.sh does)",
        path.display()
    );
    if std::env::var_os("KBTEST_KUBEBOOT_BIN").is_none() {
        let built = modified(&path);
        let agent = workspace_root().join("agent");
        // Cargo's dep-info names exactly the files the binary was built from,
        // so a test-only module (or a test) edited since does not count; a
        // build without one falls back to every file under agent/src.
        let source = match built_from(&path) {
            Some(files) => files.iter().map(|f| modified(f)).max(),
            None => Some(newest_modification(&agent.join("src"))),
        }
        .unwrap_or(std::time::UNIX_EPOCH)
        .max(modified(&agent.join("Cargo.toml")));
        assert!(
            built >= source,
            "agent binary {} is older than the agent's sources: run `cargo build --bins` \
             (tests would otherwise run yesterday's agent)",
            path.display()
        );
        assert_test_build(&path);
    }
    path
}

/// The crash and stall points exist only in a build with the `failpoints`
/// feature, which building the workspace enables. `cargo build -p kubeboot`
/// or `cargo test -p kubeboot` alone rebuild the binary without it, and the
/// crash-matrix tests would then wait for crashes that never come.
fn assert_test_build(path: &Path) {
    static CHECKED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let version = CHECKED.get_or_init(|| {
        std::process::Command::new(path)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    });
    assert!(
        version.contains("failpoints compiled in"),
        "agent binary {} is not a test build ({:?}): run `cargo build --workspace --bins` \
         (a package-only build leaves out the failpoints the tests use)",
        path.display(),
        version.trim()
    );
}

/// The source files cargo's dep-info (`<binary>.d`, beside the binary) says
/// the binary was built from; `None` when there is no readable dep-info.
fn built_from(binary: &Path) -> Option<Vec<PathBuf>> {
    let text = std::fs::read_to_string(binary.with_extension("d")).ok()?;
    let (_, deps) = text.lines().next()?.split_once(": ")?;
    Some(parse_dep_list(deps))
}

/// Splits a make-style dependency list: spaces separate paths, `\ ` is a
/// space inside one.
fn parse_dep_list(deps: &str) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut current = String::new();
    let mut chars = deps.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&' ') => {
                current.push(' ');
                chars.next();
            }
            ' ' => {
                if !current.is_empty() {
                    paths.push(PathBuf::from(std::mem::take(&mut current)));
                }
            }
            _ => current.push(c),
        }
    }
    if !current.is_empty() {
        paths.push(PathBuf::from(current));
    }
    paths
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// The newest modification time of the files under `dir`.
fn newest_modification(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return newest;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_modification(&path)
        } else {
            modified(&path)
        };
        newest = newest.max(t);
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dep_list_keeps_escaped_spaces_inside_a_path() {
        assert_eq!(
            parse_dep_list("/a/b.rs /my\\ dir/c.rs  /d.rs"),
            vec![
                PathBuf::from("/a/b.rs"),
                PathBuf::from("/my dir/c.rs"),
                PathBuf::from("/d.rs")
            ]
        );
    }
}
