//! Publishes the service-account issuer's two documents ([`crate::oidc`])
//! to the S3 bucket that serves `cluster.service_account_issuer`, when they
//! change: at init (kubeadm has just written `pki/sa.pub`, or a restore has
//! laid the lost cluster's down) and on each leader turn, so a key rotation
//! or a restore reaches AWS STS without an operator. Idempotent: objects
//! already holding the documents are not written again; the JWKS goes up
//! before the discovery document that points at it.

use crate::aws::s3::Bucket;
use crate::config::Config;
use crate::oidc;
use std::path::PathBuf;
use std::sync::Mutex;

/// Largest `sa.pub` read (a few PEM keys; kubeadm's is under 500 bytes).
const MAX_KEY_FILE: u64 = 64 * 1024;
/// Largest published document read back for comparison.
const MAX_DOCUMENT: usize = 256 * 1024;

/// Publishing failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the service-account public key {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the service-account public key {}: {source}", path.display())]
    Key { path: PathBuf, source: oidc::Error },
    #[error("publishing the issuer's documents: {0}")]
    S3(#[from] crate::aws::s3::Error),
}

impl crate::catalogue::Coded for Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        match self {
            Error::ReadKey { .. } | Error::Key { .. } => &crate::catalogue::OIDC_KEY,
            Error::S3(_) => &crate::catalogue::OIDC_PUBLISH,
        }
    }
}

/// What a publication did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The documents were those this process last saw published: no S3 call.
    Unchanged,
    /// S3 already held them (read back, nothing written).
    AlreadyPublished,
    /// This many objects were written.
    Published(usize),
}

/// The issuer, its bucket and where the key is; remembers what it last
/// published so an unchanged key costs no S3 request.
pub struct Publisher {
    bucket: Bucket,
    issuer: String,
    key_file: PathBuf,
    last: Mutex<Option<oidc::Documents>>,
}

impl Publisher {
    /// `None` unless `cluster.service_account_issuer` and `aws.oidc_bucket`
    /// are both set (configuration requires the bucket with the issuer on
    /// control planes).
    pub fn from_config(aws: &aws_config::SdkConfig, cfg: &Config) -> Option<Publisher> {
        let issuer = cfg.cluster.service_account_issuer.clone()?;
        let bucket = cfg.aws.oidc_bucket.as_deref()?;
        Some(Publisher {
            // No SSE-KMS: anonymous readers (STS) must be able to read them.
            bucket: Bucket::new(crate::aws::s3_client(aws, cfg), bucket, None),
            issuer,
            key_file: cfg.paths.kubernetes_dir.join("pki").join("sa.pub"),
            last: Mutex::new(None),
        })
    }

    /// The issuer's URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Builds the documents from the key file and writes those S3 lacks.
    pub async fn publish(&self) -> Result<Outcome, Error> {
        let pem = crate::config::input::read_file(&self.key_file, MAX_KEY_FILE).map_err(|e| {
            Error::ReadKey {
                path: self.key_file.clone(),
                source: e.into_io(),
            }
        })?;
        let pem = String::from_utf8_lossy(&pem);
        let documents = oidc::documents(&self.issuer, &pem).map_err(|source| Error::Key {
            path: self.key_file.clone(),
            source,
        })?;
        if self.last().as_ref() == Some(&documents) {
            return Ok(Outcome::Unchanged);
        }
        let (discovery_key, jwks_key) = oidc::object_keys(&self.issuer);
        let mut written = 0;
        for (key, body, content_type) in [
            (&jwks_key, &documents.jwks, "application/jwk-set+json"),
            (&discovery_key, &documents.discovery, "application/json"),
        ] {
            let current = match self.bucket.get_small(key, MAX_DOCUMENT).await {
                Ok(bytes) => Some(bytes),
                Err(e) if e.not_found => None,
                Err(e) => return Err(e.into()),
            };
            if current.as_deref() != Some(body.as_bytes()) {
                self.bucket
                    .put_small(key, body.as_bytes().to_vec(), content_type)
                    .await?;
                written += 1;
            }
        }
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(documents);
        Ok(if written == 0 {
            Outcome::AlreadyPublished
        } else {
            Outcome::Published(written)
        })
    }

    fn last(&self) -> Option<oidc::Documents> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
