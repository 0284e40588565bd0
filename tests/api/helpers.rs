//! Typed request helpers so a test reads like the scenario.

use reqwest::Method;
use serde_json::Value;

/// A client of the local stack with ids of its own.
pub struct Api {
    http: reqwest::Client,
    base: String,
    prefix: String,
    /// When set, requests go to the functions as API Gateway events whose IAM
    /// authorizer context names this caller (see [`Api::as_caller`]).
    caller: Option<String>,
}

/// A response: status, the DynamoDB calls it cost, and the JSON body (Null when empty).
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub ddb_calls: Option<u32>,
    pub text: String,
    pub json: Value,
}

impl Resp {
    /// The `error.code` of an error response.
    pub fn code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }

    #[track_caller]
    pub fn expect(self, status: u16) -> Self {
        assert_eq!(self.status, status, "unexpected response: {}", self.text);
        self
    }

    /// Asserts a JSON error with this status and code and a message.
    #[track_caller]
    pub fn expect_error(self, status: u16, code: &str) -> Self {
        assert_eq!((self.status, self.code()), (status, code), "unexpected response: {}", self.text);
        assert!(self.json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", self.text);
        self
    }
}

impl Api {
    pub fn new() -> Self {
        let base = std::env::var("DYNACHORD_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9000".into());
        Self {
            http: reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap(),
            base,
            prefix: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            caller: None,
        }
    }

    /// The same client (same ids) acting as the IAM caller `arn`. cargo lambda
    /// watch's router sends no authorizer context, so each request goes to
    /// its function's invoke endpoint as the event API Gateway would send
    /// after IAM authorization: the function sees exactly what it sees on
    /// AWS, and DynamoDB Local is the real one.
    pub fn as_caller(&self, arn: &str) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            prefix: self.prefix.clone(),
            caller: Some(arn.to_owned()),
        }
    }

    /// The same client (same ids) with requests sent under `prefix` (a
    /// function's own URL on the local stack: `/lambda-url/<function>`).
    pub fn under(&self, prefix: &str) -> Self {
        Self {
            http: self.http.clone(),
            base: format!("{}{prefix}", self.base),
            prefix: self.prefix.clone(),
            caller: self.caller.clone(),
        }
    }

    /// Sends `event` to `function`'s invoke endpoint and reads the HTTP
    /// answer in Lambda's reply back as a response.
    pub async fn invoke_event(&self, function: &str, event: &Value) -> Resp {
        let invoked = self
            .send_http(
                Method::POST,
                &format!("/2015-03-31/functions/{function}/invocations"),
                Some(event.to_string().into_bytes()),
            )
            .await;
        assert_eq!(invoked.status, 200, "invoke {function}: {}", invoked.text);
        let answer = &invoked.json;
        let text = answer["body"].as_str().unwrap_or("").to_owned();
        let header = |name: &str| answer["headers"][name].as_str().map(str::to_owned);
        Resp {
            status: answer["statusCode"].as_u64().expect("a statusCode") as u16,
            ddb_calls: header("x-dynachord-ddb-calls").and_then(|v| v.parse().ok()),
            json: if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) },
            text,
        }
    }

    /// An id no other test uses.
    pub fn id(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<String>) -> Resp {
        match &self.caller {
            Some(arn) => self.invoke_as(arn, method, path, body).await,
            None => self.send_http(method, path, body.map(String::into_bytes)).await,
        }
    }

    /// `body` as it is, bytes that need not be UTF-8, over HTTP as a worker sends it.
    pub async fn call_bytes(&self, method: Method, path: &str, body: Vec<u8>) -> Resp {
        self.send_http(method, path, Some(body)).await
    }

    /// The request over HTTP to cargo lambda watch, as a worker sends it.
    async fn send_http(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Resp {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = request.send().await.unwrap_or_else(|e| {
            panic!("no local stack at {}: {e}. Run ./dev test, or ./dev up in another terminal", self.base)
        });
        let status = response.status().as_u16();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let ddb_calls = header("x-dynachord-ddb-calls").and_then(|v| v.parse().ok());
        let text = response.text().await.unwrap();
        let json = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::Null) };
        Resp { status, ddb_calls, text, json }
    }

    /// Sends an API Gateway (HTTP API, payload 2.0) event to the function
    /// serving `method path`, and reads its answer back as a response.
    async fn invoke_as(&self, arn: &str, method: Method, path: &str, body: Option<String>) -> Resp {
        let (raw_path, query) = path.split_once('?').unwrap_or((path, ""));
        let function = match (method.as_str(), raw_path) {
            ("POST", "/v1/tasks/batch-get") => "batch-fetch",
            ("GET", _) => "fetch",
            _ => "store",
        };
        let event = api_gateway_event(method.as_str(), raw_path, query, body.as_deref().map(str::as_bytes), Some(arn));
        self.invoke_event(function, &event).await
    }

    pub async fn put_task(&self, id: &str, meta: Value) -> Resp {
        self.put_task_raw(id, &meta.to_string()).await
    }

    pub async fn put_task_raw(&self, id: &str, body: &str) -> Resp {
        self.call(Method::PUT, &format!("/v1/tasks/{id}"), Some(body.to_owned())).await
    }

    pub async fn get_task(&self, id: &str) -> Resp {
        self.call(Method::GET, &format!("/v1/tasks/{id}"), None).await
    }

    pub async fn get_task_wait(&self, id: &str, wait: f64) -> Resp {
        self.call(Method::GET, &format!("/v1/tasks/{id}?wait={wait}"), None).await
    }

    pub async fn forget(&self, id: &str) -> Resp {
        self.call(Method::DELETE, &format!("/v1/tasks/{id}"), None).await
    }

    pub async fn batch_get(&self, ids: &[String], wait: Option<f64>) -> Resp {
        let mut body = serde_json::json!({ "task_ids": ids });
        if let Some(wait) = wait {
            body["wait"] = wait.into();
        }
        self.batch_get_raw(&body.to_string()).await
    }

    pub async fn batch_get_raw(&self, body: &str) -> Resp {
        self.call(Method::POST, "/v1/tasks/batch-get", Some(body.to_owned())).await
    }

    pub async fn put_group(&self, id: &str, body: &str) -> Resp {
        self.call(Method::PUT, &format!("/v1/groups/{id}"), Some(body.to_owned())).await
    }

    pub async fn get_group(&self, id: &str) -> Resp {
        self.call(Method::GET, &format!("/v1/groups/{id}"), None).await
    }

    pub async fn delete_group(&self, id: &str) -> Resp {
        self.call(Method::DELETE, &format!("/v1/groups/{id}"), None).await
    }

    /// Stores `n` SUCCESS results `{"i": k}` under fresh ids, 16 at a time.
    pub async fn store_many(&self, name: &str, n: usize) -> Vec<String> {
        use futures::StreamExt;
        let ids: Vec<String> = (0..n).map(|i| self.id(&format!("{name}-{i}"))).collect();
        futures::stream::iter(ids.iter().enumerate())
            .map(|(i, id)| async move {
                self.put_task(id, serde_json::json!({"status": "SUCCESS", "result": {"i": i}})).await.expect(200);
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
        ids
    }
}

/// Polls `probe` until it gives `Some`, and returns that; panics naming
/// `what` if `limit` passes first. Tests wait for conditions this way, never
/// for a fixed time.
pub async fn poll_until<T, F, Fut>(what: &str, limit: std::time::Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "gave up after {limit:?} waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(500));
    }
}

/// Hex of random bytes: compresses to about half, so `len` characters
/// store as about `len / 2` bytes.
pub fn random_hex(len: usize) -> String {
    (0..len.div_ceil(32)).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect::<String>()[..len].to_owned()
}

/// A Celery-shaped SUCCESS meta.
pub fn success(result: Value) -> Value {
    serde_json::json!({"status": "SUCCESS", "result": result, "traceback": null, "children": []})
}

/// The event API Gateway's HTTP API (payload format 2.0) sends a function for
/// `method path?query` with `body`; with `caller`, the IAM authorizer context
/// of that caller (API Gateway writes it after checking the signature; a
/// client cannot set it). A body that is not UTF-8 is base64-encoded, as API
/// Gateway does.
pub fn api_gateway_event(method: &str, path: &str, query: &str, body: Option<&[u8]>, caller: Option<&str>) -> Value {
    use base64::Engine;
    let mut event = serde_json::json!({
        "version": "2.0", "routeKey": "$default", "rawPath": path, "rawQueryString": query,
        "headers": {"content-type": "application/json"},
        "requestContext": {"accountId": "123456789012", "apiId": "local", "domainName": "localhost",
            "domainPrefix": "localhost", "http": {"method": method, "path": path,
            "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "dynachord-tests"}, "requestId": uuid::Uuid::new_v4().to_string(),
            "routeKey": "$default", "stage": "$default", "time": "23/Nov/2026:09:00:00 +0000",
            "timeEpoch": 1_795_000_000_000u64},
        "isBase64Encoded": false,
    });
    if !query.is_empty() {
        let params: serde_json::Map<String, Value> = query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), Value::from(v)))
            .collect();
        event["queryStringParameters"] = Value::Object(params);
    }
    match body.map(std::str::from_utf8) {
        None => {}
        Some(Ok(text)) => event["body"] = text.into(),
        Some(Err(_)) => {
            event["body"] = base64::engine::general_purpose::STANDARD.encode(body.unwrap()).into();
            event["isBase64Encoded"] = true.into();
        }
    }
    if let Some(arn) = caller {
        let account = arn.split(':').nth(4).unwrap_or("");
        event["requestContext"]["authorizer"] = serde_json::json!({"iam": {
            "accessKey": "AKIALOCAL", "accountId": account, "callerId": "AIDALOCAL", "cognitoIdentity": null,
            "principalOrgId": null, "userArn": arn, "userId": "AIDALOCAL"}});
    }
    event
}
