//! S3 backend (MinIO, TrueNAS, SeaweedFS, AWS) through aws-sdk-s3: custom endpoint,
//! path-style addressing, standard AWS credential variables, multipart upload for large
//! objects, and the SDK's standard retry with exponential backoff.
//!
//! The engine is synchronous and multi-threaded; this backend owns a small tokio runtime
//! and blocks on it, so callers must not be tokio tasks (the CLI runs the engine inside
//! `spawn_blocking`). Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
//! (/ AWS_SESSION_TOKEN) when set; otherwise the SDK's default provider chain is used.

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;

use super::{Backend, ObjectInfo, S3Options};
use crate::error::{Error, Result};

/// Objects larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 * 1024 * 1024;
/// Part size for multipart uploads (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Attempts per request, with the SDK's exponential backoff between them.
pub const MAX_ATTEMPTS: u32 = 5;

/// A repository under `s3://bucket/prefix`.
pub struct S3Backend {
    rt: tokio::runtime::Runtime,
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
}

impl S3Backend {
    /// Builds a client; does not contact the server.
    pub fn new(bucket: &str, prefix: &str, opts: &S3Options) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hlstore-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start S3 runtime", e))?;
        let endpoint =
            opts.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok()).filter(|s| !s.is_empty());
        let region = opts
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        let explicit = opts.credentials.clone().map(|(ak, sk)| Credentials::new(ak, sk, None, None, "options"));
        let env_creds =
            explicit.or(match (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
                (Ok(ak), Ok(sk)) => {
                    Some(Credentials::new(ak, sk, std::env::var("AWS_SESSION_TOKEN").ok(), None, "environment"))
                }
                _ => None,
            });
        let mut b = match env_creds {
            Some(c) => {
                aws_sdk_s3::config::Builder::new().behavior_version(BehaviorVersion::latest()).credentials_provider(c)
            }
            None => {
                let shared = rt.block_on(
                    aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region.clone())).load(),
                );
                aws_sdk_s3::config::Builder::from(&shared)
            }
        };
        b = b
            .region(Region::new(region))
            .force_path_style(true)
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
        if let Some(ep) = &endpoint {
            b = b.endpoint_url(ep);
        }
        let client = Client::from_conf(b.build());
        let prefix = prefix.trim_matches('/');
        Ok(S3Backend {
            rt,
            client,
            bucket: bucket.to_string(),
            prefix: if prefix.is_empty() { String::new() } else { format!("{prefix}/") },
            endpoint: endpoint.unwrap_or_else(|| "the default AWS endpoint".into()),
        })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn map<E>(&self, op: &'static str, key: &str, err: SdkError<E, HttpResponse>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_string);
        match (status, code.as_deref()) {
            (_, Some("NoSuchBucket")) => {
                Error::BucketNotFound { bucket: self.bucket.clone(), endpoint: self.endpoint.clone() }
            }
            (Some(404), _) if op == "head-bucket" => {
                Error::BucketNotFound { bucket: self.bucket.clone(), endpoint: self.endpoint.clone() }
            }
            (_, Some("NoSuchKey")) | (Some(404), _) => Error::NotFound(key.to_string()),
            (_, Some(c @ ("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied"))) => {
                Error::AccessDenied { bucket: self.bucket.clone(), detail: c.to_string() }
            }
            (Some(403), _) => Error::AccessDenied { bucket: self.bucket.clone(), detail: "HTTP 403".into() },
            _ => Error::Backend {
                op,
                object: format!("s3://{}/{}", self.bucket, self.full(key)),
                detail: DisplayErrorContext(&err).to_string(),
            },
        }
    }

    /// Checks the bucket exists and the credentials are accepted.
    pub fn check_bucket(&self) -> Result<()> {
        self.rt
            .block_on(self.client.head_bucket().bucket(&self.bucket).send())
            .map(|_| ())
            .map_err(|e| self.map("head-bucket", "", e))
    }

    async fn put_multipart(&self, key: &str, data: &[u8]) -> Result<()> {
        let full = self.full(key);
        let up = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.map("create-multipart", key, e))?;
        let upload_id = up.upload_id().unwrap_or_default().to_string();
        let parts = futures::future::try_join_all(data.chunks(PART_SIZE).enumerate().map(|(i, part)| {
            let n = i as i32 + 1;
            let fut = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .part_number(n)
                .body(ByteStream::from(part.to_vec()))
                .send();
            async move {
                let out = fut.await.map_err(|e| self.map("upload-part", key, e))?;
                Ok::<_, Error>(
                    CompletedPart::builder().part_number(n).set_e_tag(out.e_tag().map(str::to_string)).build(),
                )
            }
        }))
        .await;
        let parts = match parts {
            Ok(p) => p,
            Err(e) => {
                let _ = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .send()
                    .await;
                return Err(e);
            }
        };
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(|e| self.map("complete-multipart", key, e))?;
        Ok(())
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        if data.len() > MULTIPART_THRESHOLD {
            return self.rt.block_on(self.put_multipart(key, data));
        }
        self.rt
            .block_on(
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(self.full(key))
                    .body(ByteStream::from(data.to_vec()))
                    .send(),
            )
            .map(|_| ())
            .map_err(|e| self.map("put", key, e))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.rt.block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .send()
                .await
                .map_err(|e| self.map("get", key, e))?;
            let body = out.body.collect().await.map_err(|e| Error::Backend {
                op: "get",
                object: key.to_string(),
                detail: e.to_string(),
            })?;
            Ok(body.into_bytes().to_vec())
        })
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.rt.block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .range(format!("bytes={}-{}", offset, offset + len - 1))
                .send()
                .await;
            let out = match out {
                Ok(o) => o,
                // Range starting past the end: an empty read, like a file.
                Err(e) if e.code() == Some("InvalidRange") => return Ok(Vec::new()),
                Err(e) => return Err(self.map("get-range", key, e)),
            };
            let body = out.body.collect().await.map_err(|e| Error::Backend {
                op: "get-range",
                object: key.to_string(),
                detail: e.to_string(),
            })?;
            let mut v = body.into_bytes().to_vec();
            v.truncate(len as usize);
            Ok(v)
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let page = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(self.full(prefix))
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| self.map("list", prefix, e))?;
                for o in page.contents() {
                    if let Some(k) = o.key() {
                        out.push(ObjectInfo {
                            key: k[self.prefix.len().min(k.len())..].to_string(),
                            size: o.size().unwrap_or(0).max(0) as u64,
                        });
                    }
                }
                match (page.is_truncated(), page.next_continuation_token()) {
                    (Some(true), Some(t)) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            Ok(out)
        })
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.rt
            .block_on(self.client.delete_object().bucket(&self.bucket).key(self.full(key)).send())
            .map(|_| ())
            .or_else(|e| match self.map("delete", key, e) {
                Error::NotFound(_) => Ok(()),
                other => Err(other),
            })
    }
}
