//! I7: the agent never runs anything through a shell. Checked on the source
//! (grep-able, as the invariant promises): one place starts processes — the
//! kubeadm runner, by argv — and no shell or `-c` appears anywhere.

use crate::common::rust_files;
use std::path::{Path, PathBuf};

#[test]
fn no_shell_anywhere_and_one_argv_process_runner() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = rust_files(&root.join("src"));
    assert!(files.len() > 10, "found the sources: {files:?}");
    let forbidden = [
        "sh -c",
        "bash -c",
        "\"sh\"",
        "\"bash\"",
        "\"/bin/sh\"",
        "\"/bin/bash\"",
        "\"-c\"",
    ];
    let mut spawners = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        for needle in forbidden {
            assert!(
                !text.contains(needle),
                "{} contains {needle}: the agent must not use a shell (I7)",
                file.display()
            );
        }
        if text.contains("Command::new(") {
            spawners.push(file.strip_prefix(root).unwrap_or(file).to_path_buf());
        }
    }
    assert_eq!(
        spawners,
        vec![PathBuf::from("src/kubeadm/mod.rs")],
        "processes are started in one place, by argv"
    );
}
