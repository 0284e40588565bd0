//! Where a joined chord's callback goes: onto SQS as a Celery protocol-2 task
//! message in kombu's SQS envelope (a plain Celery worker on the SQS broker
//! runs it), or to a Lambda function as an asynchronous invoke.
//!
//! Messages are built as `docs/CELERY_WIRE.md` describes (see
//! [`crate::celery`]). A queue is reached only if the deployment grants it to
//! the chord's namespace (`CALLBACK_QUEUES`). Errors are sorted three ways
//! ([`DispatchError`]): refused for good (the chord fails with a clear
//! error instead of holding its stream shard), not sent (a retry may fix
//! it), and sent or not, nobody knows (a time-out or a 5xx after the request
//! went out). The SDK never retries a send itself: a retry of a request that
//! may have gone out would enqueue a second copy silently. [`Target`]
//! retries only what did not go out, and, on a FIFO queue (which drops a
//! second copy of a message id within 5 minutes), what may have.
//! `docs/INVARIANTS.md` (O5) says what each target does with an unknown outcome.

use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_smithy_runtime_api::client::result::SdkError;
use std::future::Future;
use std::time::Duration;

use crate::celery::{celery_sqs_body, MessageContext, Signature};
use crate::config::CallbackConfig;
use crate::ids::Namespace;

#[derive(Debug, Clone, thiserror::Error)]
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
    /// The message did not go out, and a retry may fix it (throttling, a
    /// connection never made, another refusal that is not for good).
    #[error("sending to {target} failed: {code}")]
    Send { target: &'static str, code: String },
    /// The request went out and no answer says what became of it (a
    /// time-out, a 5xx, a connection lost before the answer): the message
    /// may have gone out. It is never sent again (invariant O5).
    #[error("the outcome of sending to {target} is unknown ({code}): it may have gone out")]
    Unknown { target: &'static str, code: String },
}

impl DispatchError {
    /// Whether trying again cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Send { .. } | Self::Unknown { .. })
    }

    /// Whether the message may have gone out all the same.
    pub fn may_have_gone_out(&self) -> bool {
        matches!(self, Self::Unknown { .. })
    }

    /// Whether sending again may help and cannot duplicate: the message did
    /// not go out, or may have where the target drops a second copy
    /// (`deduplicated`, a FIFO queue).
    fn worth_another_try(&self, deduplicated: bool) -> bool {
        matches!(self, Self::Send { .. }) || (deduplicated && self.may_have_gone_out())
    }
}

/// An SQS error, naming the queue by `name` (the tenant's, never the
/// deployment's URL) when it does not exist.
fn sqs_error<E>(name: &str, missing: bool, err: SdkError<E, aws_smithy_runtime_api::http::Response>) -> DispatchError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if missing {
        return DispatchError::NoSuchTarget { target: "SQS queue", name: name.to_owned() };
    }
    sort_error("SQS", err)
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

/// Sorts an SDK error (see [`DispatchError`]): permanent (a code above, or
/// any KMS error), not sent (refused with a 4xx, or no connection made), or
/// unknown (a time-out, a 5xx, a connection lost or an answer unreadable
/// after the request went out). The full text is logged here, once; the
/// error keeps only the code.
fn sort_error<E>(target: &'static str, err: SdkError<E, aws_smithy_runtime_api::http::Response>) -> DispatchError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    tracing::warn!(target_kind = target, error = %aws_sdk_sqs::error::DisplayErrorContext(&err), "callback send failed");
    let status = err.raw_response().map(|r| r.status().as_u16());
    let code = err.code().map(str::to_owned);
    match (&err, code) {
        (_, Some(code)) if PERMANENT_CODES.contains(&code.as_str()) || code.to_ascii_uppercase().starts_with("KMS") => {
            DispatchError::Refused { target, code }
        }
        (SdkError::ServiceError(_), code) if status.is_some_and(|s| s >= 500) => {
            DispatchError::Unknown { target, code: code.unwrap_or_else(|| format!("HTTP {}", status.unwrap_or(500))) }
        }
        (SdkError::ServiceError(_), code) => {
            DispatchError::Send { target, code: code.unwrap_or_else(|| format!("HTTP {}", status.unwrap_or(400))) }
        }
        (SdkError::ConstructionFailure(_), _) => DispatchError::Refused { target, code: "request not built".into() },
        (SdkError::DispatchFailure(_), _) if never_connected(&err) => {
            DispatchError::Send { target, code: "no connection".into() }
        }
        (SdkError::DispatchFailure(failure), _) if failure.is_user() => {
            DispatchError::Send { target, code: "request not sent".into() }
        }
        (SdkError::TimeoutError(_), _) => DispatchError::Unknown { target, code: "time-out".into() },
        (SdkError::ResponseError(_), _) => DispatchError::Unknown { target, code: "unreadable answer".into() },
        _ => DispatchError::Unknown { target, code: "connection lost".into() },
    }
}

/// Whether the request failed before a connection was made (refused,
/// unresolvable, or the connect timed out): nothing can have gone out.
fn never_connected(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err.downcast_ref::<hyper_util::client::legacy::Error>().is_some_and(|e| e.is_connect())
            || err.downcast_ref::<aws_smithy_runtime_api::client::dns::ResolveDnsError>().is_some()
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Attempts at a send, and the first pause between them (doubling): a send
/// that did not go out is tried again, and one whose outcome is unknown
/// only where the target drops a second copy (a FIFO queue).
pub const SEND_ATTEMPTS: u32 = 4;
pub const SEND_FIRST_PAUSE: Duration = Duration::from_millis(100);

/// Runs `attempt` until it succeeds, fails for good, or may have sent
/// (unless `deduplicated`), at most [`SEND_ATTEMPTS`] times.
async fn retrying<F, Fut>(deduplicated: bool, attempt: F) -> Result<(), DispatchError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), DispatchError>>,
{
    let mut pause = SEND_FIRST_PAUSE;
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(err) if tries < SEND_ATTEMPTS && err.worth_another_try(deduplicated) => {
                tracing::warn!(attempt = tries, error = %err, "sending again");
                tokio::time::sleep(pause).await;
                pause *= 2;
                tries += 1;
            }
            done => return done,
        }
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

/// The longest an SQS message can be delayed: 15 minutes.
pub const MAX_DELAY: Duration = Duration::from_secs(900);

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
    /// Sends `body` to the deployment's deadline queue
    /// (`CHORD_DEADLINE_QUEUE_URL`), to be received after `delay` (at most
    /// [`MAX_DELAY`], SQS's limit): what wakes chord-join at a chord's
    /// deadline. A copy does no harm, so an unknown outcome is retried.
    fn send_later(&self, body: &str, delay: Duration) -> impl Future<Output = Result<(), DispatchError>> + Send;
    /// Sends a window of messages: each one's outcome, in order. Here one
    /// at a time, stopping at the first that did not go out but may if
    /// retried (the rest get its error, untried; one refused for good does
    /// not stop the others); [`Target`] sends SQS messages in concurrent
    /// batches instead.
    fn send_all(
        &self,
        ns: &Namespace,
        outs: &[Outgoing<'_>],
    ) -> impl Future<Output = Vec<Result<(), DispatchError>>> + Send {
        in_turn(self, ns, outs)
    }
}

/// Sends `outs` one at a time, stopping at the first that did not go out
/// but may if retried, so a retry goes on from there.
pub(crate) async fn in_turn<T: CallbackSink + ?Sized>(
    sink: &T,
    ns: &Namespace,
    outs: &[Outgoing<'_>],
) -> Vec<Result<(), DispatchError>> {
    one_by_one(sink, ns, outs, true).await
}

/// Sends `outs` one at a time; with `stop`, the rest after one that did not
/// go out but may if retried get its error, untried.
pub(crate) async fn one_by_one<T: CallbackSink + ?Sized>(
    sink: &T,
    ns: &Namespace,
    outs: &[Outgoing<'_>],
    stop: bool,
) -> Vec<Result<(), DispatchError>> {
    let mut results: Vec<Result<(), DispatchError>> = Vec::with_capacity(outs.len());
    for out in outs {
        match results.last() {
            Some(Err(err @ DispatchError::Send { .. })) if stop => results.push(Err(err.clone())),
            _ => results.push(sink.send(ns, out).await),
        }
    }
    results
}

/// Messages per `SendMessageBatch`, SQS's most.
pub const BATCH_ENTRIES: usize = 10;

/// One SQS message of a batch: its place in the window, its queue's name,
/// its body, and for a FIFO queue its group and deduplication ids.
struct Entry {
    index: usize,
    queue: String,
    body: String,
    fifo: Option<(String, String)>,
}

/// Sends callbacks and errbacks to SQS or Lambda.
#[derive(Debug, Clone)]
pub struct Target {
    config: CallbackConfig,
    sqs: aws_sdk_sqs::Client,
    lambda: aws_sdk_lambda::Client,
}

impl Target {
    /// Clients over `shared` that never retry a request themselves (see
    /// [`retrying`]).
    pub fn new(config: CallbackConfig, shared: &aws_config::SdkConfig) -> Self {
        let once = aws_smithy_types::retry::RetryConfig::disabled();
        let sqs = aws_sdk_sqs::config::Builder::from(shared).retry_config(once.clone()).build();
        let lambda = aws_sdk_lambda::config::Builder::from(shared).retry_config(once).build();
        Self { config, sqs: aws_sdk_sqs::Client::from_conf(sqs), lambda: aws_sdk_lambda::Client::from_conf(lambda) }
    }

    fn check_size(&self, size: usize, target: &'static str) -> Result<(), DispatchError> {
        if size > self.config.max_bytes {
            return Err(DispatchError::TooLarge { size, limit: self.config.max_bytes, target });
        }
        Ok(())
    }

    /// The queue URL and the SQS message of `out`, checked: a queue the
    /// namespace may use, a body within `CALLBACK_MAX_BYTES`.
    fn sqs_message(&self, ns: &Namespace, out: &Outgoing<'_>, index: usize) -> Result<(String, Entry), DispatchError> {
        let queue = out.sig.queue().unwrap_or(&self.config.default_queue);
        let url = self.config.queue_url(ns, queue).ok_or_else(|| DispatchError::NotAllowed(queue.to_owned()))?;
        let body = celery_sqs_body(out.sig, out.args, queue, &out.cx);
        self.check_size(body.len(), "SQS")?;
        // FIFO queues drop a second message with the same id within 5 minutes.
        let fifo = url.ends_with(".fifo").then(|| {
            let group = if out.cx.group_id.is_empty() { out.sig.task_id.as_str() } else { out.cx.group_id };
            (group.to_owned(), out.sig.task_id.to_string())
        });
        Ok((url, Entry { index, queue: queue.to_owned(), body, fifo }))
    }

    /// Sends one batch to `url` (at most [`BATCH_ENTRIES`], within
    /// `CALLBACK_MAX_BYTES`), retrying the entries SQS did not take as
    /// [`retrying`] does a single send; each entry's outcome.
    async fn send_batch(&self, url: &str, entries: &[Entry]) -> Vec<(usize, Result<(), DispatchError>)> {
        use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
        let deduplicated = url.ends_with(".fifo");
        let mut pending: Vec<&Entry> = entries.iter().collect();
        let mut done = Vec::with_capacity(entries.len());
        let mut pause = SEND_FIRST_PAUSE;
        for attempt in 1..=SEND_ATTEMPTS {
            let batch = pending.iter().map(|e| {
                let (group, dedup) = e.fifo.clone().unzip();
                SendMessageBatchRequestEntry::builder()
                    .id(e.index.to_string())
                    .message_body(&e.body)
                    .set_message_group_id(group)
                    .set_message_deduplication_id(dedup)
                    .build()
                    .map_err(|e| DispatchError::Refused { target: "SQS", code: e.to_string() })
            });
            let batch: Result<Vec<_>, _> = batch.collect();
            let sent = match batch {
                Ok(batch) => self.sqs.send_message_batch().queue_url(url).set_entries(Some(batch)).send().await,
                Err(err) => return pending.iter().map(|e| (e.index, Err(err.clone()))).chain(done).collect(),
            };
            let last = attempt == SEND_ATTEMPTS;
            let retry: Vec<&Entry> = match sent {
                Ok(out) => {
                    let mut failed: std::collections::HashMap<String, DispatchError> = out
                        .failed
                        .into_iter()
                        .map(|f| {
                            let code = f.code;
                            let permanent = f.sender_fault || PERMANENT_CODES.contains(&code.as_str());
                            let err = if permanent {
                                DispatchError::Refused { target: "SQS", code }
                            } else {
                                DispatchError::Send { target: "SQS", code }
                            };
                            (f.id, err)
                        })
                        .collect();
                    let mut retry = Vec::new();
                    for entry in pending {
                        match failed.remove(&entry.index.to_string()) {
                            None => done.push((entry.index, Ok(()))),
                            Some(err) if err.is_permanent() || last => done.push((entry.index, Err(err))),
                            Some(_) => retry.push(entry),
                        }
                    }
                    retry
                }
                Err(e) => {
                    // The tenant sees the queue's name, never the deployment's URL.
                    let name = pending.first().map_or("", |e| e.queue.as_str());
                    let missing = e.as_service_error().is_some_and(|s| s.is_queue_does_not_exist());
                    let err = sqs_error(name, missing, e);
                    if !err.worth_another_try(deduplicated) || last {
                        done.extend(pending.iter().map(|e| (e.index, Err(err.clone()))));
                        return done;
                    }
                    pending
                }
            };
            if retry.is_empty() {
                break;
            }
            tracing::warn!(attempt, entries = retry.len(), "sending again");
            tokio::time::sleep(pause).await;
            pause *= 2;
            pending = retry;
        }
        done
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
            let invoke = self
                .lambda
                .invoke()
                .function_name(function)
                .invocation_type(aws_sdk_lambda::types::InvocationType::Event)
                .payload(aws_sdk_lambda::primitives::Blob::new(payload));
            // An asynchronous invoke has no idempotency token: an unknown outcome is not retried.
            return retrying(false, || async {
                invoke.clone().send().await.map(|_| ()).map_err(|e| match e.as_service_error() {
                    Some(s) if s.is_resource_not_found_exception() => {
                        DispatchError::NoSuchTarget { target: "Lambda function", name: function.clone() }
                    }
                    _ => sort_error("Lambda", e),
                })
            })
            .await;
        }
        let (url, entry) = self.sqs_message(ns, out, 0)?;
        let name = entry.queue;
        let (group, dedup) = entry.fifo.unzip();
        let request = self
            .sqs
            .send_message()
            .queue_url(&url)
            .message_body(entry.body)
            .set_message_group_id(group)
            .set_message_deduplication_id(dedup);
        retrying(url.ends_with(".fifo"), || async {
            request.clone().send().await.map(|_| ()).map_err(|e| {
                let missing = e.as_service_error().is_some_and(|s| s.is_queue_does_not_exist());
                sqs_error(&name, missing, e)
            })
        })
        .await
    }

    async fn send_later(&self, body: &str, delay: Duration) -> Result<(), DispatchError> {
        let Some(url) = &self.config.deadline_queue_url else {
            return Err(DispatchError::NoSuchTarget { target: "queue", name: "CHORD_DEADLINE_QUEUE_URL".into() });
        };
        let delay = delay.min(MAX_DELAY).as_secs() as i32;
        let request = self.sqs.send_message().queue_url(url).message_body(body).delay_seconds(delay);
        retrying(true, || async { request.clone().send().await.map(|_| ()).map_err(|e| sort_error("SQS", e)) }).await
    }

    /// SQS messages go in batches per queue (at most [`BATCH_ENTRIES`] and
    /// `CALLBACK_MAX_BYTES` each), the batches concurrently; the Lambda
    /// target's events one at a time.
    async fn send_all(&self, ns: &Namespace, outs: &[Outgoing<'_>]) -> Vec<Result<(), DispatchError>> {
        if self.config.lambda_function.is_some() {
            return in_turn(self, ns, outs).await;
        }
        let mut results: Vec<Option<Result<(), DispatchError>>> = (0..outs.len()).map(|_| None).collect();
        let mut queues: Vec<(String, Vec<Vec<Entry>>)> = Vec::new();
        for (index, out) in outs.iter().enumerate() {
            let (url, entry) = match self.sqs_message(ns, out, index) {
                Ok(message) => message,
                Err(err) => {
                    results[index] = Some(Err(err));
                    continue;
                }
            };
            if !queues.iter().any(|(u, _)| *u == url) {
                queues.push((url.clone(), vec![Vec::new()]));
            }
            let batches = &mut queues.iter_mut().find(|(u, _)| *u == url).expect("pushed above").1;
            let open = batches.last().expect("a queue has a batch");
            let bytes: usize = open.iter().map(|e| e.body.len()).sum();
            if open.len() == BATCH_ENTRIES || bytes + entry.body.len() > self.config.max_bytes {
                batches.push(Vec::new());
            }
            batches.last_mut().expect("a queue has a batch").push(entry);
        }
        let batches = queues.iter().flat_map(|(url, batches)| batches.iter().map(move |b| (url, b)));
        let sent = futures::future::join_all(batches.map(|(url, batch)| self.send_batch(url, batch))).await;
        for (index, result) in sent.into_iter().flatten() {
            results[index] = Some(result);
        }
        results.into_iter().map(|r| r.expect("every message has an outcome")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests seen: (URI, invocation type, body).
    type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>;

    /// The real Lambda and SQS clients over a scripted HTTP layer that records requests.
    fn target(config: CallbackConfig) -> (Target, Seen) {
        target_answering(config, |lambda, _| if lambda { (202, "") } else { (200, r#"{"MessageId":"m-1"}"#) })
    }

    /// As [`target`], the answers given by `answer(is_lambda, requests_before)`.
    fn target_answering(
        config: CallbackConfig,
        answer: impl Fn(bool, usize) -> (u16, &'static str) + Send + Sync + 'static,
    ) -> (Target, Seen) {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let http = crate::scripted::client(move |req: lambda_http::http::Request<aws_smithy_types::body::SdkBody>| {
            let invocation =
                req.headers().get("x-amz-invocation-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let body = String::from_utf8_lossy(req.body().bytes().unwrap_or_default()).into_owned();
            let lambda = !invocation.is_empty();
            let mut log = log.lock().unwrap();
            let (status, reply) = answer(lambda, log.len());
            log.push((req.uri().to_string(), invocation, body));
            lambda_http::http::Response::builder().status(status).body(reply).unwrap()
        });
        (Target::new(config, &sdk_config(http, Duration::from_secs(10), None)), seen)
    }

    /// The SDK configuration of the tests' clients (the SDK would retry 6
    /// times); SQS at `endpoint` when given.
    fn sdk_config(
        http: aws_smithy_runtime_api::client::http::SharedHttpClient,
        attempt_timeout: Duration,
        endpoint: Option<String>,
    ) -> aws_config::SdkConfig {
        let mut builder = aws_config::SdkConfig::builder();
        builder.set_endpoint_url(endpoint);
        builder
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_sqs::config::SharedCredentialsProvider::new(
                aws_sdk_sqs::config::Credentials::new("a", "b", None, None, "test"),
            ))
            .http_client(http)
            .retry_config(aws_smithy_types::retry::RetryConfig::standard().with_max_attempts(6))
            .timeout_config(
                aws_smithy_types::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(1))
                    .operation_attempt_timeout(attempt_timeout)
                    .build(),
            )
            .build()
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

    fn queue_config(url: &str) -> CallbackConfig {
        config(&[("CALLBACK_QUEUE_URLS", &format!("celery={url}"))])
    }

    const THROTTLED: &str = r#"{"__type":"com.amazonaws.sqs#RequestThrottled","message":"slow down"}"#;
    const INTERNAL: &str = r#"{"__type":"com.amazonaws.sqs#InternalError","message":"oops"}"#;

    #[tokio::test]
    async fn a_send_that_did_not_go_out_is_tried_again_and_one_that_may_have_is_not() {
        let sig = Signature::parse(r#"{"task":"t","options":{"task_id":"cb"}}"#).unwrap();
        let ns = Namespace::default();
        // Throttled twice, then taken: three requests, one message.
        let throttled_twice = |_, before| if before < 2 { (400, THROTTLED) } else { (200, r#"{"MessageId":"m"}"#) };
        let (target, seen) = target_answering(queue_config("https://sqs/1/celery"), throttled_twice);
        target.send(&ns, &outgoing(&sig, "[[1]]", &String::new)).await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 3);
        // Throttled every time: SEND_ATTEMPTS requests, then "not sent".
        let (target, seen) = target_answering(queue_config("https://sqs/1/celery"), |_, _| (400, THROTTLED));
        let err = target.send(&ns, &outgoing(&sig, "[[1]]", &String::new)).await.unwrap_err();
        assert!(matches!(err, DispatchError::Send { .. }) && !err.may_have_gone_out(), "{err}");
        assert_eq!(seen.lock().unwrap().len(), SEND_ATTEMPTS as usize);
        // A 5xx after the request went out: the message may be on the queue.
        // Neither the SDK nor we send it again.
        let (target, seen) = target_answering(queue_config("https://sqs/1/celery"), |_, _| (500, INTERNAL));
        let err = target.send(&ns, &outgoing(&sig, "[[1]]", &String::new)).await.unwrap_err();
        assert!(err.may_have_gone_out() && !err.is_permanent(), "{err}");
        assert_eq!(seen.lock().unwrap().len(), 1, "sent once");
        // A FIFO queue drops a second copy of the message id: sending again is safe.
        let fifo = "https://sqs/1/celery.fifo";
        let (target, seen) = target_answering(queue_config(fifo), |_, before| {
            if before == 0 {
                (500, INTERNAL)
            } else {
                (200, r#"{"MessageId":"m"}"#)
            }
        });
        target.send(&ns, &outgoing(&sig, "[[1]]", &String::new)).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|(_, _, body)| body.contains(r#""MessageDeduplicationId":"cb""#)), "{seen:?}");
        // The Lambda target's asynchronous invoke has no token to drop a copy.
        let lambda = config(&[("CALLBACK_TARGET", "lambda"), ("CALLBACK_LAMBDA_FUNCTION", "on-chord")]);
        let (target, seen) = target_answering(lambda, |_, _| (502, r#"{"Type":"Service","message":"bad gateway"}"#));
        let err = target.send(&ns, &outgoing(&sig, "[[1]]", &|| "{}".to_owned())).await.unwrap_err();
        assert!(err.may_have_gone_out(), "{err}");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_connection_never_made_is_not_sent_and_one_held_past_its_time_out_may_have_been() {
        let sig = Signature::parse(r#"{"task":"t","options":{"task_id":"cb"}}"#).unwrap();
        let ns = Namespace::default();
        // Nothing listens on a port just released: the connection is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let shared =
            |addr| sdk_config(crate::aws::https_client(), Duration::from_millis(300), Some(format!("http://{addr}")));
        let target = Target::new(queue_config(&format!("http://{closed}/1/celery")), &shared(closed));
        let err = target.send(&ns, &outgoing(&sig, "[[1]]", &String::new)).await.unwrap_err();
        assert!(matches!(&err, DispatchError::Send { code, .. } if code == "no connection"), "{err}");
        // A server that reads the request and never answers: the attempt
        // times out with the request sent, so it is not sent again.
        let held = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = held.local_addr().unwrap();
        let url = format!("http://{addr}/1/celery");
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let count = accepted.clone();
        let server = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((conn, _)) = held.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                open.push(conn);
            }
        });
        let target = Target::new(queue_config(&url), &shared(addr));
        let err = target.send(&ns, &outgoing(&sig, "[[1]]", &String::new)).await.unwrap_err();
        assert!(matches!(&err, DispatchError::Unknown { code, .. } if code == "time-out"), "{err}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1, "one request");
        server.abort();
    }

    #[tokio::test]
    async fn sqs_messages_go_in_batches_per_queue_and_only_the_entries_not_taken_are_sent_again() {
        // Each request's queue and entry ids. Entry 3 is not taken the first
        // time (not the sender's fault); entry 7 is refused for good.
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<String>)>::new()));
        let log = requests.clone();
        let http = crate::scripted::client(move |req: lambda_http::http::Request<aws_smithy_types::body::SdkBody>| {
            let body: serde_json::Value = serde_json::from_slice(req.body().bytes().unwrap()).unwrap();
            let queue = body["QueueUrl"].as_str().unwrap().to_owned();
            let ids: Vec<String> =
                body["Entries"].as_array().unwrap().iter().map(|e| e["Id"].as_str().unwrap().to_owned()).collect();
            let mut log = log.lock().unwrap();
            let first_of_3 = !log.iter().any(|(_, seen)| seen.contains(&"3".to_owned()));
            log.push((queue, ids.clone()));
            let (mut ok, mut failed) = (Vec::new(), Vec::new());
            for id in ids {
                match id.as_str() {
                    "3" if first_of_3 => {
                        failed.push(serde_json::json!({"Id": id, "SenderFault": false, "Code": "InternalError"}))
                    }
                    "7" => {
                        failed.push(serde_json::json!({"Id": id, "SenderFault": true, "Code": "InvalidParameterValue"}))
                    }
                    _ => ok.push(serde_json::json!({"Id": id, "MessageId": "m", "MD5OfMessageBody": "x"})),
                }
            }
            let reply = serde_json::json!({"Successful": ok, "Failed": failed}).to_string();
            lambda_http::http::Response::builder().status(200).body(reply).unwrap()
        });
        let config = config(&[
            ("CALLBACK_QUEUE_URLS", "celery=https://sqs/1/celery,other=https://sqs/1/other"),
            ("CALLBACK_QUEUE_NAMES", "celery,other"),
        ]);
        let target = Target::new(config, &sdk_config(http, Duration::from_secs(10), None));
        let sigs: Vec<Signature> = (0..25)
            .map(|i| {
                let queue = if i < 20 { "celery" } else { "other" };
                Signature::parse(&format!(r#"{{"task":"t","options":{{"task_id":"m{i}","queue":"{queue}"}}}}"#))
                    .unwrap()
            })
            .collect();
        let outs: Vec<Outgoing> = sigs.iter().map(|sig| outgoing(sig, "[[1]]", &String::new)).collect();
        let results = target.send_all(&Namespace::default(), &outs).await;
        for (i, result) in results.iter().enumerate() {
            match i {
                7 => assert!(
                    matches!(result, Err(DispatchError::Refused { code, .. }) if code == "InvalidParameterValue")
                ),
                _ => assert!(result.is_ok(), "{i}: {result:?}"),
            }
        }
        let mut requests = requests.lock().unwrap().clone();
        requests.sort();
        let range = |r: std::ops::Range<usize>| r.map(|i| i.to_string()).collect::<Vec<_>>();
        let celery = "https://sqs/1/celery".to_owned();
        let expected = vec![
            (celery.clone(), range(0..10)),
            (celery.clone(), range(10..20)),
            (celery, vec!["3".to_owned()]),
            ("https://sqs/1/other".to_owned(), range(20..25)),
        ];
        let mut expected = expected;
        expected.sort();
        assert_eq!(requests, expected, "10 a batch, per queue; only entry 3 sent again");
    }
}
