//! Generation of the join secrets (bootstrap token, certificate key) from
//! the OS's randomness, their shapes, and the CA public-key pin.

use super::{Error, CERTIFICATE_KEY_BYTES, TOKEN_ALPHABET};
use crate::secret::Secret;
use sha2::{Digest, Sha256};
use x509_cert::der::{DecodePem, Encode};
use x509_cert::Certificate;

/// Fills `buf` from the operating system's CSPRNG.
///
/// # Panics
/// If the OS has no working random source. On Linux `getrandom(2)` blocks
/// until the pool is seeded and does not fail otherwise; if it ever did, no
/// fallback is acceptable: a guessable token lets anyone join the cluster.
fn os_random(buf: &mut [u8]) {
    if let Err(e) = getrandom::fill(buf) {
        panic!("the operating system's random number generator failed ({e}); refusing to generate a guessable secret");
    }
}

/// `n` characters drawn uniformly from `alphabet` by rejection sampling: a
/// byte is used only below the largest multiple of the alphabet's size, so
/// no character is more likely than another (kubeadm draws uniformly too).
fn sample(alphabet: &[u8], n: usize, fill: &mut dyn FnMut(&mut [u8])) -> String {
    let size = alphabet.len();
    let limit = 256 - 256 % size;
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        fill(&mut buf);
        for &b in &buf {
            if usize::from(b) < limit && out.len() < n {
                out.push(char::from(alphabet[usize::from(b) % size]));
            }
        }
    }
    out
}

/// A fresh kubeadm bootstrap token, `[a-z0-9]{6}.[a-z0-9]{16}` (token id and
/// secret). Generated here, not by kubeadm, so it can be published before and
/// independently of `kubeadm init`'s output.
pub fn generate_token() -> Secret<String> {
    let id = sample(TOKEN_ALPHABET, 6, &mut os_random);
    let secret = sample(TOKEN_ALPHABET, 16, &mut os_random);
    Secret::new(format!("{id}.{secret}"))
}

/// A fresh `--certificate-key`: 32 random bytes in lowercase hex, the AES key
/// kubeadm encrypts the uploaded control-plane certificates with.
pub fn generate_certificate_key() -> Secret<String> {
    let mut key = [0u8; CERTIFICATE_KEY_BYTES];
    os_random(&mut key);
    Secret::new(hex(&key))
}

/// Whether `s` has the shape of a bootstrap token.
pub fn is_token(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: &u8| TOKEN_ALPHABET.contains(c);
    b.len() == 23 && b[..6].iter().all(ok) && b[6] == b'.' && b[7..].iter().all(ok)
}

/// Whether `s` has the shape of a certificate key (64 lowercase hex digits).
pub fn is_certificate_key(s: &str) -> bool {
    s.len() == 2 * CERTIFICATE_KEY_BYTES && is_lower_hex(s)
}

/// Largest secret body read: real material is about 400 bytes (Secrets
/// Manager allows 64 KiB); anything bigger is refused before parsing.
pub const MAX_BODY_BYTES: usize = 8 * 1024;
/// More CA pins than any CA rotation needs.
pub const MAX_CA_PINS: usize = 16;

/// Whether `s` is an API server endpoint `host:port` (DNS name or IP
/// literal, port 1-65535): nothing else may reach kubeadm's configuration.
pub fn is_endpoint(s: &str) -> bool {
    s.len() <= 261 && crate::config::value::split_host_port(s).is_some()
}

/// Whether `s` has the shape of a CA pin, `sha256:` and 64 lowercase hex digits.
pub fn is_ca_cert_hash(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && is_lower_hex(h))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The `--discovery-token-ca-cert-hash` pin of the first certificate in
/// `pem`: `sha256:` and the hex SHA-256 of its DER SubjectPublicKeyInfo, as
/// kubeadm computes it (and as `openssl x509 -pubkey -noout | openssl pkey
/// -pubin -outform der | sha256sum` does). Joining nodes use it to trust the
/// API server before they have any credentials.
pub fn ca_cert_hash(pem: &[u8]) -> Result<String, Error> {
    let block = first_certificate_block(pem).ok_or_else(|| Error::CaCert {
        reason: "no `-----BEGIN CERTIFICATE-----` block found".into(),
    })?;
    // der's errors name a kind and a byte position, never the input.
    let cert = Certificate::from_pem(block).map_err(|e| Error::CaCert {
        reason: format!("the first certificate does not parse: {e}"),
    })?;
    let spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| Error::CaCert {
            reason: format!("cannot encode its public key: {e}"),
        })?;
    Ok(format!("sha256:{}", hex(&Sha256::digest(&spki))))
}

/// The first `CERTIFICATE` PEM block of `pem` (a CA bundle may hold several,
/// a combined file may start with a key), markers included.
fn first_certificate_block(pem: &[u8]) -> Option<&[u8]> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let start = find(pem, BEGIN)?;
    let end = start + find(&pem[start..], END)? + END.len();
    Some(&pem[start..end])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_kubeadms_shape_and_do_not_repeat() {
        let tokens: Vec<String> = (0..1000)
            .map(|_| generate_token().expose().clone())
            .collect();
        for t in &tokens {
            assert!(is_token(t), "{t}");
            let (id, secret) = t.split_once('.').expect("a dot");
            assert_eq!((id.len(), secret.len()), (6, 16));
            assert!(t
                .chars()
                .all(|c| c == '.' || c.is_ascii_lowercase() || c.is_ascii_digit()));
        }
        let distinct: std::collections::HashSet<&String> = tokens.iter().collect();
        assert_eq!(distinct.len(), tokens.len());
        assert!(!is_token("ABCDEF.0123456789abcdef"));
        assert!(!is_token("abcdef-0123456789abcdef"));
        assert!(!is_token("abcdef.0123456789abcde"));
    }

    #[test]
    fn sampling_rejects_bytes_that_would_bias_the_alphabet() {
        // 252..=255 would map to '0'..'3' a second time: they must be skipped.
        let mut bytes = vec![255u8, 252, 0, 35, 251, 36];
        bytes.resize(64, 253);
        let mut fill = |buf: &mut [u8]| buf.copy_from_slice(&bytes);
        assert_eq!(sample(TOKEN_ALPHABET, 4, &mut fill), "0zz0");
        let mut counts = [0usize; 36];
        let all = (0..=255u8).collect::<Vec<_>>();
        let mut n = 0;
        let mut fill_all = |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                *b = all[n % 256];
                n += 1;
            }
        };
        for c in sample(TOKEN_ALPHABET, 36 * 7 * 4, &mut fill_all).bytes() {
            counts[TOKEN_ALPHABET
                .iter()
                .position(|&a| a == c)
                .expect("in alphabet")] += 1;
        }
        assert!(counts.iter().all(|&c| c == 28), "{counts:?}");
    }

    #[test]
    fn certificate_keys_are_64_lowercase_hex_digits() {
        let a = generate_certificate_key();
        let b = generate_certificate_key();
        assert!(is_certificate_key(a.expose()), "{}", a.expose());
        assert_eq!(a.expose().len(), 64);
        assert_ne!(a, b);
        assert!(!is_certificate_key(&"0F".repeat(32)));
        assert_eq!(hex(&[0x00, 0x7f, 0xab, 0xff]), "007fabff");
    }
}
