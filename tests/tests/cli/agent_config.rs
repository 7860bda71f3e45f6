//! The agent's configuration, identity and AWS plumbing against real doubles:
//! user-data served by the IMDSv2 double, credentials from its instance role,
//! DynamoDB on moto_server through the real SDK client.

use kubeboot::catalogue::Coded;
use kubeboot::config::{self, LoadOptions, Role, UserData};
use kubeboot::identity;
use kubeboot_tests::fixtures::create_pk_table;
use kubeboot_tests::imds::Imds;
use kubeboot_tests::moto::Moto;
use kubeboot_tests::workspace::kubeboot_bin;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A worker config whose IMDS and DynamoDB endpoints point at the doubles.
fn config_file(dir: &Path, imds: &str, extra: &str) -> PathBuf {
    let text = format!(
        "[cluster]\nname = \"sim-a\"\nkubernetes_version = \"1.31.2\"\ncontrol_plane_endpoint = \"127.0.0.1:6443\"\n\
         [aws]\ntable = \"kubeboot-sim-a\"\n\
         [imds]\nendpoint = \"{imds}\"\ndeadline = \"10s\"\nrequest_timeout = \"1s\"\n{extra}"
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

fn multipart(toml: &str) -> Vec<u8> {
    format!(
        "Content-Type: multipart/mixed; boundary=\"//\"\nMIME-Version: 1.0\n\n\
         --//\nContent-Type: text/x-shellscript; charset=\"us-ascii\"\n\n#!/bin/bash\nsystemctl start kubeboot-bootstrap\n\
         --//\nContent-Type: {}\n\n{toml}\n--//--\n",
        config::userdata::CONTENT_TYPE
    )
    .into_bytes()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).expect("gzip");
    enc.finish().expect("gzip")
}

fn imds_settings(endpoint: &str, deadline: Duration) -> config::model::Imds {
    config::model::Imds {
        endpoint: endpoint.to_string(),
        user_data: true,
        request_timeout: Duration::from_secs(1),
        deadline,
    }
}

/// The configuration at `path` with the user-data IMDS serves, as a node
/// loads it.
async fn load_with_user_data(path: PathBuf) -> Result<config::Loaded, config::Error> {
    let options = LoadOptions {
        path,
        user_data: UserData::FromImds,
        env: vec![],
    };
    config::load_with(&options, &identity::UserDataFromImds).await
}

#[tokio::test(flavor = "multi_thread")]
async fn gzipped_multipart_user_data_from_imds_sets_the_role() {
    let imds = Imds::start().await;
    imds.set_user_data(Some(gzip(&multipart(
        "[node]\nrole = \"control-plane\"\n[backup]\nenabled = false\n",
    ))));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(dir.path(), &imds.endpoint(), "");
    let loaded = load_with_user_data(path).await.expect("config loads");
    assert_eq!(loaded.config.node.role, Role::ControlPlane);
    assert_eq!(
        loaded.entries["node.role"].source.to_string(),
        "user-data (MIME part application/kubeboot+toml)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_user_data_at_all_is_not_an_error() {
    let imds = Imds::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(dir.path(), &imds.endpoint(), "[node]\nrole = \"worker\"\n");
    let loaded = load_with_user_data(path)
        .await
        .expect("config loads without user-data");
    assert_eq!(loaded.config.node.role, Role::Worker);
}

#[tokio::test(flavor = "multi_thread")]
async fn imds_client_rides_out_the_early_boot_window() {
    let imds = Imds::start().await;
    imds.fail_next(4);
    let client = identity::Imds::new(&imds_settings(&imds.endpoint(), Duration::from_secs(20)))
        .expect("client");
    let id = client
        .get("/latest/meta-data/instance-id")
        .await
        .expect("instance id after retries");
    assert_eq!(id.as_deref(), Some(imds.identity().instance_id.as_bytes()));
    assert!(
        imds.requests() >= 5,
        "the first 4 answers were 503s: {}",
        imds.requests()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn imds_client_gives_up_at_its_deadline_with_the_last_error() {
    let imds = Imds::start().await;
    imds.fail_next(1_000_000);
    let client = identity::Imds::new(&imds_settings(&imds.endpoint(), Duration::from_secs(1)))
        .expect("client");
    let started = Instant::now();
    let err = client
        .get("/latest/meta-data/instance-id")
        .await
        .expect_err("never answers");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    let text = err.to_string();
    assert!(matches!(err, identity::Error::Deadline { .. }), "{text}");
    assert!(text.contains("503"), "last error is kept: {text}");
    assert!(err.hint().contains("imds.deadline"));
}

#[tokio::test(flavor = "multi_thread")]
async fn imds_client_refreshes_an_expired_token() {
    let imds = Imds::start().await;
    let client = identity::Imds::new(&imds_settings(&imds.endpoint(), Duration::from_secs(10)))
        .expect("client");
    client
        .get("/latest/meta-data/instance-id")
        .await
        .expect("first read");
    imds.expire_tokens();
    let az = client
        .get("/latest/meta-data/placement/availability-zone")
        .await
        .expect("read after expiry");
    assert_eq!(
        az.as_deref(),
        Some(imds.identity().availability_zone.as_bytes())
    );
    let puts = imds
        .request_log()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(puts, 2, "one token, then one refresh after the 401");
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_clients_use_the_instance_role_and_reach_moto() {
    let imds = Imds::start().await;
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[node]\nrole = \"worker\"\n[aws.endpoints]\ndynamodb = \"{}\"\n",
        moto.endpoint()
    );
    let path = config_file(dir.path(), &imds.endpoint(), &extra);
    let loaded = config::load_offline(&LoadOptions {
        path,
        user_data: UserData::Skip,
        env: vec![],
    })
    .await
    .expect("config loads");
    let cfg = &loaded.config;
    let base = kubeboot::aws::sdk_config(cfg, "us-east-1")
        .await
        .expect("sdk config");
    let ddb = aws_sdk_dynamodb::Client::new(&kubeboot::aws::for_service(
        &base,
        cfg,
        kubeboot::aws::Service::DynamoDb,
    ));
    let table = format!("kubeboot-{}", uuid::Uuid::new_v4().simple());
    create_pk_table(&ddb, &table).await;
    let tables = ddb
        .list_tables()
        .send()
        .await
        .expect("list tables")
        .table_names
        .unwrap_or_default();
    assert!(tables.contains(&table));
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        assert!(
            imds.request_log().iter().any(|r| r
                .path
                .starts_with("/latest/meta-data/iam/security-credentials/")),
            "credentials came from the instance role"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn config_check_reads_user_data_through_imds_and_names_it_in_problems() {
    let imds = Imds::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = config_file(dir.path(), &imds.endpoint(), "");
    let run = |args: &[&str]| {
        std::process::Command::new(kubeboot_bin())
            .env_clear()
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("kubeboot runs")
    };

    imds.set_user_data(Some(multipart("[node]\nrole = \"worker\"\n")));
    let ok = run(&["config", "check", "--with-user-data"]);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        out.contains("user-data (MIME part application/kubeboot+toml)"),
        "{out}"
    );

    imds.set_user_data(Some(multipart(
        "[node]\nrole = \"wroker\"\n[imds]\nendpoint = \"http://10.1.1.1\"\n",
    )));
    let bad = run(&["config", "check", "--with-user-data"]);
    let out = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(2), "{out}");
    assert!(
        out.contains("user-data (MIME part application/kubeboot+toml): node.role = \"wroker\""),
        "{out}"
    );
    assert!(out.contains("imds.endpoint"), "{out}");

    // Without the flag the linter checks the file alone and says so.
    let alone = run(&["config", "check"]);
    let out = String::from_utf8_lossy(&alone.stdout);
    assert_eq!(
        alone.status.code(),
        Some(2),
        "node.role is only in user-data: {out}"
    );
    assert!(
        out.contains("node.role") && out.contains("user-data not merged"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_is_read_from_imds_even_when_it_wakes_up_late() {
    let imds = Imds::start().await;
    imds.fail_next(3);
    let client = identity::Imds::new(&imds_settings(&imds.endpoint(), Duration::from_secs(20)))
        .expect("client");
    let id = client.identity().await.expect("identity");
    let want = imds.identity();
    assert_eq!(id.instance_id, want.instance_id);
    assert_eq!(id.private_ip, want.private_ip.to_string());
    assert_eq!(id.hostname, want.local_hostname());
    assert_eq!(id.availability_zone, want.availability_zone);
    assert_eq!(id.region, want.region);
}
