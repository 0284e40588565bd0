//! Large results in S3 (see `docs/LARGE_RESULTS.md`).
//!
//! A result whose compressed size passes `SPILL_ABOVE_BYTES`, or one a
//! worker uploads through a presigned URL, lives in the results bucket as
//! one object: the result's JSON text, gzip-compressed, under
//! `{namespace}/task/{task_id}/{sha256 of the object}`. The task's DynamoDB
//! item is written after the object, with the same single conditional
//! write as any store; it keeps the status, the small fields and the
//! object's key. Reads go through the item, so an object no item points to
//! (a store that crashed between the two writes, an upload never committed)
//! is never served; the bucket's lifecycle rules remove it.
//!
//! Every object carries the tag `dynachord-expiry` with the smallest
//! lifetime class that outlives its item ([`expiry_class`]); the template
//! has one lifecycle rule per class.

use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::time::Duration;

use super::retry::classify;
use crate::error::StoreError;
use crate::ids::{Namespace, TaskId};

/// The tag whose value is an object's lifetime class.
pub const EXPIRY_TAG: &str = "dynachord-expiry";

/// The lifetime classes, in days; the template's lifecycle rules match them.
pub const EXPIRY_CLASSES_DAYS: [u64; 6] = [1, 7, 30, 90, 365, 3650];

/// The tag value of the smallest class at least `seconds` long.
pub fn expiry_class(seconds: i64) -> String {
    let days = (seconds.max(1) as u64).div_ceil(86_400);
    let class = EXPIRY_CLASSES_DAYS.iter().copied().find(|&d| d >= days).unwrap_or(3650);
    format!("{class}d")
}

/// The days of lifetime class `class` (`"7d"` → 7); 0 for anything else.
fn class_days(class: &str) -> u64 {
    class.strip_suffix('d').and_then(|d| d.parse().ok()).unwrap_or(0)
}

/// Where a task's object lives: `{ns}/task/{id}/{sha256}`.
pub fn object_key(ns: &Namespace, id: &TaskId, sha256: &str) -> String {
    object_key_under(&super::task_key(ns, id), sha256)
}

/// Where the object of the item keyed `item_key` (a task's or a saved
/// group's) lives: `{item_key}/{sha256}`.
pub fn object_key_under(item_key: &str, sha256: &str) -> String {
    format!("{item_key}/{sha256}")
}

/// A stored result's object, as its item points to it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlobRef {
    pub key: String,
    /// The object's JSON text, uncompressed, in bytes.
    pub bytes: u64,
    /// The object is a JSON object of the meta's large fields (`result`,
    /// `args`, `kwargs`, `traceback`: [`Shape::Fields`]), not the result alone.
    pub fields: bool,
}

impl BlobRef {
    /// An object that holds a result alone.
    pub fn result(key: String, bytes: u64) -> Self {
        Self { key, bytes, fields: false }
    }
}

/// What an uploaded object must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Any JSON value: a result, or a saved group's result.
    Result,
    /// A JSON object of a task meta's large fields: any of `result`,
    /// `args` (a list), `kwargs` (an object) and `traceback` (a string),
    /// nothing else. A worker uploads one when the meta is too large to
    /// send even without its result (`result_extended` arguments of
    /// megabytes, a traceback of megabytes).
    Fields,
}

/// The large fields of a meta, as [`Shape::Fields`] uploads hold them;
/// checked as they stream, nothing of them kept.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldsShape {
    #[serde(default)]
    #[allow(dead_code)]
    result: Option<serde::de::IgnoredAny>,
    /// A vector of a zero-sized type holds no memory, however long.
    #[serde(default)]
    #[allow(dead_code)]
    args: Option<Vec<serde::de::IgnoredAny>>,
    #[serde(default)]
    #[allow(dead_code)]
    kwargs: Option<AnyObject>,
    #[serde(default)]
    #[allow(dead_code)]
    traceback: Option<AnyString>,
}

/// Any JSON string (or null, read as `None`), its text not kept.
struct AnyString;

impl<'de> serde::Deserialize<'de> for AnyString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = AnyString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<AnyString, E> {
                Ok(AnyString)
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

/// Any JSON object, its members skipped.
struct AnyObject;

impl<'de> serde::Deserialize<'de> for AnyObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = AnyObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<AnyObject, A::Error> {
                while map.next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?.is_some() {}
                Ok(AnyObject)
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// A presigned request: the URL, and the headers the caller must send with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Presigned {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// gzip of `text`, as objects are stored.
pub fn gzip(text: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(text.len() / 4), flate2::Compression::fast());
    encoder.write_all(text).expect("writing to memory does not fail");
    encoder.finish().expect("writing to memory does not fail")
}

/// The text of an object.
pub fn gunzip(bytes: &[u8]) -> Result<String, String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes).read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text)
}

/// Why an uploaded object cannot be committed; the caller hears it as 400
/// `invalid_upload`, or 413 `result_too_large` for [`UploadError::TooLarge`].
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("no object was uploaded for sha256 {0}: PUT it to the URL from POST /v1/tasks/{{task_id}}/upload first")]
    Missing(String),
    #[error("the uploaded object's sha256 is {found}, not {expected}")]
    Mismatch { expected: String, found: String },
    #[error("the uploaded object is not gzip-compressed JSON of what it must hold: {0}")]
    NotJson(String),
    #[error("the uploaded result is more than {limit} bytes uncompressed (MAX_RESULT_BYTES)")]
    TooLarge { limit: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<UploadError> for StoreError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Store(e) => e,
            UploadError::TooLarge { limit } => StoreError::UploadTooLarge { limit },
            other => StoreError::BadUpload(other.to_string()),
        }
    }
}

/// Reads an object's bytes as they come, checking on the way that they are
/// gzip-compressed JSON of `shape` of at most `limit` bytes; returns the
/// uncompressed size. Memory stays bounded whatever the object's size.
pub fn check_upload(reader: impl Read, limit: u64, shape: Shape) -> Result<u64, UploadError> {
    struct Counting<R> {
        inner: R,
        count: u64,
        limit: u64,
    }
    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.count += n as u64;
            if self.count > self.limit {
                return Err(std::io::Error::other("too large"));
            }
            Ok(n)
        }
    }
    let mut counting = Counting { inner: flate2::read::GzDecoder::new(reader), count: 0, limit };
    let parsed = {
        let buffered = std::io::BufReader::with_capacity(64 << 10, &mut counting);
        match shape {
            Shape::Result => serde_json::from_reader::<_, serde::de::IgnoredAny>(buffered).map(drop),
            Shape::Fields => serde_json::from_reader::<_, FieldsShape>(buffered).map(drop),
        }
    };
    match parsed {
        Ok(_) => Ok(counting.count),
        Err(_) if counting.count > limit => Err(UploadError::TooLarge { limit }),
        Err(e) => Err(UploadError::NotJson(e.to_string())),
    }
}

/// A `Read` over chunks sent from an async task.
struct ChunkReader {
    chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
    current: std::io::Cursor<Vec<u8>>,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match self.chunks.blocking_recv() {
                Some(chunk) => self.current = std::io::Cursor::new(chunk),
                None => return Ok(0),
            }
        }
    }
}

/// The results bucket.
#[derive(Debug, Clone)]
pub struct Blobs {
    client: aws_sdk_s3::Client,
    bucket: String,
    presign: Duration,
}

impl Blobs {
    /// A client of `bucket`. With an endpoint set in the environment (the
    /// local stack's moto), requests use path-style addressing.
    pub fn new(shared: &aws_config::SdkConfig, bucket: String, presign: Duration) -> Self {
        let local = std::env::var_os("AWS_ENDPOINT_URL_S3").is_some() || std::env::var_os("AWS_ENDPOINT_URL").is_some();
        let config = aws_sdk_s3::config::Builder::from(shared)
            .force_path_style(local)
            .interceptor(crate::calls::CountS3Calls)
            .build();
        Self { client: aws_sdk_s3::Client::from_conf(config), bucket, presign }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Writes the object unless it exists: `false` when it did. Objects are
    /// named by their content, so one that exists holds these bytes (a
    /// result stored again under its id, after its item expired or by a
    /// retried store); it is written again all the same, because S3's
    /// lifecycle counts an object's age from when it was written, not
    /// tagged: reused as it was, an object from a day ago would be removed
    /// under a new item that lives a day more (S8). Written again, it lives
    /// from now, under the longer of its own lifetime class and `class` (an
    /// item that still points to it keeps its time), and one deleted since
    /// the check is there again.
    pub async fn put(&self, key: &str, body: Vec<u8>, class: &str) -> Result<bool, StoreError> {
        let body = aws_smithy_types::body::SdkBody::from(body);
        let again = body.try_clone().expect("an in-memory body clones");
        let sent = self.put_once(key, class).body(ByteStream::new(body)).send().await;
        match sent {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("PreconditionFailed") => {
                let class = match self.class_of(key).await? {
                    Some(old) if class_days(&old) > class_days(class) => old,
                    _ => class.to_owned(),
                };
                self.put_tagged(key, &class).body(ByteStream::new(again)).send().await.map_err(|e| classify(e, 1))?;
                Ok(false)
            }
            Err(e) => Err(classify(e, 1)),
        }
    }

    /// The object's lifetime class (its `dynachord-expiry` tag), if it has
    /// one; `None` also when the object is gone.
    async fn class_of(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self.client.get_object_tagging().bucket(&self.bucket).key(key).send().await {
            Ok(out) => Ok(out.tag_set.into_iter().find(|t| t.key == EXPIRY_TAG).map(|t| t.value)),
            Err(e) if e.code() == Some("NoSuchKey") => Ok(None),
            Err(e) => Err(classify(e, 1)),
        }
    }

    /// The text of the object `blob` points to, checked: its bytes hash to
    /// the name they are stored under (an object replaced through a
    /// presigned URL still valid is refused, never served), and it
    /// decompresses to the size its item recorded, no more. `None` when
    /// there is no such object.
    pub async fn read(&self, blob: &BlobRef) -> Result<Option<String>, StoreError> {
        let Some(bytes) = self.get(&blob.key).await? else { return Ok(None) };
        let named = blob.key.rsplit('/').next().unwrap_or_default();
        if sha256_hex(&bytes) != named {
            tracing::error!(key = %blob.key, "object does not match its name; not served");
            return Err(StoreError::Other(format!("object {} was altered after it was stored", blob.key)));
        }
        let mut text = String::new();
        let mut decoder = flate2::read::GzDecoder::new(&bytes[..]).take(blob.bytes + 1);
        decoder.read_to_string(&mut text).map_err(|e| StoreError::Other(format!("object {}: {e}", blob.key)))?;
        if text.len() as u64 != blob.bytes {
            return Err(StoreError::Other(format!("object {} is not the size its item recorded", blob.key)));
        }
        Ok(Some(text))
    }

    /// The object's bytes; `None` when there is no such object.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(classify(e, 1)),
        };
        let bytes = out.body.collect().await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Some(bytes.into_bytes().to_vec()))
    }

    /// A PUT of the object, tagged with its lifetime class, that never
    /// writes over an existing one.
    fn put_once(&self, key: &str, class: &str) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        self.put_tagged(key, class).if_none_match("*")
    }

    /// A PUT of the object, tagged with its lifetime class.
    fn put_tagged(
        &self,
        key: &str,
        class: &str,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/gzip")
            .tagging(format!("{EXPIRY_TAG}={class}"))
    }

    /// Deletes the object (idempotent).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client.delete_object().bucket(&self.bucket).key(key).send().await.map_err(|e| classify(e, 1))?;
        Ok(())
    }

    /// Deletes the object, logging instead of failing: what is left behind
    /// is never served, and the lifecycle rules remove it.
    pub async fn delete_quietly(&self, key: &str, why: &str) {
        if let Err(err) = self.delete(key).await {
            tracing::warn!(key, why, error = %err, "object not deleted; its lifecycle rule will remove it");
        }
    }

    /// Moves the object to lifetime class `class`.
    pub async fn set_class(&self, key: &str, class: &str) -> Result<(), StoreError> {
        let tag = aws_sdk_s3::types::Tag::builder()
            .key(EXPIRY_TAG)
            .value(class)
            .build()
            .map_err(|e| StoreError::Other(e.to_string()))?;
        let tagging =
            aws_sdk_s3::types::Tagging::builder().tag_set(tag).build().map_err(|e| StoreError::Other(e.to_string()))?;
        self.client
            .put_object_tagging()
            .bucket(&self.bucket)
            .key(key)
            .tagging(tagging)
            .send()
            .await
            .map_err(|e| classify(e, 1))?;
        Ok(())
    }

    fn presigning(&self) -> Result<PresigningConfig, StoreError> {
        PresigningConfig::expires_in(self.presign).map_err(|e| StoreError::Other(e.to_string()))
    }

    pub fn presign_seconds(&self) -> u64 {
        self.presign.as_secs()
    }

    /// A URL that reads the object until it expires.
    pub async fn presign_get(&self, key: &str) -> Result<String, StoreError> {
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(self.presigning()?)
            .await
            .map_err(|e| StoreError::Other(e.to_string()))?;
        Ok(request.uri().to_owned())
    }

    /// A URL (and the headers to send with it) that writes the object of
    /// `bytes` bytes once: never over an existing one (`If-None-Match`).
    pub async fn presign_put(&self, key: &str, class: &str, bytes: u64) -> Result<Presigned, StoreError> {
        let request = self
            .put_once(key, class)
            .content_length(bytes as i64)
            .presigned(self.presigning()?)
            .await
            .map_err(|e| StoreError::Other(e.to_string()))?;
        let headers = request.headers().map(|(name, value)| (name.to_owned(), value.to_owned())).collect();
        Ok(Presigned { url: request.uri().to_owned(), headers })
    }

    /// Checks an uploaded object as it streams in: its SHA-256 is `sha256`,
    /// and it is gzip-compressed JSON of `shape` of at most `limit` bytes.
    /// Returns the uncompressed size.
    pub async fn verify(&self, key: &str, sha256: &str, limit: u64, shape: Shape) -> Result<u64, UploadError> {
        let out = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                return Err(UploadError::Missing(sha256.to_owned()))
            }
            Err(e) if e.code() == Some("NoSuchKey") => return Err(UploadError::Missing(sha256.to_owned())),
            Err(e) => return Err(classify(e, 1).into()),
        };
        let (sender, chunks) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let check = tokio::task::spawn_blocking(move || {
            check_upload(ChunkReader { chunks, current: std::io::Cursor::new(Vec::new()) }, limit, shape)
        });
        let mut body = out.body;
        let mut hasher = Sha256::new();
        let mut streamed = Ok(());
        loop {
            match body.try_next().await {
                Ok(Some(chunk)) => {
                    hasher.update(&chunk);
                    if sender.send(chunk.to_vec()).await.is_err() {
                        break; // the check has its answer already
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    streamed = Err(StoreError::Unavailable(format!("reading the upload: {e}")));
                    break;
                }
            }
        }
        drop(sender);
        let checked = check.await.map_err(|e| StoreError::Other(e.to_string()))?;
        streamed?;
        let size = checked?;
        let found = hex(&hasher.finalize());
        if found != sha256 {
            return Err(UploadError::Mismatch { expected: sha256.to_owned(), found });
        }
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::is_sha256_hex;

    #[test]
    fn expiry_classes_outlive_the_item() {
        assert_eq!(expiry_class(1), "1d");
        assert_eq!(expiry_class(86_400), "1d");
        assert_eq!(expiry_class(86_401), "7d");
        assert_eq!(expiry_class(30 * 86_400), "30d");
        assert_eq!(expiry_class(10 * 365 * 86_400), "3650d");
    }

    #[test]
    fn an_upload_is_checked_as_it_streams() {
        let ok = gzip(br#"{"a":[1,2,3],"s":"x"}"#);
        assert_eq!(check_upload(&ok[..], 1000, Shape::Result).unwrap(), 21);
        assert_eq!(check_upload(&ok[..], 21, Shape::Result).unwrap(), 21, "at the limit");
        assert!(
            matches!(check_upload(&ok[..], 20, Shape::Result), Err(UploadError::TooLarge { limit: 20 })),
            "one past it"
        );
        let bad = gzip(br#"{"a":[1,2,"#);
        assert!(matches!(check_upload(&bad[..], 1000, Shape::Result), Err(UploadError::NotJson(_))));
        assert!(matches!(check_upload(&b"plain"[..], 1000, Shape::Result), Err(UploadError::NotJson(_))));
        let trailing = gzip(b"1 2");
        assert!(matches!(check_upload(&trailing[..], 1000, Shape::Result), Err(UploadError::NotJson(_))));
        let reader = {
            let (sender, chunks) = tokio::sync::mpsc::channel(64);
            for piece in ok.chunks(3) {
                sender.try_send(piece.to_vec()).unwrap();
            }
            ChunkReader { chunks, current: std::io::Cursor::new(Vec::new()) }
        };
        assert_eq!(check_upload(reader, 1000, Shape::Result).unwrap(), 21, "read across chunks");
        assert!(is_sha256_hex(&sha256_hex(b"x")) && !is_sha256_hex("abc"));
    }

    #[test]
    fn a_fields_upload_holds_only_the_large_fields_in_their_shapes() {
        let fields = |text: &str| check_upload(&gzip(text.as_bytes())[..], 1000, Shape::Fields);
        for ok in [
            r#"{"result":{"any":[1]},"args":[1,"x",{}],"kwargs":{"a":[2]}}"#,
            r#"{"args":[],"kwargs":{}}"#,
            r#"{"result":null}"#,
            r#"{"result":{"exc_type":"E"},"traceback":"Traceback (most recent call last):\n"}"#,
            r#"{"traceback":null}"#,
            "{}",
        ] {
            assert_eq!(fields(ok).unwrap(), ok.len() as u64, "{ok}");
        }
        for bad in [
            r#"{"result":1,"status":"SUCCESS"}"#,
            r#"{"args":{"a":1}}"#,
            r#"{"kwargs":[1]}"#,
            r#"{"traceback":["a"]}"#,
            r#"{"traceback":1}"#,
            r#"[1,2]"#,
            r#""result""#,
        ] {
            assert!(matches!(fields(bad), Err(UploadError::NotJson(_))), "{bad}");
        }
        // A result upload may be any JSON.
        assert!(check_upload(&gzip(b"[1,2]")[..], 1000, Shape::Result).is_ok());
    }
}
