//! The README's configuration reference is generated from the schema; this
//! keeps them identical. Run with KBTEST_BLESS=1 to rewrite the README section.

use std::path::Path;

const BEGIN: &str = "<!-- BEGIN CONFIG REFERENCE (generated from agent/src/config/schema.rs) -->";
const END: &str = "<!-- END CONFIG REFERENCE -->";

#[test]
fn readme_configuration_reference_matches_the_schema() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md at the workspace root");
    let start = readme.find(BEGIN).expect("README has the BEGIN marker") + BEGIN.len();
    let end = readme.find(END).expect("README has the END marker");
    let want = format!(
        "\n{}\n",
        kubeboot::config::schema::reference_markdown().trim()
    );
    if readme[start..end] != want {
        if std::env::var_os("KBTEST_BLESS").is_some() {
            let updated = format!("{}{want}{}", &readme[..start], &readme[end..]);
            std::fs::write(&path, updated).expect("README writable");
            return;
        }
        panic!("README configuration reference is stale: run KBTEST_BLESS=1 cargo test -p kubeboot --test agent readme::");
    }
}
