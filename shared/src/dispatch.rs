//! Where a joined chord's callback goes: onto SQS as a Celery protocol-2 task
//! message in kombu's SQS envelope (a plain Celery worker on the SQS broker
//! runs it), or to a Lambda function as an asynchronous invoke.
//!
//! Messages are built byte for byte as `CELERY_WIRE.md` describes; a message
//! larger than its target accepts is a [`DispatchError::TooLarge`], which fails
//! the chord with a clear error instead of dropping it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;

use crate::chord::Signature;

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("callback message is {size} bytes; {target} accepts at most {limit}")]
    TooLarge { size: usize, limit: usize, target: &'static str },
    #[error("no queue URL for queue {0:?}: set CALLBACK_QUEUE_URLS or CALLBACK_QUEUE_URL_PREFIX")]
    UnknownQueue(String),
    #[error("{target} {name:?} does not exist")]
    NoSuchTarget { target: &'static str, name: String },
    #[error("sending the callback failed: {0}")]
    Send(String),
}

impl DispatchError {
    /// Whether trying again may help (a send failure) or not (too large, no
    /// queue URL, a queue or function that does not exist).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Send(_))
    }
}

/// Python's `repr` of a JSON value, as Celery's `argsrepr`/`kwargsrepr` and
/// exception reprs show it.
pub fn py_repr(value: &Value) -> String {
    match value {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => py_str(s),
        Value::Array(items) => format!("[{}]", items.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter().map(|(k, v)| format!("{}: {}", py_str(k), py_repr(v))).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// A tuple's repr: `(1,)` for one item, `(1, 2)` for more.
pub fn py_tuple(items: &[Value]) -> String {
    match items {
        [one] => format!("({},)", py_repr(one)),
        _ => format!("({})", items.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
    }
}

fn py_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// What a task message needs beyond the signature.
pub struct MessageContext<'a> {
    /// The header group's id (the chord's id).
    pub group_id: &'a str,
    /// The last header task.
    pub parent_id: Option<&'a str>,
    pub root_id: Option<&'a str>,
}

/// The SQS message body of a Celery protocol-2 task message for `sig` with
/// `args` (a JSON array, already including the chord results when there are
/// any): base64 of kombu's JSON envelope, whose `body` is base64 of
/// `[args, kwargs, embed]`.
pub fn celery_sqs_body(sig: &Signature, args: &str, queue: &str, cx: &MessageContext<'_>) -> String {
    let kwargs = Value::Object(sig.kwargs.clone());
    let option = |name: &str| sig.options.get(name).cloned().unwrap_or(Value::Null);
    let embed = json!({
        "callbacks": option("link"),
        "errbacks": option("link_error"),
        "chain": null,
        "chord": null,
    });
    // args stays raw JSON text so results round-trip exactly.
    let body = format!("[{args},{kwargs},{embed}]");
    let args_value: Vec<Value> = serde_json::from_str(args).unwrap_or_default();
    let task_id = sig.task_id.as_str();
    let group = sig.options.get("group_id").and_then(Value::as_str).unwrap_or(cx.group_id);
    let envelope = json!({
        "body": B64.encode(body.as_bytes()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": sig.task,
            "id": task_id,
            "shadow": null,
            "eta": null,
            "expires": null,
            "group": group,
            "group_index": null,
            "retries": 0,
            "timelimit": [null, null],
            "root_id": sig.options.get("root_id").and_then(Value::as_str).or(cx.root_id),
            "parent_id": sig.options.get("parent_id").and_then(Value::as_str).or(cx.parent_id),
            "argsrepr": py_tuple(&args_value),
            "kwargsrepr": py_repr(&kwargs),
            "origin": "dynachord@chord-join",
            "ignore_result": false,
            "replaced_task_nesting": 0,
            "stamped_headers": null,
            "stamps": {},
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": option("reply_to"),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": uuid::Uuid::new_v4().to_string(),
        },
    });
    B64.encode(envelope.to_string().as_bytes())
}

/// kombu's SQS queue naming: `.` becomes `-`, other punctuation but `-` and
/// `_` becomes `_`.
pub fn kombu_queue_name(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '.' => '-',
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => c,
            _ => '_',
        })
        .collect()
}

/// Callback targets configuration (chord-join only), from the environment.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// `CALLBACK_TARGET`: `sqs` (default) or `lambda`.
    pub lambda_function: Option<String>,
    /// `CALLBACK_QUEUE_URLS`: `name=url,name=url`, a predefined map.
    pub queue_urls: HashMap<String, String>,
    /// `CALLBACK_QUEUE_URL_PREFIX`: URL the kombu queue name is appended to.
    pub queue_url_prefix: Option<String>,
    /// `CALLBACK_DEFAULT_QUEUE` (default `celery`): for callbacks without `options.queue`.
    pub default_queue: String,
    /// `CALLBACK_MAX_BYTES` (default 262144, SQS's classic cap and Lambda's async payload cap).
    pub max_bytes: usize,
}

impl TargetConfig {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, crate::config::ConfigError> {
        use crate::config::ConfigError;
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let lambda_function = match var("CALLBACK_TARGET").as_deref() {
            None | Some("sqs") => None,
            Some("lambda") => Some(var("CALLBACK_LAMBDA_FUNCTION").ok_or(ConfigError {
                var: "CALLBACK_LAMBDA_FUNCTION",
                message: "is required when CALLBACK_TARGET=lambda".into(),
            })?),
            Some(other) => {
                return Err(ConfigError { var: "CALLBACK_TARGET", message: format!("{other:?} is not sqs or lambda") })
            }
        };
        let mut queue_urls = HashMap::new();
        for pair in var("CALLBACK_QUEUE_URLS").unwrap_or_default().split(',').filter(|p| !p.trim().is_empty()) {
            let (name, url) = pair
                .split_once('=')
                .ok_or(ConfigError { var: "CALLBACK_QUEUE_URLS", message: format!("{pair:?} is not name=url") })?;
            queue_urls.insert(name.trim().to_owned(), url.trim().to_owned());
        }
        let max_bytes = match var("CALLBACK_MAX_BYTES") {
            None => 262_144,
            Some(raw) => raw.trim().parse().map_err(|_| ConfigError {
                var: "CALLBACK_MAX_BYTES",
                message: format!("{raw:?} is not a whole number"),
            })?,
        };
        Ok(Self {
            lambda_function,
            queue_urls,
            queue_url_prefix: var("CALLBACK_QUEUE_URL_PREFIX"),
            default_queue: var("CALLBACK_DEFAULT_QUEUE").unwrap_or_else(|| "celery".into()),
            max_bytes,
        })
    }

    /// The URL of the queue a callback names (or the default queue).
    pub fn queue_url(&self, queue: &str) -> Result<String, DispatchError> {
        if let Some(url) = self.queue_urls.get(queue) {
            return Ok(url.clone());
        }
        match &self.queue_url_prefix {
            Some(prefix) => Ok(format!("{prefix}{}", kombu_queue_name(queue))),
            None => Err(DispatchError::UnknownQueue(queue.to_owned())),
        }
    }
}

/// Sends callbacks and errbacks.
#[derive(Debug, Clone)]
pub struct Target {
    config: TargetConfig,
    sqs: aws_sdk_sqs::Client,
    lambda: aws_sdk_lambda::Client,
}

impl Target {
    pub fn new(config: TargetConfig, shared: &aws_config::SdkConfig) -> Self {
        Self { config, sqs: aws_sdk_sqs::Client::new(shared), lambda: aws_sdk_lambda::Client::new(shared) }
    }

    fn check_size(&self, size: usize, target: &'static str) -> Result<(), DispatchError> {
        if size > self.config.max_bytes {
            return Err(DispatchError::TooLarge { size, limit: self.config.max_bytes, target });
        }
        Ok(())
    }

    /// Sends the task `sig` with `args` (JSON array text). On the Lambda
    /// target, `event` is sent instead: a JSON document for non-Celery users.
    pub async fn send(
        &self,
        sig: &Signature,
        args: &str,
        event: impl FnOnce() -> String,
        cx: &MessageContext<'_>,
    ) -> Result<(), DispatchError> {
        if let Some(function) = &self.config.lambda_function {
            let payload = event();
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
                    _ => DispatchError::Send(aws_sdk_lambda::error::DisplayErrorContext(&e).to_string()),
                })?;
            return Ok(());
        }
        let queue = sig.options.get("queue").and_then(Value::as_str).unwrap_or(&self.config.default_queue).to_owned();
        let url = self.config.queue_url(&queue)?;
        let body = celery_sqs_body(sig, args, &queue, cx);
        self.check_size(body.len(), "SQS")?;
        let mut request = self.sqs.send_message().queue_url(&url).message_body(body);
        if url.ends_with(".fifo") {
            // FIFO queues drop a second message with the same id within 5 minutes.
            request = request.message_group_id(cx.group_id).message_deduplication_id(sig.task_id.as_str());
        }
        request.send().await.map_err(|e| match e.as_service_error() {
            Some(s) if s.is_queue_does_not_exist() => {
                DispatchError::NoSuchTarget { target: "SQS queue", name: url.clone() }
            }
            _ => DispatchError::Send(aws_sdk_sqs::error::DisplayErrorContext(&e).to_string()),
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_reprs() {
        assert_eq!(py_repr(&json!(["boom", 42, null, true, 1.5])), "['boom', 42, None, True, 1.5]");
        assert_eq!(py_repr(&json!("it's")), "\"it's\"");
        assert_eq!(py_repr(&json!("a'b\"c\n")), "'a\\'b\"c\\n'");
        assert_eq!(py_repr(&json!({"a": [1]})), "{'a': [1]}");
        assert_eq!(py_tuple(&[json!([1, 2])]), "([1, 2],)");
        assert_eq!(py_tuple(&[json!(1), json!("x")]), "(1, 'x')");
        assert_eq!(py_tuple(&[]), "()");
    }

    #[test]
    fn kombu_names_queues_like_kombu() {
        assert_eq!(kombu_queue_name("proj.high"), "proj-high");
        assert_eq!(kombu_queue_name("a b/c_d-e"), "a_b_c_d-e");
    }

    #[test]
    fn the_sqs_body_is_kombus_envelope_around_celerys_message() {
        let sig = Signature::parse(
            r#"{"task":"proj.tasks.tsum","args":[7],"kwargs":{"k":1},"options":{"task_id":"cb-id","reply_to":"oid","group_id":"g1","link_error":[{"task":"proj.err"}]},"subtask_type":null,"immutable":false}"#,
        )
        .unwrap();
        let cx = MessageContext { group_id: "g1", parent_id: Some("t3"), root_id: None };
        let body = celery_sqs_body(&sig, r#"[[1,2,123456789012345678901234567890],7]"#, "celery", &cx);
        let envelope: Value = serde_json::from_slice(&B64.decode(body).unwrap()).unwrap();
        let headers = &envelope["headers"];
        assert_eq!((headers["task"].as_str(), headers["id"].as_str()), (Some("proj.tasks.tsum"), Some("cb-id")));
        assert_eq!(headers["group"], "g1");
        assert_eq!(headers["parent_id"], "t3");
        assert_eq!(headers["kwargsrepr"], "{'k': 1}");
        assert_eq!(envelope["properties"]["reply_to"], "oid");
        assert_eq!(envelope["properties"]["delivery_info"]["routing_key"], "celery");
        assert_eq!(envelope["properties"]["body_encoding"], "base64");
        assert_eq!(envelope["content-type"], "application/json");
        let inner = String::from_utf8(B64.decode(envelope["body"].as_str().unwrap()).unwrap()).unwrap();
        assert!(
            inner.starts_with("[[[1,2,123456789012345678901234567890],7],{\"k\":1},"),
            "results stay exact: {inner}"
        );
        let inner: Value = serde_json::from_str(&inner).unwrap();
        assert_eq!(inner[2]["errbacks"], json!([{"task": "proj.err"}]));
        assert_eq!(inner[2]["chord"], Value::Null);
    }

    /// The real Lambda and SQS clients over a scripted HTTP layer that records requests.
    fn target(config: TargetConfig) -> (Target, std::sync::Arc<std::sync::Mutex<Vec<(String, String, String)>>>) {
        use aws_smithy_http_client::test_util::infallible_client_fn;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        let http = infallible_client_fn(move |req: lambda_http::http::Request<aws_smithy_types::body::SdkBody>| {
            let invocation =
                req.headers().get("x-amz-invocation-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let body = String::from_utf8_lossy(req.body().bytes().unwrap_or_default()).into_owned();
            log.lock().unwrap().push((req.uri().to_string(), invocation, body));
            lambda_http::http::Response::builder().status(202).body("").unwrap()
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

    #[tokio::test]
    async fn the_lambda_target_invokes_asynchronously_with_the_joined_results() {
        let config = TargetConfig::from_lookup(|v| match v {
            "CALLBACK_TARGET" => Some("lambda".into()),
            "CALLBACK_LAMBDA_FUNCTION" => Some("on-chord".into()),
            "CALLBACK_MAX_BYTES" => Some("200".into()),
            _ => None,
        })
        .unwrap();
        let (target, seen) = target(config);
        let sig = Signature::parse(r#"{"task":"t","options":{"task_id":"cb"}}"#).unwrap();
        let cx = MessageContext { group_id: "g1", parent_id: None, root_id: None };
        let event = r#"{"chord_id":"g1","results":[1,2]}"#;
        target.send(&sig, "[[1,2]]", || event.to_owned(), &cx).await.unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        let (uri, invocation, body) = &seen[0];
        assert!(uri.contains("/functions/on-chord/invocations"), "{uri}");
        assert_eq!(invocation, "Event", "asynchronous invoke");
        assert_eq!(body, event);
        let big = format!(r#"{{"results":"{}"}}"#, "x".repeat(300));
        let err = target.send(&sig, "[]", || big, &cx).await.unwrap_err();
        assert!(matches!(err, DispatchError::TooLarge { limit: 200, .. }) && err.is_permanent(), "{err}");
    }

    #[tokio::test]
    async fn the_sqs_target_needs_a_queue_url_and_respects_the_cap() {
        let (target, seen) = target(TargetConfig::from_lookup(|_| None).unwrap());
        let sig = Signature::parse(r#"{"task":"t","options":{"task_id":"cb","queue":"proj.high"}}"#).unwrap();
        let cx = MessageContext { group_id: "g1", parent_id: None, root_id: None };
        let err = target.send(&sig, "[[1]]", String::new, &cx).await.unwrap_err();
        assert!(matches!(&err, DispatchError::UnknownQueue(q) if q == "proj.high") && err.is_permanent());
        assert!(seen.lock().unwrap().is_empty(), "nothing sent");
    }

    #[test]
    fn queue_urls_come_from_the_map_or_the_prefix() {
        let config = TargetConfig::from_lookup(|v| match v {
            "CALLBACK_QUEUE_URLS" => Some("special=https://q/special-url".into()),
            "CALLBACK_QUEUE_URL_PREFIX" => Some("https://sqs/123/".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.queue_url("special").unwrap(), "https://q/special-url");
        assert_eq!(config.queue_url("proj.high").unwrap(), "https://sqs/123/proj-high");
        let bare = TargetConfig::from_lookup(|_| None).unwrap();
        assert!(matches!(bare.queue_url("celery"), Err(DispatchError::UnknownQueue(_))));
        let err = TargetConfig::from_lookup(|v| (v == "CALLBACK_TARGET").then(|| "lambda".into())).unwrap_err();
        assert_eq!(err.var, "CALLBACK_LAMBDA_FUNCTION");
    }
}
