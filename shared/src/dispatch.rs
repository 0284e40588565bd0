//! Where a joined chord's callback goes: onto SQS as a Celery protocol-2 task
//! message in kombu's SQS envelope (a plain Celery worker on the SQS broker
//! runs it), or to a Lambda function as an asynchronous invoke.
//!
//! Messages are built as `docs/CELERY_WIRE.md` describes (see
//! [`crate::celery`]). A queue is reached only if the deployment grants it to
//! the chord's namespace (`CALLBACK_QUEUES`). Errors are sorted into those
//! retrying may fix and those it cannot ([`DispatchError::is_permanent`]):
//! a permanent one fails the chord with a clear error instead of holding
//! its stream shard.

use aws_sdk_sqs::error::ProvideErrorMetadata;
use std::future::Future;

use crate::celery::{celery_sqs_body, MessageContext, Signature};
use crate::config::CallbackConfig;
use crate::ids::Namespace;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("callback message is {size} bytes; {target} accepts at most {limit}")]
    TooLarge { size: usize, limit: usize, target: &'static str },
    #[error("queue {0:?} is not one this tenant's callbacks may use (CALLBACK_QUEUES)")]
    NotAllowed(String),
    #[error("{target} {name:?} does not exist")]
    NoSuchTarget { target: &'static str, name: String },
    /// An error retrying cannot fix (access denied, KMS, invalid parameters).
    /// Only the error code is shown; the full text goes to the log.
    #[error("{target} refused the callback: {code}")]
    Refused { target: &'static str, code: String },
    /// An error retrying may fix (throttling, a 5xx, a time-out).
    #[error("sending to {target} failed: {code}")]
    Send { target: &'static str, code: String },
}

impl DispatchError {
    /// Whether trying again may help (a send failure) or not.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Send { .. })
    }
}

/// Error codes of SQS and Lambda that no retry fixes.
const PERMANENT_CODES: [&str; 16] = [
    "AccessDenied",
    "AccessDeniedException",
    "InvalidParameterValue",
    "InvalidParameterValueException",
    "InvalidMessageContents",
    "InvalidAddress",
    "InvalidSecurity",
    "UnsupportedOperation",
    "RequestEntityTooLarge",
    "RequestTooLargeException",
    "InvalidRequestContentException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "ResourceNotFoundException",
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
];

/// Sorts an SDK error: permanent (a code above, or any KMS error) or not.
/// The full text is logged here, once; the error keeps only the code.
fn sort_error<E, R>(target: &'static str, err: aws_smithy_runtime_api::client::result::SdkError<E, R>) -> DispatchError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = err.code().map(str::to_owned);
    tracing::warn!(target_kind = target, error = %aws_sdk_sqs::error::DisplayErrorContext(&err), "callback send failed");
    match code {
        Some(code) if PERMANENT_CODES.contains(&code.as_str()) || code.to_ascii_uppercase().starts_with("KMS") => {
            DispatchError::Refused { target, code }
        }
        Some(code) => DispatchError::Send { target, code },
        None => DispatchError::Send { target, code: error_kind(&err).to_owned() },
    }
}

fn error_kind<E, R>(err: &aws_smithy_runtime_api::client::result::SdkError<E, R>) -> &'static str {
    use aws_smithy_runtime_api::client::result::SdkError;
    match err {
        SdkError::TimeoutError(_) => "time-out",
        SdkError::DispatchFailure(_) => "connection failure",
        SdkError::ResponseError(_) => "unreadable response",
        _ => "error",
    }
}

/// One message to send: a callback or an errback.
pub struct Outgoing<'a> {
    pub sig: &'a Signature,
    /// The task's positional arguments, as a JSON array (text, so results
    /// round-trip exactly).
    pub args: &'a str,
    /// The Lambda target's event, a JSON document for non-Celery users;
    /// built only for that target.
    pub event: &'a (dyn Fn() -> String + Sync),
    pub cx: MessageContext<'a>,
}

/// Where the join sends; [`Target`] on AWS, a fake in unit tests.
pub trait CallbackSink: Send + Sync {
    /// Sends `out` for a chord of namespace `ns`.
    fn send(&self, ns: &Namespace, out: &Outgoing<'_>) -> impl Future<Output = Result<(), DispatchError>> + Send;
    /// Whether the callback goes out as Celery task messages (one per task
    /// a group or a chord's header starts), or as one event carrying the
    /// whole signature (the Lambda target).
    fn sends_task_messages(&self) -> bool {
        true
    }
    /// The size of `out` as the target counts it against `CALLBACK_MAX_BYTES`.
    fn message_bytes(&self, _ns: &Namespace, out: &Outgoing<'_>) -> usize {
        out.args.len()
    }
}

/// Sends callbacks and errbacks to SQS or Lambda.
#[derive(Debug, Clone)]
pub struct Target {
    config: CallbackConfig,
    sqs: aws_sdk_sqs::Client,
    lambda: aws_sdk_lambda::Client,
}

impl Target {
    pub fn new(config: CallbackConfig, shared: &aws_config::SdkConfig) -> Self {
        Self { config, sqs: aws_sdk_sqs::Client::new(shared), lambda: aws_sdk_lambda::Client::new(shared) }
    }

    fn check_size(&self, size: usize, target: &'static str) -> Result<(), DispatchError> {
        if size > self.config.max_bytes {
            return Err(DispatchError::TooLarge { size, limit: self.config.max_bytes, target });
        }
        Ok(())
    }
}

impl CallbackSink for Target {
    fn sends_task_messages(&self) -> bool {
        self.config.lambda_function.is_none()
    }

    fn message_bytes(&self, _ns: &Namespace, out: &Outgoing<'_>) -> usize {
        if self.config.lambda_function.is_some() {
            return (out.event)().len();
        }
        let queue = out.sig.queue().unwrap_or(&self.config.default_queue);
        celery_sqs_body(out.sig, out.args, queue, &out.cx).len()
    }

    async fn send(&self, ns: &Namespace, out: &Outgoing<'_>) -> Result<(), DispatchError> {
        if let Some(function) = &self.config.lambda_function {
            let payload = (out.event)();
            self.check_size(payload.len(), "Lambda async invoke")?;
            self.lambda
                .invoke()
                .function_name(function)
                .invocation_type(aws_sdk_lambda::types::InvocationType::Event)
                .payload(aws_sdk_lambda::primitives::Blob::new(payload))
                .send()
                .await
                .map_err(|e| match e.as_service_error() {
                    Some(s) if s.is_resource_not_found_exception() => {
                        DispatchError::NoSuchTarget { target: "Lambda function", name: function.clone() }
                    }
                    _ => sort_error("Lambda", e),
                })?;
            return Ok(());
        }
        let queue = out.sig.queue().unwrap_or(&self.config.default_queue).to_owned();
        let url = self.config.queue_url(ns, &queue).ok_or_else(|| DispatchError::NotAllowed(queue.clone()))?;
        let body = celery_sqs_body(out.sig, out.args, &queue, &out.cx);
        self.check_size(body.len(), "SQS")?;
        let mut request = self.sqs.send_message().queue_url(&url).message_body(body);
        if url.ends_with(".fifo") {
            // FIFO queues drop a second message with the same id within 5 minutes.
            let group = if out.cx.group_id.is_empty() { out.sig.task_id.as_str() } else { out.cx.group_id };
            request = request.message_group_id(group).message_deduplication_id(out.sig.task_id.as_str());
        }
        request.send().await.map_err(|e| match e.as_service_error() {
            Some(s) if s.is_queue_does_not_exist() => DispatchError::NoSuchTarget { target: "SQS queue", name: queue },
            _ => sort_error("SQS", e),
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests seen: (URI, invocation type, body).
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

    /// The real Lambda and SQS clients over a scripted HTTP layer that records requests.
    fn target(config: CallbackConfig) -> (Target, Seen) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let http = crate::scripted::client(move |req: lambda_http::http::Request<aws_smithy_types::body::SdkBody>| {
            let invocation =
                req.headers().get("x-amz-invocation-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let body = String::from_utf8_lossy(req.body().bytes().unwrap_or_default()).into_owned();
            let lambda = !invocation.is_empty();
            log.lock().unwrap().push((req.uri().to_string(), invocation, body));
            let (status, reply) = if lambda { (202, "") } else { (200, r#"{"MessageId":"m-1"}"#) };
            lambda_http::http::Response::builder().status(status).body(reply).unwrap()
        });
        let shared = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
                aws_sdk_sqs::config::Credentials::new("a", "b", None, None, "test"),
            ))
            .http_client(http)
            .build();
        (Target::new(config, &shared), seen)
    }

    fn config(vars: &[(&str, &str)]) -> CallbackConfig {
        let vars: std::collections::HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([("TABLE_NAME".into(), "t".into())])
            .collect();
        crate::config::Config::from_lookup(|k| vars.get(k).cloned()).unwrap().callbacks
    }

    fn outgoing<'a>(sig: &'a Signature, args: &'a str, event: &'a (dyn Fn() -> String + Sync)) -> Outgoing<'a> {
        Outgoing {
            sig,
            args,
            event,
            cx: MessageContext { group_id: "g1", parent_id: None, root_id: None, chord_error: None },
        }
    }

    #[tokio::test]
    async fn the_lambda_target_invokes_asynchronously_with_the_joined_results() {
        let config = config(&[
            ("CALLBACK_TARGET", "lambda"),
            ("CALLBACK_LAMBDA_FUNCTION", "on-chord"),
            ("CALLBACK_MAX_BYTES", "1024"),
        ]);
        let (target, seen) = target(config);
        let sig = Signature::parse(r#"{"task":"t","options":{"task_id":"cb"}}"#).unwrap();
        let event = r#"{"chord_id":"g1","namespace":"default","results":[1,2]}"#;
        let ns = Namespace::default();
        target.send(&ns, &outgoing(&sig, "[[1,2]]", &|| event.to_owned())).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        let (uri, invocation, body) = &seen[0];
        assert!(uri.contains("/functions/on-chord/invocations"), "{uri}");
        assert_eq!(invocation, "Event", "asynchronous invoke");
        assert_eq!(body, event);
        let big = || format!(r#"{{"results":"{}"}}"#, "x".repeat(2000));
        let err = target.send(&ns, &outgoing(&sig, "[]", &big)).await.unwrap_err();
        assert!(matches!(err, DispatchError::TooLarge { limit: 1024, .. }) && err.is_permanent(), "{err}");
    }

    #[tokio::test]
    async fn the_sqs_target_sends_only_to_queues_the_namespace_may_use() {
        let (target, seen) = target(config(&[]));
        let sig = Signature::parse(r#"{"task":"t","options":{"task_id":"cb","queue":"proj.high"}}"#).unwrap();
        let err = target.send(&Namespace::default(), &outgoing(&sig, "[[1]]", &String::new)).await.unwrap_err();
        assert!(matches!(&err, DispatchError::NotAllowed(q) if q == "proj.high") && err.is_permanent());
        let (target, seen_b) = target_with_tenants();
        let a = Namespace::parse("tenant-a").unwrap();
        let b = Namespace::parse("tenant-b").unwrap();
        target.send(&a, &outgoing(&sig, "[[1]]", &String::new)).await.unwrap();
        let err = target.send(&b, &outgoing(&sig, "[[1]]", &String::new)).await.unwrap_err();
        assert!(matches!(&err, DispatchError::NotAllowed(_)), "{err}");
        assert!(seen.lock().unwrap().is_empty(), "nothing sent");
        let sent = seen_b.lock().unwrap().clone();
        assert_eq!(sent.len(), 1, "only tenant-a's send went out");
        assert!(sent[0].2.contains("a-proj-high"), "{:?}", sent[0]);
    }

    fn target_with_tenants() -> (Target, Seen) {
        target(config(&[
            ("TENANTS", r#"{"111": "tenant-a", "222": "tenant-b"}"#),
            ("CALLBACK_QUEUES", r#"{"tenant-a": {"proj.high": "https://sqs/1/a-proj-high"}, "tenant-b": {}}"#),
        ]))
    }
}
