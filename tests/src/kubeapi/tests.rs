//! Unit tests of the double's routing, selectors, patches and signatures.

use super::controllers::{compute_detached_jws, detached_jws_is_valid, hmac_sha256};
use super::handling::check_name;
use super::normalize;
use super::routing::{route, Route};
use super::selectors::{merge_patch, percent_decode};
use serde_json::json;

#[test]
fn hmac_matches_rfc_4231_case_2() {
    let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn detached_jws_verifies_only_with_the_right_token() {
    let jws = compute_detached_jws("kubeconfig", "abcdef", "0123456789abcdef");
    assert!(detached_jws_is_valid(
        &jws,
        "kubeconfig",
        "abcdef",
        "0123456789abcdef"
    ));
    assert!(!detached_jws_is_valid(
        &jws,
        "kubeconfig",
        "abcdef",
        "0123456789abcdeX"
    ));
    assert!(!detached_jws_is_valid(
        &jws,
        "kubeconfig",
        "abcdeX",
        "0123456789abcdef"
    ));
    assert!(!detached_jws_is_valid(
        &jws,
        "other",
        "abcdef",
        "0123456789abcdef"
    ));
}

#[test]
fn secrets_fold_string_data_and_names_are_validated() {
    let secret = normalize(
        "Secret",
        json!({"metadata": {"name": "s"}, "stringData": {"a": "x"}}),
    )
    .unwrap();
    assert_eq!(secret["data"]["a"], "eA==");
    assert!(secret.get("stringData").is_none());
    assert!(check_name("ip-10-0-1-2.ec2.internal").is_ok());
    assert!(check_name("Upper").is_err());
    assert!(check_name("-x").is_err());
}

#[test]
fn merge_patch_follows_rfc_7386() {
    let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
    merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}, "l": [3]}));
    assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
}

#[test]
fn paths_route_to_collections_objects_and_subresources() {
    assert!(matches!(route("/api/v1/nodes"), Ok(Route::Collection { ns, .. }) if ns.is_empty()));
    assert!(
        matches!(route("/api/v1/nodes/n1/status"), Ok(Route::Object { sub: Some(s), .. }) if s == "status")
    );
    assert!(
        matches!(route("/api/v1/namespaces/kube-system/pods/p/eviction"), Ok(Route::Object { sub: Some(s), .. }) if s == "eviction")
    );
    assert!(
        matches!(route("/api/v1/namespaces/kube-system"), Ok(Route::Object { ns, name, .. }) if ns.is_empty() && name == "kube-system")
    );
    assert!(route("/api/v1/namespaces/x/nodes").is_err());
    assert!(
        matches!(route("/apis/apps/v1/namespaces/kube-system/deployments/d"), Ok(Route::Object { ns, name, .. }) if ns == "kube-system" && name == "d")
    );
    assert!(matches!(
        route("/apis/rbac.authorization.k8s.io/v1/clusterroles"),
        Ok(Route::Collection { .. })
    ));
    assert!(
        route("/apis/apps/v1/namespaces/x/configmaps").is_err(),
        "core kinds are not in apps"
    );
    assert!(route("/apis/apps/v1/clusterroles").is_err());
    assert!(route("/apis/batch/v1/jobs").is_err());
    assert!(matches!(route("/apis"), Ok(Route::Groups)));
    assert!(
        matches!(route("/apis/apps/v1"), Ok(Route::GroupResources { group, version }) if group == "apps" && version == "v1")
    );
    assert!(
        route("/apis/batch/v1").is_err(),
        "no group the double does not serve"
    );
}

#[test]
fn percent_decoding_handles_selectors() {
    assert_eq!(percent_decode("spec.nodeName%3Dn1"), "spec.nodeName=n1");
    assert_eq!(percent_decode("a%2Cb"), "a,b");
    assert_eq!(percent_decode("100%"), "100%");
}
