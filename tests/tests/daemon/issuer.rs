//! The service-account issuer's documents in S3 (moto): published at init
//! from the key kubeadm (the stand-in) wrote, unchanged on a second turn,
//! republished when the signing key changes; a token signed with the
//! cluster's service-account private key verifies against the published
//! JWKS with a standard JWT library (what AWS STS does for IAM roles for
//! service accounts).

use kubeboot::issuer::{Outcome, Publisher};
use kubeboot_tests::simcluster::{assert_ok, SimCluster};
use std::path::Path;
use std::process::Command;

/// The two published documents, parsed.
async fn published(
    sim: &SimCluster,
    bucket: &str,
    issuer: &str,
) -> (serde_json::Value, serde_json::Value) {
    let s3 = sim.moto.s3().await;
    let (discovery, jwks) = kubeboot::oidc::object_keys(issuer);
    let mut docs = Vec::new();
    for key in [discovery, jwks] {
        let out = s3
            .get_object()
            .bucket(bucket)
            .key(&key)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{key} is not published: {e:?}"));
        let body = out.body.collect().await.expect("body").into_bytes();
        docs.push(serde_json::from_slice(&body).expect("JSON"));
    }
    let jwks = docs.pop().expect("jwks");
    (docs.pop().expect("discovery"), jwks)
}

/// The API server's `kid` of a PEM public key, computed with openssl
/// (independently of the agent): base64url(sha256(SubjectPublicKeyInfo DER)).
fn openssl_kid(public_pem: &Path) -> String {
    let der = Command::new("openssl")
        .args(["pkey", "-pubin", "-outform", "DER", "-in"])
        .arg(public_pem)
        .output()
        .expect("openssl");
    assert!(
        der.status.success(),
        "{}",
        String::from_utf8_lossy(&der.stderr)
    );
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&der.stdout))
}

/// An RSA-2048 private key in PKCS#1 PEM at `path`, as kubeadm writes sa.key.
fn rsa_key(path: &Path) {
    let made = Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(path)
        .arg("2048")
        .output()
        .expect("openssl genrsa");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_issuer_is_published_at_init_kept_and_republished_when_the_key_changes() {
    let sim = SimCluster::start(1, 0).await;
    let bucket = format!("oidc-{}", sim.name);
    sim.moto
        .s3()
        .await
        .create_bucket()
        .bucket(&bucket)
        .send()
        .await
        .expect("create the OIDC bucket");
    let issuer = format!("https://{bucket}.s3.us-east-1.amazonaws.com/{}", sim.name);
    let node = &sim.nodes[0];
    let drop_ins = node.config.parent().expect("dir").join("config.d");
    std::fs::create_dir_all(&drop_ins).expect("config.d");
    std::fs::write(
        drop_ins.join("50-issuer.toml"),
        format!(
            "[cluster]\nservice_account_issuer = \"{issuer}\"\n[aws]\noidc_bucket = \"{bucket}\"\n"
        ),
    )
    .expect("drop-in");

    // Init publishes them, from the key the stand-in's kubeadm wrote.
    let runs = sim.bootstrap(&[0]).await;
    assert_ok(&runs);
    assert!(
        runs[0]
            .stderr
            .contains("service-account issuer documents published"),
        "{}",
        kubeboot_tests::simcluster::tail(&runs[0].stderr)
    );
    let sa_pub = node.dir.join("etc/kubernetes/pki/sa.pub");
    let (discovery, jwks) = published(&sim, &bucket, &issuer).await;
    assert_eq!(discovery["issuer"], issuer.as_str());
    assert_eq!(discovery["jwks_uri"], format!("{issuer}/keys.json"));
    assert_eq!(
        discovery["response_types_supported"],
        serde_json::json!(["id_token"])
    );
    assert_eq!(
        discovery["subject_types_supported"],
        serde_json::json!(["public"])
    );
    assert_eq!(jwks["keys"].as_array().expect("keys").len(), 1);
    assert_eq!(jwks["keys"][0]["kid"], openssl_kid(&sa_pub).as_str());
    assert_eq!(jwks["keys"][0]["use"], "sig");

    // The leader's turn: the same key costs nothing, twice.
    let cfg = kubeboot::config::load_offline(&kubeboot::config::LoadOptions {
        path: node.config.clone(),
        user_data: kubeboot::config::UserData::Skip,
        // The sim's role is in its user-data.
        env: vec![("KUBEBOOT_NODE_ROLE".into(), "control-plane".into())],
    })
    .await
    .expect("config")
    .config;
    let aws = sim.moto.sdk_config().await;
    let publisher = Publisher::from_config(&aws, &cfg).expect("an issuer is set");
    assert_eq!(
        publisher.publish().await.expect("publish"),
        Outcome::AlreadyPublished
    );
    assert_eq!(
        publisher.publish().await.expect("publish"),
        Outcome::Unchanged
    );

    // A key rotation (kubeadm's kind of key: RSA 2048, PKCS#1): the next
    // turn publishes it, JWKS first.
    let sa_key = node.dir.join("etc/kubernetes/pki/sa.key");
    rsa_key(&sa_key);
    let made = Command::new("openssl")
        .args(["rsa", "-pubout", "-in"])
        .arg(&sa_key)
        .arg("-out")
        .arg(&sa_pub)
        .output()
        .expect("openssl rsa -pubout");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    // The stand-in's key was RSA too (kubeadm's default): the discovery
    // document (its algorithms) is unchanged, only the JWKS is written.
    assert_eq!(
        publisher.publish().await.expect("publish"),
        Outcome::Published(1)
    );
    let (discovery, jwks) = published(&sim, &bucket, &issuer).await;
    assert_eq!(
        discovery["id_token_signing_alg_values_supported"],
        serde_json::json!(["RS256"])
    );
    let key = &jwks["keys"][0];
    assert_eq!(key["kid"], openssl_kid(&sa_pub).as_str());

    // A token the API server would sign with that key (its kid in the
    // header) verifies against the published JWKS; a token signed with
    // another key does not.
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Claims {
        iss: String,
        sub: String,
        aud: Vec<String>,
        exp: u64,
    }
    let claims = Claims {
        iss: issuer.clone(),
        sub: "system:serviceaccount:kube-system:cluster-autoscaler".into(),
        aud: vec!["sts.amazonaws.com".into()],
        exp: 4_102_444_800,
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(key["kid"].as_str().expect("kid").to_string());
    let private = std::fs::read(&sa_key).expect("sa.key");
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&private).expect("RSA key"),
    )
    .expect("sign");
    let kid = jsonwebtoken::decode_header(&token)
        .expect("header")
        .kid
        .expect("kid");
    let jwk = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("the token's kid is in the JWKS");
    let decoding = jsonwebtoken::DecodingKey::from_rsa_components(
        jwk["n"].as_str().expect("n"),
        jwk["e"].as_str().expect("e"),
    )
    .expect("JWK");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&["sts.amazonaws.com"]);
    validation.set_issuer(&[issuer.as_str()]);
    let verified =
        jsonwebtoken::decode::<Claims>(&token, &decoding, &validation).expect("verifies");
    assert_eq!(
        verified.claims.sub,
        "system:serviceaccount:kube-system:cluster-autoscaler"
    );

    let other = node.dir.join("other.key");
    rsa_key(&other);
    let forged = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&std::fs::read(&other).expect("key"))
            .expect("key"),
    )
    .expect("sign");
    assert!(jsonwebtoken::decode::<Claims>(&forged, &decoding, &validation).is_err());

    // A bucket that is not there: KB-OIDC-002, the leader retries.
    let mut elsewhere = cfg.clone();
    elsewhere.aws.oidc_bucket = Some(format!("missing-{bucket}"));
    let err = Publisher::from_config(&aws, &elsewhere)
        .expect("an issuer is set")
        .publish()
        .await
        .expect_err("no such bucket");
    use kubeboot::catalogue::Coded as _;
    assert_eq!(err.code(), "KB-OIDC-002", "{err}");

    // A key file the API server could not use is refused by name.
    std::fs::write(&sa_pub, "not a key\n").expect("garble");
    let err = publisher.publish().await.expect_err("no key");
    assert_eq!(err.code(), "KB-OIDC-001", "{err}");
}
