//! The fault stack's proxy: on loopback between the functions and DynamoDB
//! Local, it forwards every call, answers a chosen share of them with
//! DynamoDB's throttling errors or holds back batch keys as UnprocessedKeys,
//! and stops and restarts DynamoDB Local on request. Started by
//! `devstack up --faults PORT`; the functions' `AWS_ENDPOINT_URL_DYNAMODB`
//! then points here. Their SQS calls (`X-Amz-Target: AmazonSQS.*`, the chord
//! callbacks) come here too and go on to moto's server, so a rule can hold one.
//!
//! Control, on the same port (DynamoDB's API only uses `POST /`):
//!
//! - `PUT /__faults/rules/{name}` with `{"match": "...", "error": E, "share":
//!   0.5, "limit": 10}`: calls whose body contains `match` (a test's own id
//!   prefix, so tests running side by side never meet each other's faults)
//!   get error E on `share` of them (every 1/share-th, deterministic), at
//!   most `limit` times (no limit when absent). E is
//!   `ThrottlingException` or `ProvisionedThroughputExceededException` (the
//!   call is answered 400 with that error and never reaches DynamoDB), or
//!   `UnprocessedKeys` (a BatchGetItem is forwarded, then each matching key
//!   is taken out of `Responses` and returned in `UnprocessedKeys`), or
//!   `Hold`, for SQS calls only (the call is never forwarded and never
//!   answered: the caller waits, as on a hung connection, until it gives up
//!   or is killed; after 120 s the proxy drops the connection).
//! - `GET /__faults/rules/{name}`: `{"matched": n, "injected": k,
//!   "held_from": [client ports of held calls]}`.
//! - `DELETE /__faults/rules/{name}`.
//! - `POST /__faults/dynamodb/stop` and `/start`: DynamoDB Local stopped (by
//!   its PID) or started again on the same port and data directory; `start`
//!   answers once it serves. While it is down the proxy drops each
//!   connection unanswered, as a dead endpoint would.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

/// One fault rule and what it did.
#[derive(Debug, Clone)]
struct Rule {
    needle: Vec<u8>,
    error: FaultKind,
    share: f64,
    limit: Option<u64>,
    matched: u64,
    injected: u64,
    /// The client ports of the calls a Hold rule holds.
    held_from: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum FaultKind {
    Throttling,
    ProvisionedThroughput,
    UnprocessedKeys,
    Hold,
}

impl Rule {
    /// Whether the next matching call gets the fault: every 1/share-th
    /// matching call, until the limit.
    fn fire(&mut self) -> bool {
        self.matched += 1;
        let due = (self.matched as f64 * self.share).floor() > ((self.matched - 1) as f64 * self.share).floor();
        if due && self.limit.is_none_or(|limit| self.injected < limit) {
            self.injected += 1;
            true
        } else {
            false
        }
    }
}

/// DynamoDB Local, as the fault stack runs it: a process it can stop and start.
pub struct Dynamo {
    pub child: tokio::sync::Mutex<Option<tokio::process::Child>>,
    pub start: Box<dyn Fn() -> Result<tokio::process::Child, String> + Send + Sync>,
    pub port: u16,
}

impl Dynamo {
    pub async fn stop(&self) {
        if let Some(mut child) = self.child.lock().await.take() {
            if let Some(pid) = child.id() {
                crate::signal_group(pid, libc::SIGTERM);
                if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                    crate::signal_group(pid, libc::SIGKILL);
                    let _ = child.wait().await;
                }
                eprintln!("devstack: DynamoDB Local (pid {pid}) stopped on request");
            }
        }
    }

    async fn restart(&self) -> Result<(), String> {
        let mut slot = self.child.lock().await;
        if slot.is_none() {
            let child = (self.start)()?;
            eprintln!("devstack: DynamoDB Local started again, pid {}", child.id().unwrap_or(0));
            *slot = Some(child);
        }
        drop(slot);
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            if started.elapsed() > Duration::from_secs(60) {
                return Err("DynamoDB Local did not listen within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

struct Proxy {
    upstream: String,
    sqs_upstream: String,
    http: reqwest::Client,
    rules: Mutex<HashMap<String, Rule>>,
    dynamo: Arc<Dynamo>,
}

/// Serves the proxy on `port` until the process ends.
pub async fn serve(port: u16, upstream: String, sqs_upstream: String, dynamo: Arc<Dynamo>) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("fault proxy on port {port}: {e}"))?;
    let proxy = Arc::new(Proxy {
        upstream,
        sqs_upstream,
        http: reqwest::Client::new(),
        rules: Mutex::new(HashMap::new()),
        dynamo,
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let proxy = proxy.clone();
                    async move { proxy.handle(request, peer.port()).await }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                // An Err from the service (DynamoDB Local down) ends the
                // connection without an answer.
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok(())
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

impl Proxy {
    async fn handle(&self, request: Request<Incoming>, peer_port: u16) -> Result<Reply, String> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        let path = parts.uri.path().to_owned();
        if let Some(control) = path.strip_prefix("/__faults/") {
            return Ok(self.control(&parts.method, control, &body).await);
        }
        let target = parts.headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let fault = self.fault_for(&body, &target, peer_port);
        match fault {
            Some(FaultKind::Throttling) => {
                return Ok(dynamodb_error(
                    "com.amazon.coral.availability#ThrottlingException",
                    "Rate of requests exceeds the allowed throughput (injected)",
                ))
            }
            Some(FaultKind::ProvisionedThroughput) => {
                return Ok(dynamodb_error(
                    "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
                    "The level of configured provisioned throughput for the table was exceeded (injected)",
                ))
            }
            Some(FaultKind::Hold) => {
                tokio::time::sleep(Duration::from_secs(120)).await;
                return Err("held call dropped".into());
            }
            _ => {}
        }
        let upstream = if target.starts_with("AmazonSQS.") { &self.sqs_upstream } else { &self.upstream };
        let mut forward = self.http.request(parts.method.clone(), format!("{upstream}{}", parts.uri));
        for (name, value) in &parts.headers {
            if name != "host" && name != "content-length" {
                forward = forward.header(name, value);
            }
        }
        let answer = forward.body(body.clone()).send().await.map_err(|e| format!("DynamoDB Local: {e}"))?;
        let status = answer.status();
        let headers = answer.headers().clone();
        let mut answer_body = answer.bytes().await.map_err(|e| e.to_string())?;
        if fault == Some(FaultKind::UnprocessedKeys) && status.is_success() {
            answer_body = self.hold_back_keys(&body, &answer_body).unwrap_or(answer_body);
        }
        let mut response = Response::builder().status(status);
        for (name, value) in &headers {
            if name != "content-length" && name != "transfer-encoding" && name != "x-amz-crc32" {
                response = response.header(name, value);
            }
        }
        Ok(response.body(Full::new(answer_body)).expect("a valid response"))
    }

    /// The fault, if any, a rule puts on this call. UnprocessedKeys rules
    /// only apply to BatchGetItem, Hold rules to SQS calls; the others to any call.
    fn fault_for(&self, body: &[u8], target: &str, peer_port: u16) -> Option<FaultKind> {
        let mut rules = self.rules.lock().expect("rules lock");
        let mut names: Vec<&String> = rules.keys().collect();
        names.sort();
        let name = names.into_iter().find(|name| {
            let rule = &rules[*name];
            let applies = match rule.error {
                FaultKind::UnprocessedKeys => target.ends_with(".BatchGetItem"),
                FaultKind::Hold => target.starts_with("AmazonSQS."),
                _ => true,
            };
            applies && contains(body, &rule.needle)
        })?;
        let name = name.clone();
        let rule = rules.get_mut(&name).expect("rule present");
        let fired = rule.fire();
        if fired && rule.error == FaultKind::Hold {
            rule.held_from.push(peer_port);
        }
        fired.then_some(rule.error)
    }

    /// Moves every requested key that contains a matching rule's needle from
    /// `Responses` to `UnprocessedKeys`, as DynamoDB does under load.
    fn hold_back_keys(&self, request: &[u8], answer: &[u8]) -> Option<Bytes> {
        let needles: Vec<Vec<u8>> = self
            .rules
            .lock()
            .expect("rules lock")
            .values()
            .filter(|r| r.error == FaultKind::UnprocessedKeys)
            .map(|r| r.needle.clone())
            .collect();
        let request: Value = serde_json::from_slice(request).ok()?;
        let mut answer: Value = serde_json::from_slice(answer).ok()?;
        for (table, asked) in request["RequestItems"].as_object()? {
            let held: Vec<Value> = asked["Keys"]
                .as_array()?
                .iter()
                .filter(|key| needles.iter().any(|n| contains(key.to_string().as_bytes(), n)))
                .cloned()
                .collect();
            if held.is_empty() {
                continue;
            }
            if let Some(items) = answer["Responses"][table].as_array_mut() {
                items.retain(|item| !held.iter().any(|key| key_of(item, key)));
            }
            let mut unprocessed = asked.clone();
            unprocessed["Keys"] = Value::Array(held);
            answer["UnprocessedKeys"][table] = unprocessed;
        }
        Some(Bytes::from(answer.to_string()))
    }

    async fn control(&self, method: &Method, path: &str, body: &[u8]) -> Reply {
        match (method, path.split('/').collect::<Vec<_>>().as_slice()) {
            (&Method::PUT, ["rules", name]) => match parse_rule(body) {
                Ok(rule) => {
                    self.rules.lock().expect("rules lock").insert((*name).to_owned(), rule);
                    reply(StatusCode::OK, json!({"rule": name}))
                }
                Err(message) => reply(StatusCode::BAD_REQUEST, json!({"error": message})),
            },
            (&Method::GET, ["rules", name]) => match self.rules.lock().expect("rules lock").get(*name) {
                Some(rule) => reply(
                    StatusCode::OK,
                    json!({"matched": rule.matched, "injected": rule.injected, "held_from": rule.held_from}),
                ),
                None => reply(StatusCode::NOT_FOUND, json!({"error": "no such rule"})),
            },
            (&Method::DELETE, ["rules", name]) => {
                self.rules.lock().expect("rules lock").remove(*name);
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            (&Method::POST, ["dynamodb", "stop"]) => {
                self.dynamo.stop().await;
                reply(StatusCode::OK, json!({"dynamodb": "stopped"}))
            }
            (&Method::POST, ["dynamodb", "start"]) => match self.dynamo.restart().await {
                Ok(()) => reply(StatusCode::OK, json!({"dynamodb": "serving"})),
                Err(message) => reply(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": message})),
            },
            _ => reply(StatusCode::NOT_FOUND, json!({"error": "unknown control path"})),
        }
    }
}

fn parse_rule(body: &[u8]) -> Result<Rule, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("rule is not JSON: {e}"))?;
    let needle = v["match"].as_str().filter(|m| !m.is_empty()).ok_or("\"match\" must be a non-empty string")?;
    let error = match v["error"].as_str() {
        Some("ThrottlingException") => FaultKind::Throttling,
        Some("ProvisionedThroughputExceededException") => FaultKind::ProvisionedThroughput,
        Some("UnprocessedKeys") => FaultKind::UnprocessedKeys,
        Some("Hold") => FaultKind::Hold,
        other => {
            return Err(format!(
                "\"error\" {other:?} is not ThrottlingException, ProvisionedThroughputExceededException, UnprocessedKeys or Hold"
            ))
        }
    };
    let share = v["share"].as_f64().unwrap_or(1.0);
    if !(share > 0.0 && share <= 1.0) {
        return Err(format!("\"share\" {share} is not in (0, 1]"));
    }
    Ok(Rule {
        needle: needle.as_bytes().to_vec(),
        error,
        share,
        limit: v["limit"].as_u64(),
        matched: 0,
        injected: 0,
        held_from: Vec::new(),
    })
}

fn dynamodb_error(kind: &str, message: &str) -> Reply {
    Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header("content-type", "application/x-amz-json-1.0")
        .header("x-amzn-requestid", "injected-by-devstack")
        .body(Full::new(Bytes::from(json!({"__type": kind, "message": message}).to_string())))
        .expect("a valid response")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether `item` has every attribute of `key` with the same value.
fn key_of(item: &Value, key: &Value) -> bool {
    key.as_object().is_some_and(|k| k.iter().all(|(name, value)| item.get(name) == Some(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_fires_evenly_and_a_limit_stops_it() {
        let mut rule = parse_rule(br#"{"match": "x", "error": "ThrottlingException", "share": 0.25}"#).unwrap();
        let fired: Vec<bool> = (0..8).map(|_| rule.fire()).collect();
        assert_eq!(fired, [false, false, false, true, false, false, false, true]);
        let mut limited = parse_rule(br#"{"match": "x", "error": "UnprocessedKeys", "limit": 2}"#).unwrap();
        assert_eq!((0..4).map(|_| limited.fire()).collect::<Vec<_>>(), [true, true, false, false]);
        assert!(parse_rule(br#"{"match": "", "error": "ThrottlingException"}"#).is_err());
        assert!(parse_rule(br#"{"match": "x", "error": "Boom"}"#).is_err());
        assert!(parse_rule(br#"{"match": "x", "error": "ThrottlingException", "share": 0}"#).is_err());
    }

    #[test]
    fn held_back_keys_move_to_unprocessed_keys() {
        let proxy = Proxy {
            upstream: String::new(),
            sqs_upstream: String::new(),
            http: reqwest::Client::new(),
            rules: Mutex::new(HashMap::from([(
                "r".to_owned(),
                parse_rule(br#"{"match": "slow-", "error": "UnprocessedKeys"}"#).unwrap(),
            )])),
            dynamo: Arc::new(Dynamo {
                child: tokio::sync::Mutex::new(None),
                start: Box::new(|| Err("not in this test".into())),
                port: 0,
            }),
        };
        let key = |id: &str| json!({"pk": {"S": format!("ns/task/{id}")}, "sk": {"S": "_"}});
        let item = |id: &str| json!({"pk": {"S": format!("ns/task/{id}")}, "sk": {"S": "_"}, "m": {"S": "meta"}});
        let request = json!({"RequestItems": {"t": {"Keys": [key("fast-1"), key("slow-2")], "ConsistentRead": true}}});
        let answer = json!({"Responses": {"t": [item("fast-1"), item("slow-2")]}, "UnprocessedKeys": {}});
        let out: Value = serde_json::from_slice(
            &proxy.hold_back_keys(request.to_string().as_bytes(), answer.to_string().as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(out["Responses"]["t"], json!([item("fast-1")]));
        assert_eq!(out["UnprocessedKeys"]["t"], json!({"Keys": [key("slow-2")], "ConsistentRead": true}));
    }
}
