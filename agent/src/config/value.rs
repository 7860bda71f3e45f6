//! Checks one configuration value against its [`Kind`]: pure functions, so
//! every rule is unit-tested without files or environments.

use super::schema::Kind;
use std::net::Ipv4Addr;
use std::time::Duration;

/// Why a value was refused, before it is tied to a source and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The TOML type is wrong (a number where text was expected, ...).
    WrongType { expected: String },
    /// Right type, outside the allowed bounds.
    OutOfRange { expected: String },
    /// Right type, wrong shape.
    Invalid { expected: String },
}

impl Refusal {
    /// The expected form, for the message.
    pub fn expected(&self) -> &str {
        match self {
            Refusal::WrongType { expected }
            | Refusal::OutOfRange { expected }
            | Refusal::Invalid { expected } => expected,
        }
    }
}

/// Human description of the accepted form of a kind.
pub fn expected_form(kind: Kind) -> String {
    match kind {
        Kind::ClusterName => "a lowercase DNS label of 1-40 characters [a-z0-9-], e.g. \"prod-a\"".into(),
        Kind::KubeVersion => {
            "a Kubernetes version 1.31 or newer like \"1.31.2\" or \"v1.31.2\" (kubeadm config v1beta4)".into()
        }
        Kind::HostPort => "\"host:port\" with an IP or a DNS name (letters, digits, '-', '.'), e.g. \"api.example.internal:6443\"".into(),
        Kind::Cidr => "an IPv4 CIDR like \"10.244.0.0/16\"".into(),
        Kind::Region => "an AWS region code like \"eu-west-1\"".into(),
        Kind::Url => "an http:// or https:// URL, e.g. \"http://127.0.0.1:5000\"".into(),
        Kind::SocketUrl => "\"tcp://host:port\" or \"udp://host:port\"".into(),
        Kind::AbsPath => "an absolute path, e.g. \"/var/lib/kubeboot\"".into(),
        Kind::Text => "non-empty text on one line".into(),
        Kind::TableName => "a DynamoDB table name: 3-255 characters [A-Za-z0-9_.-]".into(),
        Kind::BucketName => "an S3 bucket name: 3-63 characters [a-z0-9.-], starting and ending with a letter or digit".into(),
        Kind::SsmPrefix => "an SSM path like \"/kubeboot/prod-a\" (leading /, no trailing /)".into(),
        Kind::SecretName => "a Secrets Manager name: 1-512 characters [A-Za-z0-9/_+=.@-]".into(),
        Kind::Int { min, max } => format!("a whole number from {min} to {max}"),
        Kind::Bool => "true or false".into(),
        Kind::Duration { min_ms, max_ms } => format!(
            "a duration from {} to {} such as \"500ms\", \"30s\", \"5m\", \"6h\", \"1h30m\"",
            format_duration(Duration::from_millis(min_ms)),
            format_duration(Duration::from_millis(max_ms))
        ),
        Kind::OneOf(words) => format!(
            "one of {}",
            words.iter().map(|w| format!("\"{w}\"")).collect::<Vec<_>>().join(", ")
        ),
        Kind::BootstrapToken => "a bootstrap token of the form [a-z0-9]{6}.[a-z0-9]{16}".into(),
        Kind::CertificateKey => "a certificate key of 64 hex characters".into(),
        Kind::CaCertHashes => "a list of \"sha256:<64 hex characters>\" strings".into(),
    }
}

/// Checks `value` against `kind`.
pub fn check(kind: Kind, value: &toml::Value) -> Result<(), Refusal> {
    let wrong_type = || Refusal::WrongType {
        expected: expected_form(kind),
    };
    let invalid = || Refusal::Invalid {
        expected: expected_form(kind),
    };
    let out_of_range = || Refusal::OutOfRange {
        expected: expected_form(kind),
    };
    match kind {
        Kind::Int { min, max } => {
            let n = value.as_integer().ok_or_else(wrong_type)?;
            if n < min || n > max {
                return Err(out_of_range());
            }
            Ok(())
        }
        Kind::Bool => value.as_bool().map(|_| ()).ok_or_else(wrong_type),
        Kind::CaCertHashes => {
            let items = value.as_array().ok_or_else(wrong_type)?;
            if items.is_empty() {
                return Err(invalid());
            }
            for item in items {
                let s = item.as_str().ok_or_else(wrong_type)?;
                if !is_ca_hash(s) {
                    return Err(invalid());
                }
            }
            Ok(())
        }
        Kind::Duration { min_ms, max_ms } => {
            let s = value.as_str().ok_or_else(wrong_type)?;
            let d = parse_duration(s).ok_or_else(invalid)?;
            if d < Duration::from_millis(min_ms) || d > Duration::from_millis(max_ms) {
                return Err(out_of_range());
            }
            Ok(())
        }
        Kind::OneOf(words) => {
            let s = value.as_str().ok_or_else(wrong_type)?;
            if words.contains(&s) {
                Ok(())
            } else {
                Err(invalid())
            }
        }
        _ => {
            let s = value.as_str().ok_or_else(wrong_type)?;
            if string_ok(kind, s) {
                Ok(())
            } else {
                Err(invalid())
            }
        }
    }
}

fn string_ok(kind: Kind, s: &str) -> bool {
    match kind {
        Kind::ClusterName => is_dns_label(s, 40),
        Kind::KubeVersion => is_kube_version(s),
        Kind::HostPort => is_endpoint(s),
        Kind::Cidr => is_cidr(s),
        Kind::Region => is_region(s),
        Kind::Url => is_url(s, &["http", "https"]),
        Kind::SocketUrl => is_url(s, &["tcp", "udp"]) && url_has_port(s),
        Kind::AbsPath => s.starts_with('/') && !s.contains('\0') && !s.contains('\n'),
        Kind::Text => !s.trim().is_empty() && !s.contains('\n'),
        Kind::TableName => {
            (3..=255).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        }
        Kind::BucketName => {
            (3..=63).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c))
                && s.starts_with(|c: char| c.is_ascii_alphanumeric())
                && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        }
        Kind::SsmPrefix => {
            s.len() > 1
                && s.starts_with('/')
                && !s.ends_with('/')
                && !s.contains("//")
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
        }
        Kind::SecretName => {
            (1..=512).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_+=.@-".contains(c))
        }
        Kind::BootstrapToken => is_bootstrap_token(s),
        Kind::CertificateKey => s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()),
        Kind::Int { .. }
        | Kind::Bool
        | Kind::Duration { .. }
        | Kind::OneOf(_)
        | Kind::CaCertHashes => false,
    }
}

fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Oldest Kubernetes minor supported: kubeadm's v1beta4 config API arrived in 1.31.
pub const MIN_KUBE_MINOR: u32 = 31;

fn is_kube_version(s: &str) -> bool {
    let v = s.strip_prefix('v').unwrap_or(s);
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts[0] == "1"
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()))
        && parts[1]
            .parse::<u32>()
            .is_ok_and(|minor| minor >= MIN_KUBE_MINOR)
}

/// Splits `host:port`, refusing an empty host or a port outside 1-65535.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c));
    (port > 0 && host_ok).then_some((host, port))
}

/// A `host:port` kubeadm accepts as `controlPlaneEndpoint`: an IP address
/// (IPv6 in brackets) or a DNS-1123 subdomain, compared without case (the
/// agent lowercases it, see [`lowercase_host`]): kubeadm refuses capitals,
/// and a load balancer's generated DNS name may have them.
fn is_endpoint(s: &str) -> bool {
    let Some((host, _)) = split_host_port(s) else {
        return false;
    };
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let host = host.to_ascii_lowercase();
    host.len() <= 253 && host.split('.').all(|label| is_dns_label(label, 63))
}

/// `host:port` with the host in lowercase: DNS is case-insensitive, and
/// kubeadm validates `controlPlaneEndpoint`'s host as a lowercase DNS-1123
/// subdomain (upstream: cmd/kubeadm/app/apis/kubeadm/validation, via
/// `validation.IsDNS1123Subdomain`).
pub fn lowercase_host(s: &str) -> String {
    match s.rsplit_once(':') {
        Some((host, port)) => format!("{}:{port}", host.to_ascii_lowercase()),
        None => s.to_ascii_lowercase(),
    }
}

fn is_cidr(s: &str) -> bool {
    let Some((ip, bits)) = s.split_once('/') else {
        return false;
    };
    ip.parse::<Ipv4Addr>().is_ok() && bits.parse::<u8>().is_ok_and(|b| b <= 32)
}

fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].chars().all(|c| c.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty()
}

fn is_url(s: &str, schemes: &[&str]) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    if !schemes.contains(&scheme) {
        return false;
    }
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            if p.parse::<u16>().is_err() {
                return false;
            }
            h
        }
        _ => authority,
    };
    !host.is_empty() && !s.contains(char::is_whitespace)
}

fn url_has_port(s: &str) -> bool {
    s.split_once("://")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|a| a.rsplit_once(':'))
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok_and(|p| p > 0))
}

fn is_bootstrap_token(s: &str) -> bool {
    let lower_alnum = |p: &str| {
        p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    matches!(s.split_once('.'), Some((id, sec)) if id.len() == 6 && sec.len() == 16 && lower_alnum(id) && lower_alnum(sec))
}

fn is_ca_hash(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Parses `500ms`, `30s`, `5m`, `6h`, `2d` and sums like `1h30m`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let ms_per = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(ms_per)?)?;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_millis(total))
}

/// Formats a duration the way the parser reads it (`1h30m`, `500ms`, `0s`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, per) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ] {
        if ms >= per {
            out.push_str(&format!("{}{unit}", ms / per));
            ms %= per;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use toml::Value;

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    #[test]
    fn durations_parse_and_round_trip() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        for bad in [
            "",
            "30",
            "s",
            "5 m",
            "-5s",
            "1.5h",
            "5mins",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        for d in ["1h30m", "500ms", "6h", "1m1s1ms"] {
            assert_eq!(format_duration(parse_duration(d).unwrap()), d);
        }
    }

    #[test]
    fn duration_bounds_are_out_of_range_not_invalid() {
        let k = Kind::Duration {
            min_ms: 3000,
            max_ms: 600_000,
        };
        assert!(check(k, &s("30s")).is_ok());
        assert!(matches!(
            check(k, &s("2s")),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(
            check(k, &s("11m")),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(check(k, &s("soon")), Err(Refusal::Invalid { .. })));
        assert!(matches!(
            check(k, &Value::Integer(30)),
            Err(Refusal::WrongType { .. })
        ));
    }

    #[test]
    fn integers_and_bools() {
        let k = Kind::Int { min: 1, max: 10 };
        assert!(check(k, &Value::Integer(5)).is_ok());
        assert!(matches!(
            check(k, &Value::Integer(0)),
            Err(Refusal::OutOfRange { .. })
        ));
        assert!(matches!(check(k, &s("5")), Err(Refusal::WrongType { .. })));
        assert!(check(Kind::Bool, &Value::Boolean(true)).is_ok());
        assert!(matches!(
            check(Kind::Bool, &s("yes")),
            Err(Refusal::WrongType { .. })
        ));
    }

    #[test]
    fn string_shapes() {
        let ok = |k, v: &str| check(k, &s(v)).is_ok();
        assert!(ok(Kind::ClusterName, "prod-a"));
        assert!(!ok(Kind::ClusterName, "Prod_A"));
        assert!(!ok(Kind::ClusterName, "-a"));
        assert!(ok(Kind::KubeVersion, "1.31.2"));
        assert!(ok(Kind::KubeVersion, "v1.31.2"));
        assert!(!ok(Kind::KubeVersion, "1.31"));
        assert!(!ok(Kind::KubeVersion, "1.30.5"), "v1beta4 needs 1.31+");
        assert!(ok(Kind::KubeVersion, "1.34.0"));
        assert!(ok(Kind::HostPort, "api.internal:6443"));
        assert!(!ok(Kind::HostPort, "api.internal"));
        assert!(!ok(Kind::HostPort, ":6443"));
        assert!(!ok(Kind::HostPort, "api:0"));
        // kubeadm takes a DNS-1123 name: capitals are lowercased, not refused;
        // an underscore or an empty label is refused.
        assert!(ok(
            Kind::HostPort,
            "Internal-KubeB-ApiLo-1A2B.elb.us-east-1.amazonaws.com:6443"
        ));
        assert!(!ok(Kind::HostPort, "api_server.internal:6443"));
        assert!(!ok(Kind::HostPort, "api..internal:6443"));
        assert!(!ok(Kind::HostPort, "-api.internal:6443"));
        assert!(ok(Kind::HostPort, "10.0.0.10:6443"));
        assert!(ok(Kind::HostPort, "[fd00::1]:6443"));
        assert_eq!(
            lowercase_host("Internal-KubeB-ApiLo.elb.amazonaws.com:6443"),
            "internal-kubeb-apilo.elb.amazonaws.com:6443"
        );
        assert!(ok(Kind::Cidr, "10.244.0.0/16"));
        assert!(!ok(Kind::Cidr, "10.244.0.0/33"));
        assert!(ok(Kind::Region, "eu-west-1"));
        assert!(ok(Kind::Region, "us-gov-west-1"));
        assert!(!ok(Kind::Region, "europe"));
        assert!(ok(Kind::Url, "http://127.0.0.1:5000"));
        assert!(ok(Kind::Url, "https://dynamodb.eu-west-1.amazonaws.com"));
        assert!(!ok(Kind::Url, "127.0.0.1:5000"));
        assert!(!ok(Kind::Url, "http://:5000"));
        assert!(!ok(Kind::Url, "http://host:port"));
        assert!(ok(Kind::SocketUrl, "udp://127.0.0.1:25888"));
        assert!(!ok(Kind::SocketUrl, "tcp://127.0.0.1"));
        assert!(ok(Kind::AbsPath, "/var/lib/kubeboot"));
        assert!(!ok(Kind::AbsPath, "var/lib"));
        assert!(ok(Kind::BucketName, "kubeboot-backups-prod"));
        assert!(!ok(Kind::BucketName, "Kubeboot"));
        assert!(ok(Kind::SsmPrefix, "/kubeboot/prod-a"));
        assert!(!ok(Kind::SsmPrefix, "/kubeboot/"));
        assert!(ok(Kind::BootstrapToken, "abcdef.0123456789abcdef"));
        assert!(!ok(Kind::BootstrapToken, "ABCDEF.0123456789abcdef"));
        assert!(ok(Kind::CertificateKey, &"a1".repeat(32)));
        assert!(!ok(Kind::CertificateKey, "a1"));
        assert!(ok(Kind::OneOf(&["a", "b"]), "b"));
        assert!(!ok(Kind::OneOf(&["a", "b"]), "c"));
    }

    #[test]
    fn ca_hash_lists() {
        let good = Value::Array(vec![s(&format!("sha256:{}", "ab".repeat(32)))]);
        assert!(check(Kind::CaCertHashes, &good).is_ok());
        let bad = Value::Array(vec![s("md5:abc")]);
        assert!(matches!(
            check(Kind::CaCertHashes, &bad),
            Err(Refusal::Invalid { .. })
        ));
        assert!(matches!(
            check(Kind::CaCertHashes, &s("sha256:x")),
            Err(Refusal::WrongType { .. })
        ));
    }
}
