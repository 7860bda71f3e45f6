//! Finds kubeboot's TOML in EC2 user-data.
//!
//! User-data is shared with other tools: a launch template usually sends a
//! MIME multipart document (cloud-init style) with a shell script that starts
//! kubeboot and a part of our own content type holding TOML, the way nodeadm
//! carries its NodeConfig. A plain TOML body is accepted too. Either may be
//! gzip-compressed or base64-encoded (once more than EC2 already decodes).
//! Everything here is pure over bytes so every shape is unit-tested.

use base64::Engine;
use std::io::Read;

/// Content type of kubeboot's part in a multipart user-data document.
pub const CONTENT_TYPE: &str = "application/kubeboot+toml";

/// EC2 limits user-data to 16 KiB; a document (raw or decompressed) far
/// beyond that is refused whole, never cut to fit.
pub const MAX_DECODED: u64 = super::input::MAX_BYTES;

/// The TOML text found in user-data and where in the document it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub text: String,
    /// `MIME part application/kubeboot+toml` or `plain body`, for provenance.
    pub origin: &'static str,
}

/// User-data that looks meant for kubeboot but cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserDataError {
    #[error("user-data is a MIME document that cannot be parsed: {0}")]
    Mime(String),
    #[error("user-data holds {0} parts of type {CONTENT_TYPE}; exactly one is allowed")]
    MultipleParts(usize),
    #[error("kubeboot's user-data is not UTF-8 text")]
    NotUtf8,
    #[error("user-data looks gzip-compressed but does not decompress: {0}")]
    Gzip(String),
    #[error("user-data is larger than {} (raw or decompressed)", super::input::size(*limit))]
    TooLarge { limit: u64 },
}

/// Extracts kubeboot's TOML from raw user-data; `Ok(None)` when there is none.
pub fn extract(raw: &[u8]) -> Result<Option<Found>, UserDataError> {
    if raw.len() as u64 > MAX_DECODED {
        return Err(UserDataError::TooLarge { limit: MAX_DECODED });
    }
    let bytes = unwrap_encodings(raw)?;
    let trimmed = trim_start(&bytes);
    if trimmed.is_empty() {
        return Ok(None);
    }
    if looks_like_mime(trimmed) {
        return from_mime(trimmed);
    }
    if is_other_tools_format(trimmed) {
        return Ok(None);
    }
    let text = String::from_utf8(bytes).map_err(|_| UserDataError::NotUtf8)?;
    Ok(Some(Found {
        text,
        origin: "plain body",
    }))
}

fn from_mime(doc: &[u8]) -> Result<Option<Found>, UserDataError> {
    let mail = mailparse::parse_mail(doc).map_err(|e| UserDataError::Mime(e.to_string()))?;
    let mut ours = Vec::new();
    collect_parts(&mail, &mut ours);
    match ours.len() {
        0 => Ok(None),
        1 => {
            let body = ours[0]
                .get_body_raw()
                .map_err(|e| UserDataError::Mime(e.to_string()))?;
            let body = unwrap_encodings(&body)?;
            let text = String::from_utf8(body).map_err(|_| UserDataError::NotUtf8)?;
            Ok(Some(Found {
                text,
                origin: "MIME part application/kubeboot+toml",
            }))
        }
        n => Err(UserDataError::MultipleParts(n)),
    }
}

fn collect_parts<'a>(
    mail: &'a mailparse::ParsedMail<'a>,
    out: &mut Vec<&'a mailparse::ParsedMail<'a>>,
) {
    if mail.ctype.mimetype.eq_ignore_ascii_case(CONTENT_TYPE) {
        out.push(mail);
    }
    for part in &mail.subparts {
        collect_parts(part, out);
    }
}

/// Peels gzip and base64 layers (at most a few, so a crafted input cannot loop).
fn unwrap_encodings(raw: &[u8]) -> Result<Vec<u8>, UserDataError> {
    let mut bytes = raw.to_vec();
    for _ in 0..4 {
        if bytes.starts_with(&[0x1f, 0x8b]) {
            bytes = gunzip(&bytes)?;
        } else if let Some(decoded) = base64_layer(&bytes) {
            bytes = decoded;
        } else {
            break;
        }
    }
    Ok(bytes)
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, UserDataError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_DECODED + 1)
        .read_to_end(&mut out)
        .map_err(|e| UserDataError::Gzip(e.to_string()))?;
    if out.len() as u64 > MAX_DECODED {
        return Err(UserDataError::TooLarge { limit: MAX_DECODED });
    }
    Ok(out)
}

/// Decodes `bytes` if the whole body is base64 and decodes to gzip or text.
fn base64_layer(bytes: &[u8]) -> Option<Vec<u8>> {
    let compact: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if compact.len() < 8
        || !compact.len().is_multiple_of(4)
        || !compact
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/' || *b == b'=')
    {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .ok()?;
    let useful = decoded.starts_with(&[0x1f, 0x8b]) || std::str::from_utf8(&decoded).is_ok();
    useful.then_some(decoded)
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    &bytes[start..]
}

fn looks_like_mime(doc: &[u8]) -> bool {
    let head = String::from_utf8_lossy(&doc[..doc.len().min(64)]).to_ascii_lowercase();
    head.starts_with("content-type:") || head.starts_with("mime-version:")
}

/// Scripts, cloud-config and cloud-init directives belong to other tools.
fn is_other_tools_format(doc: &[u8]) -> bool {
    [
        &b"#!"[..],
        b"#cloud-",
        b"#include",
        b"#part-handler",
        b"#upstart-job",
    ]
    .iter()
    .any(|p| doc.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const TOML: &str = "[cluster]\nname = \"prod-a\"\n";

    fn multipart(parts: &[(&str, &str, Option<&str>)]) -> String {
        let mut s = String::from(
            "Content-Type: multipart/mixed; boundary=\"==BOUNDARY==\"\nMIME-Version: 1.0\n\n",
        );
        for (ctype, body, encoding) in parts {
            s.push_str(&format!("--==BOUNDARY==\nContent-Type: {ctype}\n"));
            if let Some(enc) = encoding {
                s.push_str(&format!("Content-Transfer-Encoding: {enc}\n"));
            }
            s.push_str(&format!("\n{body}\n"));
        }
        s.push_str("--==BOUNDARY==--\n");
        s
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn multipart_with_our_part_and_a_script() {
        let doc = multipart(&[
            (
                "text/x-shellscript; charset=\"us-ascii\"",
                "#!/bin/bash\nsystemctl start kubeboot",
                None,
            ),
            (CONTENT_TYPE, TOML, None),
        ]);
        let found = extract(doc.as_bytes()).unwrap().unwrap();
        assert_eq!(found.text.trim(), TOML.trim());
        assert_eq!(found.origin, "MIME part application/kubeboot+toml");
    }

    #[test]
    fn multipart_without_our_part_is_none() {
        let doc = multipart(&[("text/x-shellscript", "#!/bin/bash\necho hi", None)]);
        assert_eq!(extract(doc.as_bytes()).unwrap(), None);
    }

    #[test]
    fn base64_transfer_encoded_part() {
        let doc = multipart(&[(CONTENT_TYPE, &b64(TOML.as_bytes()), Some("base64"))]);
        assert_eq!(extract(doc.as_bytes()).unwrap().unwrap().text, TOML);
    }

    #[test]
    fn two_of_our_parts_conflict() {
        let doc = multipart(&[(CONTENT_TYPE, TOML, None), (CONTENT_TYPE, TOML, None)]);
        assert_eq!(
            extract(doc.as_bytes()),
            Err(UserDataError::MultipleParts(2))
        );
    }

    #[test]
    fn plain_toml_body() {
        let found = extract(TOML.as_bytes()).unwrap().unwrap();
        assert_eq!(found.text, TOML);
        assert_eq!(found.origin, "plain body");
    }

    #[test]
    fn scripts_and_cloud_config_are_not_ours() {
        assert_eq!(extract(b"#!/bin/bash\necho hi\n").unwrap(), None);
        assert_eq!(extract(b"#cloud-config\npackages: [jq]\n").unwrap(), None);
        assert_eq!(extract(b"   \n").unwrap(), None);
    }

    #[test]
    fn gzip_plain_and_gzip_multipart() {
        assert_eq!(extract(&gzip(TOML.as_bytes())).unwrap().unwrap().text, TOML);
        let doc = multipart(&[(CONTENT_TYPE, TOML, None)]);
        assert_eq!(
            extract(&gzip(doc.as_bytes())).unwrap().unwrap().text.trim(),
            TOML.trim()
        );
    }

    #[test]
    fn base64_of_gzip_of_plain_body() {
        let wrapped = b64(&gzip(TOML.as_bytes()));
        assert_eq!(extract(wrapped.as_bytes()).unwrap().unwrap().text, TOML);
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let mut bad = gzip(TOML.as_bytes());
        bad.truncate(12);
        assert!(matches!(extract(&bad), Err(UserDataError::Gzip(_))));
    }

    #[test]
    fn user_data_decompressing_past_the_limit_is_refused_not_truncated() {
        let mut doc = TOML.to_string();
        doc.push_str(&format!("#{}\n", "z".repeat(MAX_DECODED as usize)));
        let bomb = gzip(doc.as_bytes());
        assert!(bomb.len() < 16 * 1024, "fits EC2's limit: {}", bomb.len());
        assert_eq!(
            extract(&bomb),
            Err(UserDataError::TooLarge { limit: MAX_DECODED })
        );
        let multipart_bomb = gzip(multipart(&[(CONTENT_TYPE, &doc, None)]).as_bytes());
        assert_eq!(
            extract(&multipart_bomb),
            Err(UserDataError::TooLarge { limit: MAX_DECODED })
        );
        let exactly = "#".repeat(MAX_DECODED as usize);
        assert!(extract(&gzip(exactly.as_bytes())).is_ok());
    }

    #[test]
    fn binary_plain_body_is_an_error() {
        assert_eq!(
            extract(&[b'a', 0xff, 0xfe, b'=']),
            Err(UserDataError::NotUtf8)
        );
    }
}
