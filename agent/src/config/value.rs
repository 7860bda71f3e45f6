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
        Kind::AwsUrl => "an https:// URL such as \"https://dynamodb.eu-west-1.amazonaws.com\" \
            (http:// only to a loopback host, e.g. \"http://127.0.0.1:5000\" for a local emulator), \
            with a host, an optional port 1-65535 and path, and no user:password@, query or fragment"
            .into(),
        Kind::IssuerUrl => "an https:// URL such as \"https://kubeboot-oidc.s3.eu-west-1.amazonaws.com/prod-a\", \
            with a host, an optional port and path, no trailing /, and no user:password@, query or fragment"
            .into(),
        Kind::ImdsUrl => "an http:// URL (IMDS serves no TLS) such as \"http://169.254.169.254\" \
            or \"http://[fd00:ec2::254]\", with no user:password@, query or fragment"
            .into(),
        Kind::SocketUrl => "\"tcp://host:port\" or \"udp://host:port\" with a port 1-65535".into(),
        Kind::AbsPath => "an absolute path, e.g. \"/var/lib/kubeboot\"".into(),
        Kind::Text => "non-empty text on one line".into(),
        Kind::TableName => "a DynamoDB table name: 3-255 characters [A-Za-z0-9_.-]".into(),
        Kind::BucketName => "an S3 bucket name: 3-63 characters [a-z0-9.-], starting and ending with a letter or digit".into(),
        Kind::SsmPrefix => "an SSM path like \"/kubeboot/prod-a\" (leading /, no trailing /)".into(),
        Kind::SecretName => "a Secrets Manager name: 1-512 characters [A-Za-z0-9/_+=.@-]".into(),
        Kind::StackName => "a CloudFormation stack name: a letter, then up to 127 letters, digits or '-', e.g. \"kubeboot-prod-a\"".into(),
        Kind::LogicalId => "a CloudFormation logical resource id: 1-255 letters and digits, e.g. \"ControlPlaneGroup\"".into(),
        Kind::RoleArn => "an IAM role ARN like \"arn:aws:iam::111122223333:role/prod-a-cluster-autoscaler\"".into(),
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
        Kind::AwsUrl => {
            parse_url(s).is_ok_and(|u| u.scheme == "https" || (u.scheme == "http" && u.loopback()))
        }
        Kind::ImdsUrl => parse_url(s).is_ok_and(|u| u.scheme == "http"),
        Kind::IssuerUrl => parse_url(s).is_ok_and(|u| u.scheme == "https") && !s.ends_with('/'),
        Kind::SocketUrl => parse_url(s).is_ok_and(|u| {
            ["tcp", "udp"].contains(&u.scheme) && u.port.is_some() && u.path.is_empty()
        }),
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
        // CreateStack's StackName pattern [a-zA-Z][-a-zA-Z0-9]*, at most 128.
        Kind::StackName => {
            (1..=128).contains(&s.len())
                && s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        }
        // A template's logical ids are alphanumeric, at most 255 characters.
        Kind::LogicalId => {
            (1..=255).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric())
        }
        Kind::RoleArn => is_role_arn(s),
        Kind::Int { .. } | Kind::Bool | Kind::Duration { .. } | Kind::OneOf(_) => false,
    }
}

/// `arn:<partition>:iam::<account>:role/<path and name>`, as IAM names roles
/// (name and path characters `[\w+=,.@/-]`, at most 64 + 512).
fn is_role_arn(s: &str) -> bool {
    let mut parts = s.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let Some(role) = resource.strip_prefix("role/") else {
        return false;
    };
    partition.starts_with("aws")
        && partition
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '-')
        && account.len() == 12
        && account.chars().all(|c| c.is_ascii_digit())
        && !role.is_empty()
        && !role.ends_with('/')
        && role.len() <= 576
        && role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+=,.@/-".contains(c))
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

/// A URL as the endpoint keys take it, split by [`parse_url`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url<'a> {
    /// Lowercase as written (`HTTPS://` is refused, not folded).
    pub scheme: &'a str,
    /// A DNS name, an IPv4 address or a bracketed IPv6 address.
    pub host: &'a str,
    pub port: Option<u16>,
    /// Everything from the first `/` after the authority; may be empty.
    pub path: &'a str,
}

impl Url<'_> {
    /// Whether the host is this machine: the only place plain http may go.
    pub fn loopback(&self) -> bool {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// Splits `scheme://host[:port][/path]` strictly: one port of 1-65535, a
/// host that is an IP address or a DNS name of valid labels, a path of
/// visible ASCII; no credentials (`user:pw@`), query or fragment. Says what
/// is wrong, for tests and messages.
pub fn parse_url(s: &str) -> Result<Url<'_>, &'static str> {
    let (scheme, rest) = s.split_once("://").ok_or("no scheme:// prefix")?;
    if scheme.is_empty() || !scheme.chars().all(|c| c.is_ascii_lowercase()) {
        return Err("the scheme is not lowercase letters");
    }
    if !s.chars().all(|c| c.is_ascii_graphic()) {
        return Err("spaces, control or non-ASCII characters");
    }
    if rest.contains(['?', '#']) {
        return Err("a query or fragment");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("credentials before the host");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or("an unclosed [")?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| "an invalid IPv6 address")?;
        let host = &authority[..addr.len() + 2];
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or("junk after the ]")?)),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => {
            let n = p
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0 && p.chars().all(|c| c.is_ascii_digit()))
                .ok_or("a port that is not one number from 1 to 65535")?;
            Some(n)
        }
    };
    let host_ok = host.starts_with('[')
        || host.parse::<Ipv4Addr>().is_ok()
        || (host.len() <= 253
            && host
                .to_ascii_lowercase()
                .split('.')
                .all(|label| is_dns_label(label, 63)));
    if host.is_empty() || !host_ok {
        return Err("no valid host (an IP address or DNS name)");
    }
    Ok(Url {
        scheme,
        host,
        port,
        path,
    })
}

/// What is wrong with a URL the key's kind refuses, for the message.
pub fn url_fault(kind: Kind, s: &str) -> Option<String> {
    if !matches!(
        kind,
        Kind::AwsUrl | Kind::ImdsUrl | Kind::SocketUrl | Kind::IssuerUrl
    ) {
        return None;
    }
    let url = match parse_url(s) {
        Ok(url) => url,
        Err(why) => return Some(why.to_string()),
    };
    match (kind, url.scheme) {
        (Kind::AwsUrl, "http") if !url.loopback() => {
            Some("plain http:// to a host that is not this machine".into())
        }
        (Kind::IssuerUrl, "https") if s.ends_with('/') => Some("a trailing /".into()),
        (Kind::AwsUrl, "http" | "https") | (Kind::ImdsUrl, "http") | (Kind::IssuerUrl, "https") => {
            None
        }
        (Kind::SocketUrl, "tcp" | "udp") if url.port.is_none() => Some("no port".into()),
        (Kind::SocketUrl, "tcp" | "udp") if !url.path.is_empty() => Some("a path".into()),
        (Kind::SocketUrl, "tcp" | "udp") => None,
        (_, scheme) => Some(format!("the scheme {scheme}:// is not accepted here")),
    }
}

/// Longest value quoted back in a message: enough to recognise it.
pub const MAX_SHOWN: usize = 80;
/// Deepest nesting shown; deeper arrays and tables print as `[…]`/`{…}`.
pub const MAX_SHOWN_DEPTH: usize = 3;

/// A value as a message may quote it: TOML syntax, at most [`MAX_SHOWN`]
/// characters and [`MAX_SHOWN_DEPTH`] levels, with the full size said when
/// cut. Callers decide whether a value may be shown at all.
pub fn preview(value: &toml::Value) -> String {
    let mut out = String::new();
    render(value, 0, &mut out);
    if out.chars().count() <= MAX_SHOWN {
        return out;
    }
    let cut: String = out.chars().take(MAX_SHOWN).collect();
    match value {
        toml::Value::String(s) => format!("{cut}… ({} characters)", s.chars().count()),
        toml::Value::Array(a) => format!("{cut}… ({} items)", a.len()),
        toml::Value::Table(t) => format!("{cut}… ({} keys)", t.len()),
        _ => format!("{cut}…"),
    }
}

/// Renders into `out`, stopping once it holds more than can be shown.
fn render(value: &toml::Value, depth: usize, out: &mut String) {
    if out.len() > MAX_SHOWN * 4 {
        return;
    }
    match value {
        toml::Value::String(s) => {
            let head: String = s.chars().take(MAX_SHOWN + 1).collect();
            out.push_str(&toml::Value::String(head).to_string());
        }
        toml::Value::Array(items) if depth >= MAX_SHOWN_DEPTH && !items.is_empty() => {
            out.push_str("[…]")
        }
        toml::Value::Table(t) if depth >= MAX_SHOWN_DEPTH && !t.is_empty() => out.push_str("{…}"),
        toml::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if out.len() > MAX_SHOWN * 4 {
                    break;
                }
                if i > 0 {
                    out.push_str(", ");
                }
                render(item, depth + 1, out);
            }
            out.push(']');
        }
        toml::Value::Table(t) => {
            out.push('{');
            for (i, (k, v)) in t.iter().enumerate() {
                if out.len() > MAX_SHOWN * 4 {
                    break;
                }
                out.push_str(if i > 0 { ", " } else { " " });
                let key: String = k.chars().take(MAX_SHOWN).collect();
                out.push_str(&format!("{key} = "));
                render(v, depth + 1, out);
            }
            out.push_str(" }");
        }
        other => out.push_str(&other.to_string()),
    }
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
        assert!(ok(Kind::StackName, "kubeboot-Prod-a1"));
        assert!(ok(Kind::StackName, &format!("a{}", "-".repeat(127))));
        assert!(
            !ok(Kind::StackName, &format!("a{}", "b".repeat(128))),
            "129 characters"
        );
        assert!(!ok(Kind::StackName, "1stack"), "starts with a letter");
        assert!(!ok(Kind::StackName, "prod_a"));
        assert!(
            !ok(
                Kind::StackName,
                "arn:aws:cloudformation:us-east-1:1:stack/a/b"
            ),
            "a name, not an ARN"
        );
        assert!(!ok(Kind::StackName, ""));
        assert!(ok(Kind::LogicalId, "ControlPlaneGroup"));
        assert!(ok(Kind::LogicalId, "0Group"));
        assert!(ok(Kind::LogicalId, &"A".repeat(255)));
        assert!(!ok(Kind::LogicalId, &"A".repeat(256)));
        assert!(!ok(Kind::LogicalId, "Control-Plane"));
        assert!(!ok(Kind::LogicalId, ""));
        assert!(ok(
            Kind::RoleArn,
            "arn:aws:iam::111122223333:role/prod-a-ca"
        ));
        assert!(ok(
            Kind::RoleArn,
            "arn:aws-cn:iam::111122223333:role/path/x.y@z"
        ));
        assert!(
            !ok(Kind::RoleArn, "arn:aws:iam::11112222333:role/a"),
            "11 digits"
        );
        assert!(
            !ok(Kind::RoleArn, "arn:aws:iam::111122223333:user/a"),
            "a user"
        );
        assert!(
            !ok(Kind::RoleArn, "arn:aws:iam::111122223333:role/"),
            "no name"
        );
        assert!(!ok(Kind::RoleArn, "arn:aws:sts::111122223333:role/a"));
        assert!(!ok(Kind::RoleArn, "prod-a-ca"), "a name, not an ARN");
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
        assert!(ok(Kind::AwsUrl, "http://127.0.0.1:5000"));
        assert!(ok(Kind::AwsUrl, "https://dynamodb.eu-west-1.amazonaws.com"));
        assert!(!ok(Kind::AwsUrl, "127.0.0.1:5000"));
        assert!(!ok(Kind::AwsUrl, "http://:5000"));
        assert!(!ok(Kind::AwsUrl, "http://host:port"));
        assert!(ok(Kind::SocketUrl, "udp://127.0.0.1:25888"));
        assert!(!ok(Kind::SocketUrl, "tcp://127.0.0.1"));
        assert!(ok(Kind::AbsPath, "/var/lib/kubeboot"));
        assert!(!ok(Kind::AbsPath, "var/lib"));
        assert!(ok(Kind::BucketName, "kubeboot-backups-prod"));
        assert!(!ok(Kind::BucketName, "Kubeboot"));
        assert!(ok(Kind::SsmPrefix, "/kubeboot/prod-a"));
        assert!(!ok(Kind::SsmPrefix, "/kubeboot/"));
        assert!(ok(Kind::OneOf(&["a", "b"]), "b"));
        assert!(!ok(Kind::OneOf(&["a", "b"]), "c"));
    }

    #[test]
    fn endpoint_urls_are_parsed_strictly_with_the_scheme_each_key_allows() {
        let ok = |k, v: &str| check(k, &s(v)).is_ok();
        for good in [
            "https://dynamodb.eu-west-1.amazonaws.com",
            "https://vpce-0a1b.sts.eu-west-1.vpce.amazonaws.com:443/",
            "https://sqs.eu-west-1.amazonaws.com/123456789012/kubeboot-life",
            "http://127.0.0.1:5000",
            "http://127.3.4.5:5000/path",
            "http://localhost:4566",
            "http://[::1]:5000",
            "https://[fd00::1]:8443",
            "https://10.0.0.5",
        ] {
            assert!(ok(Kind::AwsUrl, good), "{good}");
        }
        for bad in [
            "https://dynamodb.eu-west-1.amazonaws.com:443:443",
            "ftp://s3.eu-west-1.amazonaws.com",
            "HTTPS://s3.amazonaws.com",
            "https://sts..amazonaws.com",
            "https://-sts.amazonaws.com",
            "https://admin:pw@ssm.internal",
            "http://secretsmanager.eu-west-1.amazonaws.com",
            "http://10.0.0.5:5000",
            "sqs.eu-west-1.amazonaws.com/123/q",
            "https://host:0",
            "https://host:65536",
            "https://host:+443",
            "https://host:",
            "https://host/a b",
            "https://host/?x=1",
            "https://host#top",
            "https://[::1",
            "https://[zz::1]:443",
            "https://",
            "https://hôst.example",
        ] {
            assert!(!ok(Kind::AwsUrl, bad), "{bad}");
        }
        assert!(ok(Kind::ImdsUrl, "http://169.254.169.254"));
        assert!(ok(Kind::ImdsUrl, "http://[fd00:ec2::254]"));
        assert!(!ok(Kind::ImdsUrl, "https://169.254.169.254"));
        assert!(!ok(Kind::ImdsUrl, "http://169.254.169.254:80:80"));
        assert!(ok(Kind::SocketUrl, "tcp://127.0.0.1:25888"));
        assert!(!ok(Kind::SocketUrl, "tcp://127.0.0.1:99999"));
        assert!(!ok(Kind::SocketUrl, "udp://127.0.0.1:25888/x"));
        assert!(!ok(Kind::SocketUrl, "http://127.0.0.1:25888"));
        assert_eq!(
            url_fault(Kind::AwsUrl, "http://10.0.0.5:5000").as_deref(),
            Some("plain http:// to a host that is not this machine")
        );
        assert_eq!(
            url_fault(Kind::AwsUrl, "https://h:443:443").as_deref(),
            Some("a port that is not one number from 1 to 65535")
        );
        assert_eq!(url_fault(Kind::Text, "no url"), None);
    }

    #[test]
    fn previews_are_short_shallow_and_say_how_much_was_cut() {
        assert_eq!(preview(&s("debug")), "\"debug\"");
        let long = preview(&s(&"v".repeat(500_000)));
        assert!(long.chars().count() < MAX_SHOWN + 40, "{long}");
        assert!(long.ends_with("(500000 characters)"), "{long}");
        let wide = Value::Array((0..60_000).map(Value::Integer).collect());
        let shown = preview(&wide);
        assert!(shown.ends_with("(60000 items)"), "{shown}");
        let mut deep = Value::Integer(1);
        for _ in 0..1_000 {
            deep = Value::Array(vec![deep]);
        }
        assert_eq!(preview(&deep), "[[[[…]]]]");
    }
}
