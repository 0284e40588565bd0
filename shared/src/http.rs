//! HTTP glue for the functions: routes, request checks (auth, body cap,
//! query) and one place where every outcome becomes a response.
//!
//! A function's `main` matches on [`Route`] for the routes it serves and
//! passes everything else to [`Route::not_here`] (404, as API Gateway answers
//! an unknown route).

use lambda_http::request::RequestContext;
use lambda_http::{Body, Request, RequestExt, Response};
use std::future::Future;
use std::time::Duration;

use crate::config::{AuthMode, Config};
use crate::error::ApiError;
use crate::ids::{GroupId, Namespace, TaskId};
pub use crate::service::{App, Reply};
use crate::tenants::Caller;

/// Header carrying how many DynamoDB requests served this request.
pub const DDB_CALLS_HEADER: &str = "x-dynachord-ddb-calls";
/// The S3 requests a response cost (large results).
pub const S3_CALLS_HEADER: &str = "x-dynachord-s3-calls";
/// The request's id, as its log lines and metrics carry it.
pub const REQUEST_ID_HEADER: &str = "x-dynachord-request-id";

/// The v1 routes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    PutTask(TaskId),
    /// `POST /v1/tasks/{task_id}/upload`: a presigned URL to upload a large result.
    UploadTask(TaskId),
    /// With the long-poll `wait` from the query string.
    GetTask(TaskId, Duration),
    DeleteTask(TaskId),
    BatchGet,
    PutGroup(GroupId),
    /// `POST /v1/groups/{group_id}/upload`: a presigned URL to upload a large saved group.
    UploadGroup(GroupId),
    GetGroup(GroupId),
    DeleteGroup(GroupId),
    /// With, from the query string, whether to list the failed parts' ids
    /// (`failed_ids=true`).
    GetChord(GroupId, bool),
    /// `POST /v1/chords/{group_id}/redrive`: send a chord's failed parts again.
    RedriveChord(GroupId),
    /// `POST /v1/cache/get-or-delegate`: the processing cache, one key or many.
    CacheGetOrDelegate,
    /// `POST /v1/cache/entry`: an entry's state.
    CacheEntry,
    /// `POST /v1/cache/invalidate`.
    CacheInvalidate,
}

impl Route {
    /// The route's name: the `Route` dimension of its metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Route::PutTask(_) => "PutTask",
            Route::UploadTask(_) => "UploadTask",
            Route::GetTask(..) => "GetTask",
            Route::DeleteTask(_) => "DeleteTask",
            Route::BatchGet => "BatchGet",
            Route::PutGroup(_) => "PutGroup",
            Route::UploadGroup(_) => "UploadGroup",
            Route::GetGroup(_) => "GetGroup",
            Route::DeleteGroup(_) => "DeleteGroup",
            Route::GetChord(..) => "GetChord",
            Route::RedriveChord(_) => "RedriveChord",
            Route::CacheGetOrDelegate => "CacheGetOrDelegate",
            Route::CacheEntry => "CacheEntry",
            Route::CacheInvalidate => "CacheInvalidate",
        }
    }

    /// The answer of a function that does not serve this route.
    pub fn not_here(self) -> ApiError {
        let (method, path) = match self {
            Route::PutTask(id) => ("PUT", format!("/v1/tasks/{id}")),
            Route::UploadTask(id) => ("POST", format!("/v1/tasks/{id}/upload")),
            Route::GetTask(id, _) => ("GET", format!("/v1/tasks/{id}")),
            Route::DeleteTask(id) => ("DELETE", format!("/v1/tasks/{id}")),
            Route::BatchGet => ("POST", "/v1/tasks/batch-get".to_owned()),
            Route::PutGroup(id) => ("PUT", format!("/v1/groups/{id}")),
            Route::UploadGroup(id) => ("POST", format!("/v1/groups/{id}/upload")),
            Route::GetGroup(id) => ("GET", format!("/v1/groups/{id}")),
            Route::DeleteGroup(id) => ("DELETE", format!("/v1/groups/{id}")),
            Route::GetChord(id, _) => ("GET", format!("/v1/chords/{id}")),
            Route::RedriveChord(id) => ("POST", format!("/v1/chords/{id}/redrive")),
            Route::CacheGetOrDelegate => ("POST", "/v1/cache/get-or-delegate".to_owned()),
            Route::CacheEntry => ("POST", "/v1/cache/entry".to_owned()),
            Route::CacheInvalidate => ("POST", "/v1/cache/invalidate".to_owned()),
        };
        ApiError::NoRoute { method: method.to_owned(), path }
    }
}

/// A request that passed the checks every route shares.
#[derive(Debug)]
pub struct Incoming {
    pub route: Route,
    /// The caller's namespace: the prefix of every key it may touch.
    pub ns: Namespace,
    pub body: Vec<u8>,
}

/// Matches method and path to a route. Ids are validated here, so a handler
/// only ever sees valid ones.
pub fn route(method: &str, path: &str, wait: Option<&str>, max_wait: Duration) -> Result<Route, ApiError> {
    let no_route = || ApiError::NoRoute { method: method.to_owned(), path: path.to_owned() };
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    // Path segments arrive percent-encoded (`a%3Ab` is the id `a:b`).
    // `batch-get` names the batch route; no task by that name is addressable,
    // by any method, whether a router stands in front or not (behind a
    // function URL the function is the only router).
    let task = |raw: &str| match percent_decode(raw) {
        id if id == "batch-get" => Err(no_route()),
        id => TaskId::parse(&id).map_err(ApiError::from),
    };
    let group = |raw: &str| GroupId::parse(&percent_decode(raw)).map_err(ApiError::from);
    match (method, segments.as_slice()) {
        ("POST", ["", "v1", "tasks", "batch-get"]) => Ok(Route::BatchGet),
        ("PUT", ["", "v1", "tasks", id]) => Ok(Route::PutTask(task(id)?)),
        ("POST", ["", "v1", "tasks", id, "upload"]) => Ok(Route::UploadTask(task(id)?)),
        ("GET", ["", "v1", "tasks", id]) => {
            let wait = match wait {
                None => None,
                Some(raw) => Some(
                    raw.trim()
                        .parse::<f64>()
                        .map_err(|_| ApiError::BadQuery(format!("wait {raw:?} is not a number of seconds")))?,
                ),
            };
            Ok(Route::GetTask(task(id)?, crate::service::parse_wait(wait, max_wait)?))
        }
        ("DELETE", ["", "v1", "tasks", id]) => Ok(Route::DeleteTask(task(id)?)),
        ("PUT", ["", "v1", "groups", id]) => Ok(Route::PutGroup(group(id)?)),
        ("POST", ["", "v1", "groups", id, "upload"]) => Ok(Route::UploadGroup(group(id)?)),
        ("GET", ["", "v1", "groups", id]) => Ok(Route::GetGroup(group(id)?)),
        ("DELETE", ["", "v1", "groups", id]) => Ok(Route::DeleteGroup(group(id)?)),
        ("GET", ["", "v1", "chords", id]) => Ok(Route::GetChord(group(id)?, false)),
        ("POST", ["", "v1", "chords", id, "redrive"]) => Ok(Route::RedriveChord(group(id)?)),
        ("POST", ["", "v1", "cache", "get-or-delegate"]) => Ok(Route::CacheGetOrDelegate),
        ("POST", ["", "v1", "cache", "entry"]) => Ok(Route::CacheEntry),
        ("POST", ["", "v1", "cache", "invalidate"]) => Ok(Route::CacheInvalidate),
        _ => Err(no_route()),
    }
}

/// A yes-or-no query parameter: `true` or `1`, `false` or `0`, absent (no).
fn yes_or_no(name: &str, raw: Option<&str>) -> Result<bool, ApiError> {
    match raw.map(str::trim) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ApiError::BadQuery(format!("{name} {other:?} is not true or false"))),
    }
}

/// A path segment with its `%XX` escapes decoded. A malformed escape, or
/// bytes that are not UTF-8, are left as they are: the id check refuses them.
fn percent_decode(raw: &str) -> String {
    if !raw.contains('%') {
        return raw.to_owned();
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).and_then(|&b| hex(b)), bytes.get(i + 2).and_then(|&b| hex(b))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| raw.to_owned())
}

/// The caller, from API Gateway's IAM authorizer context (which API Gateway
/// writes; a caller cannot set it); `None` without that context.
fn caller(request: &Request) -> Option<Caller> {
    match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(context)) => {
            let iam = context.authorizer.as_ref()?.iam.as_ref()?;
            Some(Caller { user_arn: iam.user_arn.clone(), account_id: iam.account_id.clone() })
        }
        _ => None,
    }
}

/// The namespace every key of this request lives in: the caller's tenant
/// (`TENANTS`), else the deployment's `NAMESPACE`.
fn namespace(config: &Config, request: &Request) -> Result<Namespace, ApiError> {
    match caller(request) {
        Some(who) => config.tenant_of(&who).ok_or_else(|| ApiError::UnknownTenant(who.describe())),
        None if config.auth_mode == AuthMode::Iam => Err(ApiError::Unauthenticated),
        None => Ok(config.namespace.clone()),
    }
}

/// The checks every route shares, cheapest first and all before any work:
/// auth and tenant, body size, route and ids.
pub fn parse<S>(app: &App<S>, request: Request) -> Result<Incoming, ApiError> {
    let ns = namespace(&app.config, &request)?;
    let size = request.body().len();
    if size > app.config.max_body_bytes {
        return Err(ApiError::BodyTooLarge { size, limit: app.config.max_body_bytes });
    }
    let query = request.query_string_parameters();
    let route = match route(request.method().as_str(), request.uri().path(), query.first("wait"), app.config.max_wait)?
    {
        Route::GetChord(id, _) => Route::GetChord(id, yes_or_no("failed_ids", query.first("failed_ids"))?),
        other => other,
    };
    let body = match request.into_body() {
        Body::Empty => Vec::new(),
        Body::Text(text) => text.into_bytes(),
        Body::Binary(bytes) => bytes,
        _ => Vec::new(),
    };
    Ok(Incoming { route, ns, body })
}

/// Serves one request: checks it, runs `serve` on it, and turns the outcome
/// into a response with the DynamoDB call count. Never fails: every error is a
/// JSON error response.
pub async fn handle<'a, S, F, Fut>(
    app: &'a App<S>,
    request: Request,
    serve: F,
) -> Result<Response<Body>, std::convert::Infallible>
where
    F: FnOnce(Incoming) -> Fut,
    Fut: Future<Output = Result<Reply, ApiError>> + 'a,
{
    let request_id = request_id(&request);
    let started = std::time::Instant::now();
    let ((outcome, route), calls) = crate::calls::counted_all(async move {
        match parse(app, request) {
            Ok(incoming) => {
                let route = incoming.route.name();
                (serve(incoming).await, route)
            }
            Err(e) => (Err(e), "Unrouted"),
        }
    })
    .await;
    record(route, &outcome, calls, started.elapsed(), &request_id);
    let mut response = respond(outcome, calls.ddb, &request_id);
    response.headers_mut().insert(S3_CALLS_HEADER, calls.s3.into());
    if let Ok(id) = request_id.parse() {
        response.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    Ok(response)
}

/// The request's metrics, one EMF line under its route: one request, its
/// latency, its DynamoDB and S3 requests, its outcome, and what the route
/// adds (hits, long-poll waits, batch sizes).
fn record(
    route: &'static str,
    outcome: &Result<Reply, ApiError>,
    calls: crate::calls::Calls,
    took: Duration,
    request_id: &str,
) {
    let (points, plain) = request_points(outcome, calls, took);
    // The request id only when something went wrong or was retried (a
    // caller has it from the answer's x-dynachord-request-id).
    let properties: &[(&str, &str)] = if plain { &[] } else { &[("request_id", request_id)] };
    crate::metrics::emit_with(&[("Route", route)], &points, properties);
}

/// A request's data points, and whether it was plainly healthy (answered
/// 2xx with no retry). A healthy request writes its metrics line alone, and
/// no more of it than it needs: retries only when there were some (their
/// sum is the figure).
fn request_points(
    outcome: &Result<Reply, ApiError>,
    calls: crate::calls::Calls,
    took: Duration,
) -> (Vec<crate::metrics::Point>, bool) {
    use crate::metrics::{self, Point};
    let mut points = vec![
        Point::count(metrics::REQUESTS, 1.0),
        Point::millis(metrics::LATENCY, took.as_secs_f64() * 1000.0),
        Point::count(metrics::DDB_CALLS, calls.ddb.into()),
    ];
    // Outcomes other than success, as API Gateway counts 4XXError and
    // 5XXError beside Count: the requests that succeeded are the rest.
    if let Err(err) = outcome {
        points.push(Point::count(
            match err.status_and_code() {
                (409, _) => metrics::REFUSED,
                (_, "throttled") => metrics::THROTTLED,
                (status, _) if status < 500 => metrics::REJECTED,
                _ => metrics::FAILED,
            },
            1.0,
        ));
    }
    if calls.ddb_retries > 0 {
        points.push(Point::count(metrics::DDB_RETRIES, calls.ddb_retries.into()));
    }
    if calls.s3 > 0 {
        points.push(Point::count(metrics::S3_CALLS, calls.s3.into()));
    }
    if let Ok(reply) = outcome {
        points.extend(reply.metrics.iter().copied());
    }
    if let Err(ApiError::ClaimRefused { .. }) = outcome {
        points.push(Point::count(metrics::TASK_RUNS_REFUSED, 1.0));
    }
    (points, outcome.is_ok() && calls.ddb_retries == 0)
}

/// The request's id: API Gateway's (which its access log records), else
/// the Lambda invocation's, else a fresh one.
fn request_id(request: &Request) -> String {
    match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(context)) => context.request_id.clone(),
        _ => None,
    }
    .or_else(|| request.lambda_context_ref().map(|c| c.request_id.clone()).filter(|id| !id.is_empty()))
    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// The response for an outcome: the reply, or the error's status and JSON.
pub fn respond(outcome: Result<Reply, ApiError>, calls: u32, request_id: &str) -> Response<Body> {
    let (status, body, retry_after) = match outcome {
        Ok(reply) => (reply.status, reply.body, None),
        Err(err) => {
            let (status, code) = err.status_and_code();
            if status >= 500 {
                tracing::error!(code, request_id, error = ?err, "request failed");
            }
            (status, err.to_json(request_id), err.retry_after())
        }
    };
    let mut builder = Response::builder().status(status).header(DDB_CALLS_HEADER, calls);
    if let Some(secs) = retry_after {
        builder = builder.header("retry-after", secs);
    }
    let body = if body.is_empty() {
        Body::Empty
    } else {
        builder = builder.header("content-type", "application/json");
        Body::Text(body)
    };
    builder.body(body).expect("status and headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const MAX: Duration = Duration::from_secs(20);

    #[test]
    fn each_request_is_counted_under_its_route_with_its_outcome() {
        use crate::metrics::{self, total_with, Point};
        let calls = crate::calls::Calls { ddb: 3, ddb_retries: 2, s3: 0 };
        let conflict = ApiError::Conflict { task_id: "t".into(), stored: "SUCCESS".into(), refused: "STARTED".into() };
        let outcomes = [
            Ok(Reply::ok("{}".into()).with(Point::count(metrics::HITS, 1.0))),
            Err(conflict),
            Err(ApiError::Throttled { retry_after_secs: 1 }),
            Err(ApiError::BadBody("x".into())),
            Err(ApiError::Unavailable { retry_after_secs: 1 }),
        ];
        for outcome in &outcomes {
            record("TestRoute", outcome, calls, Duration::from_millis(5), "r-1");
        }
        let total = |name| total_with(name, &[("Route", "TestRoute")]);
        assert_eq!(total(metrics::REQUESTS), 5.0);
        for outcome in [metrics::REFUSED, metrics::THROTTLED, metrics::REJECTED, metrics::FAILED] {
            assert_eq!(total(outcome), 1.0, "{outcome}");
        }
        assert_eq!(total("Ok"), 0.0, "a success is a request with no other outcome");
        assert_eq!((total(metrics::DDB_CALLS), total(metrics::DDB_RETRIES)), (15.0, 10.0));
        assert_eq!(
            (total(metrics::HITS), total(metrics::S3_CALLS)),
            (1.0, 0.0),
            "what the route adds; S3 only when used"
        );
        assert_eq!(total(metrics::LATENCY), 25.0);
    }

    #[test]
    fn a_healthy_request_writes_a_lean_line_and_a_troubled_one_names_itself() {
        use crate::metrics::{self, line_with};
        let healthy = crate::calls::Calls { ddb: 1, ddb_retries: 0, s3: 0 };
        let (points, plain) = request_points(&Ok(Reply::ok("{}".into())), healthy, Duration::from_micros(3214));
        assert!(plain);
        assert!(points.iter().all(|p| p.name != metrics::DDB_RETRIES), "no retries, no retries metric");
        // What CloudWatch Logs ingests per healthy request (docs/COST.md).
        let line = line_with(&[("Route", "PutTask")], &points, &[]).to_string();
        assert!(line.len() <= 280, "{} bytes: {line}", line.len());
        let retried = crate::calls::Calls { ddb: 3, ddb_retries: 2, s3: 0 };
        let (points, plain) = request_points(&Ok(Reply::ok("{}".into())), retried, Duration::from_millis(9));
        assert!(!plain && points.iter().any(|p| p.name == metrics::DDB_RETRIES && p.value == 2.0));
        let (_, plain) = request_points(&Err(ApiError::BadBody("x".into())), healthy, Duration::from_millis(1));
        assert!(!plain, "a refused request names its request id");
    }

    #[test]
    fn routes_and_ids() {
        assert_eq!(route("POST", "/v1/tasks/batch-get", None, MAX).unwrap(), Route::BatchGet);
        assert_eq!(
            route("GET", "/v1/tasks/t-1", Some("2.5"), MAX).unwrap(),
            Route::GetTask(TaskId::parse("t-1").unwrap(), Duration::from_millis(2500))
        );
        assert!(matches!(route("PUT", "/v1/groups/g1", None, MAX), Ok(Route::PutGroup(_))));
        assert!(matches!(route("POST", "/v1/tasks/t1/upload", None, MAX), Ok(Route::UploadTask(_))));
        assert!(matches!(route("POST", "/v1/groups/g1/upload", None, MAX), Ok(Route::UploadGroup(_))));
        assert!(matches!(route("POST", "/v1/tasks/batch-get/upload", None, MAX), Err(ApiError::NoRoute { .. })));
        // No method reaches a task named batch-get (nor its escaped spelling).
        for method in ["PUT", "GET", "DELETE"] {
            for path in ["/v1/tasks/batch-get", "/v1/tasks/batch%2Dget"] {
                assert!(matches!(route(method, path, None, MAX), Err(ApiError::NoRoute { .. })), "{method} {path}");
            }
        }
        assert!(matches!(route("PATCH", "/v1/tasks/t1", None, MAX), Err(ApiError::NoRoute { .. })));
        assert_eq!(route("POST", "/v1/cache/get-or-delegate", None, MAX).unwrap(), Route::CacheGetOrDelegate);
        assert_eq!(route("POST", "/v1/cache/invalidate", None, MAX).unwrap(), Route::CacheInvalidate);
        assert!(matches!(route("GET", "/v1/cache/entry", None, MAX), Err(ApiError::NoRoute { .. })));
        assert!(matches!(route("GET", "/v2/tasks/t1", None, MAX), Err(ApiError::NoRoute { .. })));
        assert!(matches!(route("GET", "/v1/tasks/a%2Fb", None, MAX), Err(ApiError::BadId(_))));
        assert_eq!(
            route("PUT", "/v1/tasks/a%3Ab%40c", None, MAX).unwrap(),
            Route::PutTask(TaskId::parse("a:b@c").unwrap())
        );
        assert!(matches!(route("GET", "/v1/groups/g%3a1", None, MAX), Ok(Route::GetGroup(g)) if g.as_str() == "g:1"));
        for bad in ["a%", "a%zz", "a%FF", "a%20b"] {
            assert!(matches!(route("GET", &format!("/v1/tasks/{bad}"), None, MAX), Err(ApiError::BadId(_))), "{bad}");
        }
        for wait in ["-1", "21", "NaN", "soon", "inf"] {
            assert!(matches!(route("GET", "/v1/tasks/t1", Some(wait), MAX), Err(ApiError::BadQuery(_))), "{wait}");
        }
    }

    fn app(auth: &str) -> App<()> {
        let auth = auth.to_owned();
        let config = Config::from_lookup(|v| match v {
            "TABLE_NAME" => Some("t".into()),
            "AUTH_MODE" => Some(auth.clone()),
            "MAX_BODY_BYTES" => Some("2048".into()),
            _ => None,
        })
        .unwrap();
        App { config, store: () }
    }

    fn request(method: &str, path: &str, body: &str) -> Request {
        lambda_http::http::Request::builder()
            .method(method)
            .uri(format!("https://example.com{path}"))
            .body(Body::Text(body.to_owned()))
            .unwrap()
    }

    #[test]
    fn iam_mode_refuses_requests_without_identity() {
        let err = parse(&app("iam"), request("GET", "/v1/tasks/t1", "")).unwrap_err();
        assert_eq!(err.status_and_code(), (401, "unauthenticated"));
        assert!(parse(&app("none"), request("GET", "/v1/tasks/t1", "")).is_ok());
    }

    /// An API Gateway (HTTP API) event for GET /v1/tasks/t1 whose IAM
    /// authorizer context names `arn`, and a header that tries to pick a tenant.
    fn signed_request(arn: &str) -> Request {
        let account = arn.split(':').nth(4).unwrap();
        let event = serde_json::json!({
            "version": "2.0", "routeKey": "GET /v1/tasks/{task_id}", "rawPath": "/v1/tasks/t1", "rawQueryString": "",
            "headers": {"x-dynachord-namespace": "tenant-b", "x-amz-namespace": "tenant-b"},
            "requestContext": {
                "accountId": "000000000000", "apiId": "api", "domainName": "example.com", "domainPrefix": "api",
                "http": {"method": "GET", "path": "/v1/tasks/t1", "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "t"},
                "requestId": "r", "routeKey": "GET /v1/tasks/{task_id}", "stage": "$default", "time": "23/Nov/2026:00:00:00 +0000", "timeEpoch": 0,
                "authorizer": {"iam": {"accessKey": "AKIA", "accountId": account, "callerId": "AIDA", "principalOrgId": null, "userArn": arn, "userId": "AIDA"}}
            },
            "isBase64Encoded": false
        });
        lambda_http::request::from_str(&event.to_string()).unwrap()
    }

    fn app_with_tenants(auth: &str, tenants: Option<&str>) -> App<()> {
        let (auth, tenants) = (auth.to_owned(), tenants.map(str::to_owned));
        let config = Config::from_lookup(|v| match v {
            "TABLE_NAME" => Some("t".into()),
            "AUTH_MODE" => Some(auth.clone()),
            "TENANTS" => tenants.clone(),
            "CALLBACK_QUEUES" => {
                Some(r#"{"tenant-a": {"*": "https://q/a/"}, "tenant-b": {"*": "https://q/b/"}}"#.into())
            }
            _ => None,
        })
        .unwrap();
        App { config, store: () }
    }

    #[test]
    fn the_namespace_comes_from_the_callers_identity_never_a_header() {
        let tenants = Some(r#"{"arn:aws:iam::111111111111:user/a": "tenant-a", "222222222222": "tenant-b"}"#);
        for auth in ["iam", "none"] {
            let app = app_with_tenants(auth, tenants);
            let ns = |arn: &str| parse(&app, signed_request(arn)).map(|i| i.ns.as_str().to_owned());
            assert_eq!(ns("arn:aws:iam::111111111111:user/a").unwrap(), "tenant-a", "{auth}");
            assert_eq!(ns("arn:aws:iam::222222222222:user/anyone").unwrap(), "tenant-b", "{auth}");
            let err = ns("arn:aws:iam::333333333333:user/c").unwrap_err();
            assert_eq!(err.status_and_code(), (403, "unknown_tenant"));
            assert!(err.to_string().contains("arn:aws:iam::333333333333:user/c"));
        }
        // Without TENANTS every caller shares NAMESPACE, whatever it sends.
        let single = app_with_tenants("iam", None);
        assert_eq!(parse(&single, signed_request("arn:aws:iam::111111111111:user/a")).unwrap().ns.as_str(), "default");
        // An empty table refuses every caller.
        let nobody = app_with_tenants("iam", Some("{}"));
        let err = parse(&nobody, signed_request("arn:aws:iam::111111111111:user/a")).unwrap_err();
        assert_eq!(err.status_and_code(), (403, "unknown_tenant"));
        // Without a caller: 401 in IAM mode, NAMESPACE with AUTH_MODE=none.
        let open = app_with_tenants("none", tenants);
        assert_eq!(parse(&open, request("GET", "/v1/tasks/t1", "")).unwrap().ns.as_str(), "default");
    }

    #[test]
    fn body_is_capped_before_parsing() {
        let err = parse(&app("none"), request("PUT", "/v1/tasks/t1", &"x".repeat(2049))).unwrap_err();
        assert_eq!(err.status_and_code(), (413, "body_too_large"));
    }

    #[test]
    fn errors_become_json_responses() {
        let resp = respond(Err(ApiError::Throttled { retry_after_secs: 1 }), 6, "r-1");
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "1");
        assert_eq!(resp.headers()[DDB_CALLS_HEADER], "6");
        let Body::Text(body) = resp.body() else { panic!("json body") };
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "throttled");
    }
}
