//! Unit tests of the stand-in's parsing and defaulting.

use crate::cli::parse_flags;
use crate::etcd::drop_shared_loopback;
use crate::helpers::parse_go_duration;
use crate::token::default_advertise_address;
use serde_json::json;
use std::net::IpAddr;
use std::time::Duration;

#[test]
fn go_durations_parse_and_print() {
    assert_eq!(
        parse_go_duration("86400s").unwrap(),
        Duration::from_secs(86_400)
    );
    assert_eq!(
        parse_go_duration("24h0m0s").unwrap(),
        Duration::from_secs(86_400)
    );
    assert_eq!(
        parse_go_duration("1h30m").unwrap(),
        Duration::from_secs(5_400)
    );
    assert_eq!(parse_go_duration("0s").unwrap(), Duration::ZERO);
    assert!(parse_go_duration("1d").is_err());
    assert!(parse_go_duration("").is_err());
}

#[test]
fn flags_parse_like_cobra() {
    let args: Vec<String> = ["--config", "/x", "--upload-certs", "--v=5"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let f = parse_flags(&args, &[("config", true), ("upload-certs", false)]).unwrap();
    assert_eq!(f.value("config"), Some("/x"));
    assert!(f.on("upload-certs"));
    let bad: Vec<String> = vec!["--nope".into()];
    assert_eq!(
        parse_flags(&bad, &[]).unwrap_err().0,
        "unknown flag: --nope"
    );
    let short: Vec<String> = vec!["-f".into()];
    assert!(parse_flags(&short, &[("force", false)])
        .unwrap()
        .on("force"));
}

#[test]
fn shared_loopback_listen_urls_are_dropped() {
    let ip: IpAddr = "127.3.4.5".parse().unwrap();
    let urls = vec![
        "http://127.3.4.5:2379".to_string(),
        "http://127.0.0.1:2379".to_string(),
    ];
    assert_eq!(
        drop_shared_loopback(&urls, &ip),
        vec!["http://127.3.4.5:2379".to_string()]
    );
}

#[test]
fn the_advertise_address_is_looked_up_over_netlink_only_when_none_is_usable() {
    // None given: the netlink dump, which a test process may make.
    default_advertise_address(None).expect("netlink dump");
    default_advertise_address(Some(&json!({"localAPIEndpoint": {}}))).expect("dump");
    let given = |a: &str| {
        default_advertise_address(Some(&json!({"localAPIEndpoint": {"advertiseAddress": a}})))
    };
    given("10.0.1.5").expect("an address needs no lookup");
    given("127.0.0.1").expect("loopback: looked up");
    let err = given("not-an-ip").expect_err("refused");
    assert!(err.0.contains("must be ipv4 or ipv6 address"), "{}", err.0);
}
