//! S3: the backup bucket's calls. A snapshot goes up as a multipart upload
//! (created, its parts, completed, or aborted so no part is left behind),
//! small JSON manifests beside it, and listing, reading and deleting for
//! `backup list|verify`, retention and restore. What the objects mean is
//! [`crate::backup`]'s.

use crate::retry::{classify_sdk_error, RetryClass};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use std::collections::HashMap;

/// An S3 call failed (after the SDK's retries).
#[derive(Debug, thiserror::Error)]
#[error("S3 {operation} on s3://{bucket}/{key}: {message}")]
pub struct Error {
    pub operation: &'static str,
    pub bucket: String,
    pub key: String,
    pub class: RetryClass,
    /// The object or bucket does not exist (NoSuchKey, NoSuchBucket, 404).
    pub not_found: bool,
    pub message: String,
}

impl Error {
    fn new<E>(
        operation: &'static str,
        bucket: &str,
        key: &str,
        e: &SdkError<E, HttpResponse>,
    ) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let code = e
            .as_service_error()
            .and_then(|s| s.code())
            .unwrap_or_default();
        let status_404 = e.raw_response().is_some_and(|r| r.status().as_u16() == 404);
        Error {
            operation,
            bucket: bucket.to_string(),
            key: key.to_string(),
            class: classify_sdk_error(e),
            not_found: status_404 || matches!(code, "NoSuchKey" | "NoSuchBucket" | "NotFound"),
            message: DisplayErrorContext(e).to_string(),
        }
    }

    /// A failure while reading a response body (a dropped connection mid-object).
    fn body(operation: &'static str, bucket: &str, key: &str, e: impl std::fmt::Display) -> Self {
        Error {
            operation,
            bucket: bucket.to_string(),
            key: key.to_string(),
            class: RetryClass::Transient,
            not_found: false,
            message: format!("reading the object: {e}"),
        }
    }
}

impl crate::catalogue::Coded for Error {
    fn entry(&self) -> &'static crate::catalogue::Entry {
        if self.not_found {
            &crate::catalogue::BACKUP_NOT_FOUND
        } else {
            &crate::catalogue::BACKUP_STORAGE
        }
    }
}

/// One object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub size: u64,
}

/// A multipart upload that was started and neither completed nor aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpload {
    pub key: String,
    pub upload_id: String,
}

/// The backup bucket, with the KMS key its objects are encrypted with.
#[derive(Debug, Clone)]
pub struct Bucket {
    client: aws_sdk_s3::Client,
    name: String,
    /// SSE-KMS with this key; the bucket's default encryption when `None`.
    kms_key_id: Option<String>,
}

impl Bucket {
    pub fn new(client: aws_sdk_s3::Client, name: &str, kms_key_id: Option<String>) -> Self {
        Bucket {
            client,
            name: name.to_string(),
            kms_key_id,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `s3://bucket/key`, as operators type it.
    pub fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.name)
    }

    /// Starts a multipart upload of `key` with `metadata`; its upload id.
    pub async fn start_upload(
        &self,
        key: &str,
        metadata: HashMap<String, String>,
    ) -> Result<String, Error> {
        let mut req = self
            .client
            .create_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .content_type("application/octet-stream")
            .set_metadata(Some(metadata));
        if let Some(kms) = &self.kms_key_id {
            req = req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id(kms);
        }
        let out = req
            .send()
            .await
            .map_err(|e| Error::new("CreateMultipartUpload", &self.name, key, &e))?;
        out.upload_id.ok_or_else(|| Error {
            operation: "CreateMultipartUpload",
            bucket: self.name.clone(),
            key: key.to_string(),
            class: RetryClass::Permanent,
            not_found: false,
            message: "the answer has no UploadId".into(),
        })
    }

    /// Uploads part `number` (from 1) of an upload; the part as completion needs it.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: bytes::Bytes,
    ) -> Result<CompletedPart, Error> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.name)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| Error::new("UploadPart", &self.name, key, &e))?;
        Ok(CompletedPart::builder()
            .set_e_tag(out.e_tag)
            .part_number(number)
            .build())
    }

    /// Completes an upload from its parts, in order.
    pub async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<CompletedPart>,
    ) -> Result<(), Error> {
        self.client
            .complete_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| Error::new("CompleteMultipartUpload", &self.name, key, &e))?;
        Ok(())
    }

    /// Aborts an upload: S3 drops its parts. One already gone (completed,
    /// or aborted by another) is what an abort wants: done.
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), Error> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_upload()) => Ok(()),
            Err(e) => Err(Error::new("AbortMultipartUpload", &self.name, key, &e)),
        }
    }

    /// The uploads under `prefix` that were started and never completed or aborted.
    pub async fn open_uploads(&self, prefix: &str) -> Result<Vec<OpenUpload>, Error> {
        let mut open = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.name)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| Error::new("ListMultipartUploads", &self.name, prefix, &e))?;
            for u in out.uploads() {
                if let (Some(key), Some(id)) = (u.key(), u.upload_id()) {
                    open.push(OpenUpload {
                        key: key.to_string(),
                        upload_id: id.to_string(),
                    });
                }
            }
            if out.is_truncated() != Some(true) {
                return Ok(open);
            }
            key_marker = out.next_key_marker;
            id_marker = out.next_upload_id_marker;
            if key_marker.is_none() {
                return Ok(open);
            }
        }
    }

    /// Writes a small object whole (a manifest).
    pub async fn put_small(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), Error> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body));
        if let Some(kms) = &self.kms_key_id {
            req = req
                .server_side_encryption(ServerSideEncryption::AwsKms)
                .ssekms_key_id(kms);
        }
        req.send()
            .await
            .map_err(|e| Error::new("PutObject", &self.name, key, &e))?;
        Ok(())
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Object>, Error> {
        let mut objects = Vec::new();
        let mut token = None::<String>;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.name)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| Error::new("ListObjectsV2", &self.name, prefix, &e))?;
            for o in out.contents() {
                if let Some(key) = o.key() {
                    objects.push(Object {
                        key: key.to_string(),
                        size: o.size().unwrap_or_default().max(0) as u64,
                    });
                }
            }
            match (out.is_truncated(), out.next_continuation_token) {
                (Some(true), Some(next)) => token = Some(next),
                _ => return Ok(objects),
            }
        }
    }

    /// A small object read whole (a manifest), at most `limit` bytes.
    pub async fn get_small(&self, key: &str, limit: usize) -> Result<Vec<u8>, Error> {
        let mut reader = self.open(key).await?;
        let mut body = Vec::new();
        while let Some(piece) = reader.next().await? {
            body.extend_from_slice(&piece);
            if body.len() > limit {
                return Err(Error::body(
                    "GetObject",
                    &self.name,
                    key,
                    format!("larger than {limit} bytes"),
                ));
            }
        }
        Ok(body)
    }

    /// An object to read piece by piece, never whole.
    pub async fn open(&self, key: &str) -> Result<Reader, Error> {
        let out = self
            .client
            .get_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map_err(|e| Error::new("GetObject", &self.name, key, &e))?;
        Ok(Reader {
            body: out.body,
            bucket: self.name.clone(),
            key: key.to_string(),
        })
    }

    /// Deletes `key` (in a versioned bucket: a delete marker; the bucket's
    /// lifecycle expires the old version).
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.client
            .delete_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map_err(|e| Error::new("DeleteObject", &self.name, key, &e))?;
        Ok(())
    }
}

/// An object being read.
pub struct Reader {
    body: ByteStream,
    bucket: String,
    key: String,
}

impl Reader {
    /// The next piece; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<bytes::Bytes>, Error> {
        match self.body.next().await {
            None => Ok(None),
            Some(Ok(piece)) => Ok(Some(piece)),
            Some(Err(e)) => Err(Error::body("GetObject", &self.bucket, &self.key, e)),
        }
    }
}
