//! The cluster's service-account issuer as a public OIDC provider (IAM
//! roles for service accounts): the discovery document and the JWKS built
//! from the service-account public keys exactly as kube-apiserver builds
//! them (kubernetes/kubernetes pkg/serviceaccount/openidmetadata.go and
//! jwt.go), so that a token the API server signs verifies, by `kid`,
//! against what is published. Pure: reading `sa.pub` and writing to S3 are
//! the callers'.

use serde::Serialize;
use sha2::Digest as _;
use x509_cert::der::{Decode as _, DecodePem as _, Encode as _, Reader as _};
use x509_cert::spki::SubjectPublicKeyInfoOwned;

/// rsaEncryption.
const RSA: &str = "1.2.840.113549.1.1.1";
/// id-ecPublicKey.
const EC: &str = "1.2.840.10045.2.1";
/// The curves the API server signs with, as (OID, JWK `crv`, `alg`, coordinate size).
const CURVES: &[(&str, &str, &str, usize)] = &[
    ("1.2.840.10045.3.1.7", "P-256", "ES256", 32),
    ("1.3.132.0.34", "P-384", "ES384", 48),
    ("1.3.132.0.35", "P-521", "ES512", 66),
];

/// The documents under an issuer: where each goes below the issuer's URL.
pub const DISCOVERY_PATH: &str = ".well-known/openid-configuration";
/// The JWKS, below the issuer's URL (`--service-account-jwks-uri`).
pub const JWKS_PATH: &str = "keys.json";

/// A service-account key the documents cannot describe.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no PEM \"PUBLIC KEY\" block (kubeadm's sa.pub is one)")]
    NoKey,
    #[error("public key {index}: not a PEM SubjectPublicKeyInfo: {reason}")]
    Pem { index: usize, reason: String },
    #[error("public key {index}: algorithm {oid} is neither RSA nor EC (the API server signs with RSA or ECDSA P-256/384/521)")]
    Algorithm { index: usize, oid: String },
    #[error("public key {index}: {reason}")]
    Malformed { index: usize, reason: String },
}

/// One public key as a JWK, fields in go-jose's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Jwk {
    #[serde(rename = "use")]
    pub use_: &'static str,
    pub kty: &'static str,
    pub kid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<&'static str>,
    pub alg: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
}

#[derive(Serialize)]
struct KeySet<'a> {
    keys: &'a [Jwk],
}

#[derive(Serialize)]
struct Discovery<'a> {
    issuer: &'a str,
    jwks_uri: &'a str,
    response_types_supported: [&'static str; 1],
    subject_types_supported: [&'static str; 1],
    id_token_signing_alg_values_supported: Vec<&'static str>,
}

/// The two documents an issuer publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Documents {
    /// `<issuer>/.well-known/openid-configuration`.
    pub discovery: String,
    /// `<issuer>/keys.json`.
    pub jwks: String,
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The API server's `kid`: base64url (no padding) of the SHA-256 of the
/// key's PKIX (SubjectPublicKeyInfo) DER.
pub fn key_id(spki_der: &[u8]) -> String {
    b64(&sha2::Sha256::digest(spki_der))
}

/// Every `PUBLIC KEY` block of `pem` (kubeadm's `sa.pub`, or a file with
/// the old key beside the new during a rotation), in order, as JWKs.
pub fn jwks_of(pem: &str) -> Result<Vec<Jwk>, Error> {
    const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let mut keys = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let index = keys.len();
        let end = rest[start..].find(END).ok_or_else(|| Error::Pem {
            index,
            reason: "no END line".into(),
        })? + start
            + END.len();
        keys.push(jwk(index, &rest[start..end])?);
        rest = &rest[end..];
    }
    if keys.is_empty() {
        return Err(Error::NoKey);
    }
    Ok(keys)
}

fn jwk(index: usize, block: &str) -> Result<Jwk, Error> {
    let malformed = |reason: String| Error::Malformed { index, reason };
    let spki = SubjectPublicKeyInfoOwned::from_pem(block).map_err(|e| Error::Pem {
        index,
        reason: e.to_string(),
    })?;
    let der = spki.to_der().map_err(|e| malformed(e.to_string()))?;
    let kid = key_id(&der);
    let bits = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| malformed("the key's bit string is not whole bytes".into()))?;
    let oid = spki.algorithm.oid.to_string();
    match oid.as_str() {
        RSA => {
            let (n, e) = rsa_components(bits).map_err(|e| malformed(format!("RSA key: {e}")))?;
            Ok(Jwk {
                use_: "sig",
                kty: "RSA",
                kid,
                crv: None,
                alg: "RS256",
                n: Some(b64(&n)),
                e: Some(b64(&e)),
                x: None,
                y: None,
            })
        }
        EC => {
            let curve_oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<x509_cert::der::asn1::ObjectIdentifier>().ok())
                .map(|o| o.to_string())
                .ok_or_else(|| malformed("EC key without a named curve".into()))?;
            let (_, crv, alg, size) = CURVES
                .iter()
                .find(|(o, ..)| *o == curve_oid)
                .ok_or_else(|| malformed(format!("EC curve {curve_oid}: the API server signs with P-256, P-384 or P-521 only")))?;
            if bits.len() != 1 + 2 * size || bits[0] != 0x04 {
                return Err(malformed(format!(
                    "EC point of {} bytes: expected an uncompressed point of {} bytes",
                    bits.len(),
                    1 + 2 * size
                )));
            }
            Ok(Jwk {
                use_: "sig",
                kty: "EC",
                kid,
                crv: Some(crv),
                alg,
                n: None,
                e: None,
                x: Some(b64(&bits[1..1 + size])),
                y: Some(b64(&bits[1 + size..])),
            })
        }
        _ => Err(Error::Algorithm { index, oid }),
    }
}

/// `RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }`
/// as big-endian bytes without leading zeros (what go-jose encodes).
fn rsa_components(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    use x509_cert::der::asn1::UintRef;
    let mut reader = x509_cert::der::SliceReader::new(der).map_err(|e| e.to_string())?;
    let (n, e) = reader
        .sequence(|r| {
            let n = UintRef::decode(r)?;
            let e = UintRef::decode(r)?;
            Ok((n.as_bytes().to_vec(), e.as_bytes().to_vec()))
        })
        .map_err(|e: x509_cert::der::Error| e.to_string())?;
    reader.finish().map_err(|e| e.to_string())?;
    if n.is_empty() || e.is_empty() {
        return Err("empty modulus or exponent".into());
    }
    Ok((n, e))
}

/// The JWKS document for `keys` (`{"keys":[…]}`).
pub fn jwks_document(keys: &[Jwk]) -> String {
    serde_json::to_string(&KeySet { keys }).unwrap_or_default()
}

/// The discovery document: the issuer, where its keys are, and the
/// algorithms they sign with (sorted, once each).
pub fn discovery_document(issuer: &str, jwks_uri: &str, keys: &[Jwk]) -> String {
    let mut algs: Vec<&'static str> = keys.iter().map(|k| k.alg).collect();
    algs.sort_unstable();
    algs.dedup();
    serde_json::to_string(&Discovery {
        issuer,
        jwks_uri,
        response_types_supported: ["id_token"],
        subject_types_supported: ["public"],
        id_token_signing_alg_values_supported: algs,
    })
    .unwrap_or_default()
}

/// `issuer` without a trailing `/`, then `/keys.json`.
pub fn jwks_uri(issuer: &str) -> String {
    format!("{}/{JWKS_PATH}", issuer.trim_end_matches('/'))
}

/// Both documents for `issuer` from the public keys in `pem`.
pub fn documents(issuer: &str, pem: &str) -> Result<Documents, Error> {
    let keys = jwks_of(pem)?;
    let issuer = issuer.trim_end_matches('/');
    Ok(Documents {
        discovery: discovery_document(issuer, &jwks_uri(issuer), &keys),
        jwks: jwks_document(&keys),
    })
}

/// The object keys of the two documents in the bucket that serves
/// `issuer`: its URL path, then the document's path below it.
pub fn object_keys(issuer: &str) -> (String, String) {
    let path = issuer
        .split_once("://")
        .map_or(issuer, |(_, rest)| rest)
        .split_once('/')
        .map_or("", |(_, path)| path)
        .trim_matches('/');
    let below = |doc: &str| {
        if path.is_empty() {
            doc.to_string()
        } else {
            format!("{path}/{doc}")
        }
    };
    (below(DISCOVERY_PATH), below(JWKS_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;

    // kubernetes/kubernetes pkg/serviceaccount/jwt_test.go (0ea83df1) and
    // openidmetadata_test.go (aee2394c): the API server's own test keys and
    // the documents it serves for them.
    const RSA_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA249XwEo9k4tM8fMxV7zx\n\
OhcrP+WvXn917koM5Qr2ZXs4vo26e4ytdlrV0bQ9SlcLpQVSYjIxNfhTZdDt+ecI\n\
zshKuv1gKIxbbLQMOuK1eA/4HALyEkFgmS/tleLJrhc65tKPMGD+pKQ/xhmzRuCG\n\
51RoiMgbQxaCyYxGfNLpLAZK9L0Tctv9a0mJmGIYnIOQM4kC1A1I1n3EsXMWmeJU\n\
j7OTh/AjjCnMnkgvKT2tpKxYQ59PgDgU8Ssc7RDSmSkLxnrv+OrN80j6xrw0OjEi\n\
B4Ycr0PqfzZcvy8efTtFQ/Jnc4Bp1zUtFXt7+QeevePtQ2EcyELXE0i63T1CujRM\n\
WwIDAQAB\n\
-----END PUBLIC KEY-----";
    const RSA_KEY_ID: &str = "JHJehTTTZlsspKHT-GaJxK7Kd1NQgZJu3fyK6K_QDYU";
    const ECDSA_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----\n\
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEH6cuzP8XuD5wal6wf9M6xDljTOPL\n\
X2i8uIp/C/ASqiIGUeeKQtX0/IR3qCXyThP/dbCiHrF3v1cuhBOHY8CLVg==\n\
-----END PUBLIC KEY-----";
    const ECDSA_KEY_ID: &str = "SoABiieYuNx4UdqYvZRVeuC6SihxgLrhLy9peHMHpTc";
    const JWKS: &str = r#"{"keys":[{"use":"sig","kty":"RSA","kid":"JHJehTTTZlsspKHT-GaJxK7Kd1NQgZJu3fyK6K_QDYU","alg":"RS256","n":"249XwEo9k4tM8fMxV7zxOhcrP-WvXn917koM5Qr2ZXs4vo26e4ytdlrV0bQ9SlcLpQVSYjIxNfhTZdDt-ecIzshKuv1gKIxbbLQMOuK1eA_4HALyEkFgmS_tleLJrhc65tKPMGD-pKQ_xhmzRuCG51RoiMgbQxaCyYxGfNLpLAZK9L0Tctv9a0mJmGIYnIOQM4kC1A1I1n3EsXMWmeJUj7OTh_AjjCnMnkgvKT2tpKxYQ59PgDgU8Ssc7RDSmSkLxnrv-OrN80j6xrw0OjEiB4Ycr0PqfzZcvy8efTtFQ_Jnc4Bp1zUtFXt7-QeevePtQ2EcyELXE0i63T1CujRMWw","e":"AQAB"},{"use":"sig","kty":"EC","kid":"SoABiieYuNx4UdqYvZRVeuC6SihxgLrhLy9peHMHpTc","crv":"P-256","alg":"ES256","x":"H6cuzP8XuD5wal6wf9M6xDljTOPLX2i8uIp_C_ASqiI","y":"BlHnikLV9PyEd6gl8k4T_3Wwoh6xd79XLoQTh2PAi1Y"}]}"#;
    const DISCOVERY: &str = r#"{"issuer":"https://issuer.example.com","jwks_uri":"https://issuer.example.com/openid/v1/jwks","response_types_supported":["id_token"],"subject_types_supported":["public"],"id_token_signing_alg_values_supported":["ES256","RS256"]}"#;

    #[test]
    fn the_kid_is_the_api_servers() {
        let keys = jwks_of(RSA_PUBLIC_KEY).unwrap();
        assert_eq!(keys[0].kid, RSA_KEY_ID);
        let keys = jwks_of(ECDSA_PUBLIC_KEY).unwrap();
        assert_eq!(keys[0].kid, ECDSA_KEY_ID);
    }

    #[test]
    fn the_jwks_and_discovery_documents_are_the_api_servers_byte_for_byte() {
        let both = format!("{RSA_PUBLIC_KEY}\n{ECDSA_PUBLIC_KEY}\n");
        let keys = jwks_of(&both).unwrap();
        assert_eq!(jwks_document(&keys), JWKS);
        assert_eq!(
            discovery_document(
                "https://issuer.example.com",
                "https://issuer.example.com/openid/v1/jwks",
                &keys
            ),
            DISCOVERY
        );
    }

    #[test]
    fn documents_name_the_issuer_and_its_keys_json() {
        let d = documents("https://oidc.example.com/prod-a/", RSA_PUBLIC_KEY).unwrap();
        let disc: serde_json::Value = serde_json::from_str(&d.discovery).unwrap();
        assert_eq!(disc["issuer"], "https://oidc.example.com/prod-a");
        assert_eq!(
            disc["jwks_uri"],
            "https://oidc.example.com/prod-a/keys.json"
        );
        assert_eq!(
            disc["id_token_signing_alg_values_supported"],
            serde_json::json!(["RS256"])
        );
        assert_eq!(
            object_keys("https://oidc.example.com/prod-a"),
            (
                "prod-a/.well-known/openid-configuration".to_string(),
                "prod-a/keys.json".to_string()
            )
        );
        assert_eq!(
            object_keys("https://oidc.example.com"),
            (
                ".well-known/openid-configuration".to_string(),
                "keys.json".to_string()
            )
        );
    }

    #[test]
    fn what_the_api_server_cannot_sign_with_is_refused_by_name() {
        assert!(matches!(jwks_of(""), Err(Error::NoKey)));
        assert!(matches!(
            jwks_of("-----BEGIN RSA PUBLIC KEY-----\nAAAA\n-----END RSA PUBLIC KEY-----\n"),
            Err(Error::NoKey)
        ));
        let garbled = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n";
        assert!(
            matches!(jwks_of(garbled), Err(Error::Pem { index: 0, .. })),
            "{:?}",
            jwks_of(garbled)
        );
        // An Ed25519 key (RFC 8410's example): the API server does not sign with it.
        let ed25519 = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
        let err = jwks_of(ed25519).unwrap_err();
        assert!(matches!(err, Error::Algorithm { index: 0, .. }), "{err}");
        assert!(err.to_string().contains("1.3.101.112"), "{err}");
    }
}
