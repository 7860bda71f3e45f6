//! The invocation log (`KBTEST_KUBEADM_LOG`), tokens redacted.

use kubeboot_tests::standin;
use std::io::Write as _;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

pub(crate) fn looks_like_token(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.len() == 23 && b[6] == b'.' && b[..6].iter().all(ok) && b[7..].iter().all(ok)
}

/// Appends `<unix ms> <pid> <argv> exit=<code>` to `$KBTEST_KUBEADM_LOG`,
/// with tokens and certificate keys replaced by `<redacted>`.
pub(crate) fn log_invocation(args: &[String], code: u8) {
    let Some(path) = std::env::var_os(standin::LOG_ENV) else {
        return;
    };
    let mut words = Vec::new();
    let mut secret_next = false;
    for a in args {
        let w = if secret_next {
            "<redacted>".to_string()
        } else if let Some((flag, _)) = a
            .split_once('=')
            .filter(|(f, _)| matches!(*f, "--certificate-key" | "--token" | "--discovery-token"))
        {
            format!("{flag}=<redacted>")
        } else if looks_like_token(a) {
            "<redacted>".into()
        } else {
            a.replace(' ', "%20")
        };
        secret_next = matches!(
            a.as_str(),
            "--certificate-key" | "--token" | "--discovery-token"
        );
        words.push(w);
    }
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let line = format!(
        "{ms} {} {} exit={code}\n",
        std::process::id(),
        words.join(" ")
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}
