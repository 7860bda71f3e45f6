//! The error catalogue as a whole: `docs/errors.md` is generated from it (run
//! with KBTEST_BLESS=1 to rewrite it), `kubeboot explain` knows every code,
//! and every code is asserted on a provoked error by some test.

use crate::common::{kubeboot, root, rust_files};
use kubeboot::catalogue::{self, ENTRIES};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[test]
fn docs_errors_md_matches_the_catalogue() {
    let path = root().join("docs/errors.md");
    let want = catalogue::markdown();
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have != want {
        if std::env::var_os("KBTEST_BLESS").is_some() {
            std::fs::write(&path, want).expect("docs/errors.md writable");
            return;
        }
        panic!("docs/errors.md is stale: run KBTEST_BLESS=1 cargo test -p kubeboot --test agent errors::");
    }
}

#[test]
fn explain_knows_every_code_in_text_and_json_whatever_the_case() {
    for e in ENTRIES {
        let out = kubeboot(&["explain", &e.code.to_ascii_lowercase()]);
        assert_eq!(out.status.code(), Some(0), "{}: {out:?}", e.code);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            catalogue::render_text(e)
        );
        let out = kubeboot(&["explain", e.code, "--output", "json"]);
        assert_eq!(out.status.code(), Some(0), "{}: {out:?}", e.code);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(v["code"], e.code);
        assert_eq!(v["title"], e.title);
        assert_eq!(v["cause"], e.cause);
        assert_eq!(v["check"], e.check);
    }
}

#[test]
fn explain_list_lists_every_code() {
    let out = kubeboot(&["explain", "--list"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(text.lines().count(), ENTRIES.len(), "{text}");
    for e in ENTRIES {
        assert!(
            text.lines()
                .any(|l| l.starts_with(e.code) && l.ends_with(e.title)),
            "{} missing from\n{text}",
            e.code
        );
    }
    let out = kubeboot(&["explain", "--list", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let codes: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|e| e["code"].as_str())
        .collect();
    assert_eq!(codes, ENTRIES.iter().map(|e| e.code).collect::<Vec<_>>());
}

#[test]
fn an_unknown_code_exits_2_naming_the_value_the_form_and_the_nearest_codes() {
    let out = kubeboot(&["--log-format", "json", "explain", "kb-lock-999"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value =
        serde_json::from_str(stderr.lines().last().expect("an error line")).expect("JSON");
    let message = line["message"].as_str().expect("message");
    for needle in ["\"kb-lock-999\"", "KB-AREA-NNN", "closest: KB-LOCK-"] {
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }
    assert!(line["hint"].as_str().expect("hint").contains("--list"));

    // Neither a code nor close to one: still the form and a way out.
    let out = kubeboot(&["--log-format", "text", "explain", "help me"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"help me\" is not an error code") && stderr.contains("--list"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------
// Every code is proven by a test.

/// The test sources: the test modules of `agent/src` (after `#[cfg(test)]`,
/// or whole files of modules compiled only for tests, such as
/// `agent/src/error/provoke.rs`), `agent/tests` and `tests/tests`. Not this
/// file and not `catalogue.rs` (their codes are about the catalogue, not
/// about provoked errors).
fn test_sources() -> Vec<(PathBuf, String)> {
    let root = root();
    let mut out = Vec::new();
    let files = rust_files(&root.join("agent/src"));
    let test_only = test_only_modules(&files);
    for path in files {
        let rel = path.strip_prefix(&root).unwrap_or(&path).to_path_buf();
        let text = std::fs::read_to_string(&path).expect("read source");
        if rel == Path::new("agent/src/catalogue.rs") {
            continue;
        }
        if test_only.contains(&path) {
            out.push((rel, text));
        } else if let Some(i) = text.find("#[cfg(test)]") {
            out.push((rel, text[i..].to_string()));
        }
    }
    for dir in ["agent/tests", "tests/tests"] {
        for path in rust_files(&root.join(dir)) {
            let rel = path.strip_prefix(&root).unwrap_or(&path).to_path_buf();
            if rel != Path::new("agent/tests/agent/errors.rs") {
                let text = std::fs::read_to_string(&path).expect("read test");
                out.push((rel, text));
            }
        }
    }
    out
}

/// The files of modules declared `#[cfg(test)] mod name;` (the line after
/// the attribute), as `name.rs` or `name/mod.rs` where their parent keeps
/// its children.
fn test_only_modules(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for path in files {
        let text = std::fs::read_to_string(path).expect("read source");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for pair in lines.windows(2) {
            let name = pair[1]
                .trim_start_matches("pub(crate) ")
                .strip_prefix("mod ")
                .and_then(|rest| rest.strip_suffix(';'));
            let (true, Some(name)) = (pair[0] == "#[cfg(test)]", name) else {
                continue;
            };
            let parent = path.parent().expect("a parent directory");
            let dir = match path.file_stem().and_then(|s| s.to_str()) {
                Some("mod" | "lib" | "main") => parent.to_path_buf(),
                Some(stem) => parent.join(stem),
                None => continue,
            };
            out.insert(dir.join(format!("{name}.rs")));
            out.insert(dir.join(name).join("mod.rs"));
        }
    }
    out
}

/// Every `KB-<AREA>-<NNN>` in `text`, with its byte offset.
fn codes_in(text: &str) -> Vec<(usize, &str)> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("KB-").map(|i| i + from) {
        let mut end = at + 3;
        let area_start = end;
        while end < bytes.len() && bytes[end].is_ascii_uppercase() {
            end += 1;
        }
        let digits_start = end + 1;
        let well_formed = end > area_start
            && bytes.get(end) == Some(&b'-')
            && bytes.len() >= digits_start + 3
            && bytes[digits_start..digits_start + 3]
                .iter()
                .all(u8::is_ascii_digit)
            && !bytes.get(digits_start + 3).is_some_and(u8::is_ascii_digit);
        if well_formed {
            found.push((at, &text[at..digits_start + 3]));
        }
        from = at + 3;
    }
    found
}

/// Whether the code at `at` sits inside an assertion: the statement it is
/// part of (since the previous `;`) calls an `assert…` macro or helper.
fn in_assertion(text: &str, at: usize) -> bool {
    let start = text[..at].rfind(';').map_or(0, |i| i + 1);
    text[start..at].contains("assert")
}

#[test]
fn every_code_is_asserted_on_a_provoked_error_by_some_test() {
    let known: BTreeSet<&str> = ENTRIES.iter().map(|e| e.code).collect();
    let mut proven: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut unknown = Vec::new();
    let sources = test_sources();
    assert!(sources.len() > 20, "found the test sources");
    for (path, text) in &sources {
        for (at, code) in codes_in(text) {
            let line = text[..at].matches('\n').count() + 1;
            let place = format!("{}:{line}", path.display());
            match known.get(code) {
                None => unknown.push(format!("{place}: {code}")),
                Some(code) if in_assertion(text, at) => proven.entry(code).or_default().push(place),
                Some(_) => {}
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "tests name codes the catalogue does not have (typo? retired?): {unknown:#?}"
    );
    let missing: Vec<&str> = known
        .iter()
        .filter(|c| !proven.contains_key(*c))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "no test asserts these codes on an error it provoked: {missing:?}\n\
         (write `assert_eq!(err.code(), \"KB-...\")` on the error, or check the CLI's stderr)"
    );
}

#[test]
fn the_code_scanner_finds_codes_and_assertions() {
    let text = "let a = 1;\n    assert_eq!(err.code(), \"KB-LOCK-001\");\n    let b = \"KB-REG-002\"; KB-X-1 KB-LOCK-0011";
    let found = codes_in(text);
    assert_eq!(
        found.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        ["KB-LOCK-001", "KB-REG-002"]
    );
    assert!(in_assertion(text, found[0].0));
    assert!(!in_assertion(text, found[1].0));
}
