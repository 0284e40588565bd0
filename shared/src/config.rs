//! The one configuration, read from the environment once at init. Every limit
//! the service enforces lives here with its default, so the documented limits
//! (README, "Limits") and the enforced ones cannot drift apart.

use std::collections::HashMap;
use std::time::Duration;

use crate::celery::kombu_queue_name;
use crate::ids::Namespace;
use crate::tenants::TenantMap;

/// Whether requests must carry API Gateway's IAM authorizer context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Deployed default: a request without the IAM authorizer context is 401.
    Iam,
    /// The local stack: no authentication.
    None,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `TABLE_NAME` (required): the DynamoDB table.
    pub table_name: String,
    /// `NAMESPACE` (default `default`): the key prefix of every caller when
    /// `TENANTS` is unset, and of requests without a caller (`AUTH_MODE=none`).
    pub namespace: Namespace,
    /// `TENANTS` (default unset): caller identity → namespace (see
    /// [`crate::tenants`]). Unset: every caller is in `NAMESPACE`; set, only
    /// the callers it names are served (`{}` refuses everyone).
    pub tenants: Option<TenantMap>,
    /// `RESULT_TTL_SECONDS` (default 86400, Celery's `result_expires`).
    pub result_ttl: Duration,
    /// `MAX_RESULT_TTL_SECONDS` (default 30 days): the largest `expires_in` a request may ask for.
    pub max_result_ttl: Duration,
    /// `MAX_WAIT_SECONDS` (default 20): the longest long-poll `wait`.
    pub max_wait: Duration,
    /// `MAX_BODY_BYTES` (default 1 MiB): larger bodies get 413 before parsing.
    pub max_body_bytes: usize,
    /// `MAX_BATCH_IDS` (default 1000): ids in one batch-get.
    pub max_batch_ids: usize,
    /// `BATCH_RESPONSE_BYTES` (default 5,000,000): the most a batch-get's
    /// response may carry, as Lambda counts it (the body JSON-escaped in the
    /// proxy response; Lambda's limit is 6 MB). Results past it come back as
    /// references, read with a GET each.
    pub batch_response_bytes: usize,
    /// `DDB_MAX_ATTEMPTS` (default 6): attempts per DynamoDB call (throttling,
    /// transient errors, unprocessed batch keys) before answering 503.
    pub ddb_max_attempts: u32,
    /// `DDB_INITIAL_BACKOFF_MS` (default 25): first backoff; it doubles, with full jitter.
    pub ddb_initial_backoff: Duration,
    /// `DDB_MAX_BACKOFF_MS` (default 2000): cap on one backoff.
    pub ddb_max_backoff: Duration,
    /// `AUTH_MODE` (`iam`, the default, or `none`).
    pub auth_mode: AuthMode,
    /// `AUTO_CREATE_TABLE` (default false; local only): create the table at init.
    pub auto_create_table: bool,
    /// Where chord callbacks go, and which queues each tenant may reach.
    pub callbacks: CallbackConfig,
    /// Large results in S3.
    pub results: LargeResults,
    /// The chord join's lease, retries and bounds.
    pub chord: ChordConfig,
    /// The processing cache's leases and bounds.
    pub cache: CacheConfig,
}

/// The processing cache (`/v1/cache/...`, see `docs/CACHE.md`).
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `CACHE_LEASE_SECONDS` (default 900, 10..=86400): how long a
    /// processing holds its entry before a request may delegate it again
    /// (an operation may ask for its own `lease`). A processing's STARTED
    /// and RETRY states renew it.
    pub lease: Duration,
    /// `CACHE_MAX_WAITERS` (default 1000, 1..=10000): the `cb_args` one
    /// processing collects; past it a miss is refused (409 `too_many_waiters`).
    pub max_waiters: u64,
    /// `CACHE_MAX_WAITERS_BYTES` (default 65536, 1024..=131072): what they
    /// may add up to, as JSON.
    pub max_waiters_bytes: u64,
    /// `CACHE_MAX_CB_ARGS_BYTES` (default 8192, 16..=65536): one request's `cb_args`.
    pub max_cb_args_bytes: usize,
    /// `CACHE_MAX_KEYS` (default 1000, 1..=5000): keys in one request.
    pub max_keys: usize,
    /// `CACHE_INLINE_RESULT_BYTES` (default 204800, 0..=262144): a result
    /// up to this size is copied into its entry, so a hit is one read; a
    /// larger one stays on the processing's task and a hit names that task.
    pub inline_result_bytes: usize,
}

/// Results too large for a DynamoDB item, or for a Lambda response, go
/// through S3 (see `docs/LARGE_RESULTS.md`).
#[derive(Debug, Clone)]
pub struct LargeResults {
    /// `RESULTS_BUCKET` (default unset): the bucket large results go to.
    /// Unset: a result past the item limit is refused (413 `result_too_large`).
    pub bucket: Option<String>,
    /// `SPILL_ABOVE_BYTES` (default 65536, 1024..=390 KiB): a result whose
    /// compressed size passes this goes to S3; its item keeps a pointer. So
    /// does one larger than `INLINE_RESULT_BYTES` uncompressed, however well
    /// it compresses, so that no read answers it whole past that size.
    pub spill_above: usize,
    /// `INLINE_RESULT_BYTES` (default 4,000,000, 0..=5,800,000): the largest
    /// result in S3 a GET or a batch-get carries in its answer; larger ones
    /// come as a presigned URL (`result_ref`).
    pub inline_bytes: usize,
    /// `MAX_RESULT_BYTES` (default 512 MiB, at most 5 GiB): the largest result
    /// (its JSON, uncompressed) accepted through an upload.
    pub max_result_bytes: u64,
    /// `PRESIGN_SECONDS` (default 900, 60..=43200): how long a presigned URL
    /// is valid.
    pub presign: Duration,
}

/// Chord callbacks: the target, and the queues each namespace may use.
#[derive(Debug, Clone)]
pub struct CallbackConfig {
    /// `CALLBACK_TARGET` (`sqs`, the default, or `lambda`) and
    /// `CALLBACK_LAMBDA_FUNCTION`: with `lambda`, the function invoked.
    pub lambda_function: Option<String>,
    /// `CALLBACK_QUEUES`: per namespace, the queues its callbacks may use
    /// (see [`QueueRoutes`]). Unset: every namespace uses [`Self::shared`].
    pub tenant_queues: Option<HashMap<Namespace, QueueRoutes>>,
    /// `CALLBACK_QUEUE_URLS` (`name=url,...`), and `CALLBACK_QUEUE_URL_PREFIX`
    /// (the kombu queue name is appended) for the names `CALLBACK_QUEUE_NAMES`
    /// grants (default: the default queue alone; `proj-*` a prefix, `*` any):
    /// the queues of a single-tenant deployment. No queue is granted that
    /// the configuration does not name.
    pub shared: QueueRoutes,
    /// `CALLBACK_DEFAULT_QUEUE` (default `celery`): for callbacks without `options.queue`.
    pub default_queue: String,
    /// `CALLBACK_MAX_BYTES` (default 1048576: SQS's message size limit and
    /// Lambda's asynchronous payload limit, both 1 MiB since 2025): the
    /// largest callback message. A callback whose results would pass it is
    /// sent with a reference to them instead (see `docs/LARGE_RESULTS.md`).
    pub max_bytes: usize,
    /// `CHORD_DEADLINE_QUEUE_URL`: the queue of the messages that wake
    /// chord-join at a chord's deadline (`chord/deadline.rs`); without it,
    /// a chord's deadline is kept in its status but nothing reports it.
    pub deadline_queue_url: Option<String>,
}

/// The queues one namespace may send callbacks to: exact names with their
/// URLs, and name prefixes (`"proj-*"`, or `"*"` for any name) whose URL is
/// a prefix the kombu queue name is appended to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueRoutes {
    exact: HashMap<String, String>,
    prefixes: Vec<(String, String)>,
}

impl QueueRoutes {
    /// Routes from `name → url` pairs; a name ending in `*` is a prefix.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut routes = Self::default();
        for (name, url) in pairs {
            match name.strip_suffix('*') {
                Some(prefix) => routes.prefixes.push((prefix.to_owned(), url)),
                None => {
                    routes.exact.insert(name, url);
                }
            }
        }
        // The longest prefix wins.
        routes.prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        routes
    }

    /// The URL of queue `name`, or `None` when these routes do not allow it.
    pub fn url(&self, name: &str) -> Option<String> {
        if let Some(url) = self.exact.get(name) {
            return Some(url.clone());
        }
        let (_, prefix) = self.prefixes.iter().find(|(p, _)| name.starts_with(p.as_str()))?;
        Some(format!("{prefix}{}", kombu_queue_name(name)))
    }
}

impl CallbackConfig {
    /// The URL a callback of namespace `ns` may send to on queue `name`;
    /// `None` when the deployment does not grant `ns` that queue.
    pub fn queue_url(&self, ns: &Namespace, name: &str) -> Option<String> {
        match &self.tenant_queues {
            Some(map) => map.get(ns)?.url(name),
            None => self.shared.url(name),
        }
    }
}

/// The chord join (chord-join).
#[derive(Debug, Clone)]
pub struct ChordConfig {
    /// `CHORD_LEASE_SECONDS` (default 180, 1..=3600): how long a claim holds
    /// before another invocation may take it over; longer than chord-join's
    /// timeout (120 s in the template), and renewed just before each send.
    pub lease: Duration,
    /// `CHORD_MAX_ATTEMPTS` (default 8, 1..=100): joins that fail with an
    /// error retrying might fix before the chord fails for good.
    pub max_attempts: u32,
    /// `CHORD_MAX_ERRBACKS` (default 16, 0..=100): errbacks one callback may
    /// carry, and each task of a group callback.
    pub max_errbacks: usize,
    /// `CHORD_MAX_CALLBACK_BYTES` (default 65536, 1024..=262144): the largest
    /// callback signature a part may carry.
    pub max_callback_bytes: usize,
    /// `CHORD_MAX_MESSAGES` (default 500, 1..=10000): the most messages one
    /// part's callback can make chord-join send, in total: the body's (a
    /// group body's, one a member) and the errbacks a failure calls (each
    /// member's own and the group's). A 64 KiB callback could otherwise
    /// describe some 25,000, far past one invocation.
    pub max_messages: usize,
    /// `CHORD_MAX_RESULTS_BYTES` (default 128 MiB, 1 KiB..=512 MiB): the most
    /// a chord's results may add up to; chord-join holds them in memory.
    pub max_results_bytes: usize,
}

/// A variable that is missing or malformed; start-up fails with its name.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let var = |name: &'static str| lookup(name).filter(|v| !v.trim().is_empty());
        let num = |name: &'static str, default: u64, min: u64, max: u64| -> Result<u64, ConfigError> {
            let Some(raw) = var(name) else { return Ok(default) };
            let value: u64 = raw
                .trim()
                .parse()
                .map_err(|_| ConfigError { var: name, message: format!("{raw:?} is not a whole number") })?;
            if !(min..=max).contains(&value) {
                return Err(ConfigError { var: name, message: format!("{value} is outside {min}..={max}") });
            }
            Ok(value)
        };
        let table_name = var("TABLE_NAME")
            .ok_or(ConfigError { var: "TABLE_NAME", message: "is not set; it names the DynamoDB table".into() })?;
        let namespace = match var("NAMESPACE") {
            Some(raw) => Namespace::parse(&raw).map_err(|message| ConfigError { var: "NAMESPACE", message })?,
            None => Namespace::default(),
        };
        let tenants = match var("TENANTS") {
            Some(raw) => Some(TenantMap::parse(&raw).map_err(|message| ConfigError { var: "TENANTS", message })?),
            None => None,
        };
        let auth_mode = match var("AUTH_MODE").as_deref().map(str::trim) {
            None | Some("iam") => AuthMode::Iam,
            Some("none") => AuthMode::None,
            Some(other) => {
                return Err(ConfigError { var: "AUTH_MODE", message: format!("{other:?} is not iam or none") })
            }
        };
        let auto_create_table = flag(&var, "AUTO_CREATE_TABLE")?;
        let callbacks = callback_config(&var, &num)?;
        let tenant_namespaces = tenants.as_ref().map_or(0, TenantMap::namespace_count);
        if tenant_namespaces > 1 && callbacks.lambda_function.is_none() && callbacks.tenant_queues.is_none() {
            return Err(ConfigError {
                var: "CALLBACK_QUEUES",
                message: format!(
                    "is not set, and TENANTS names {tenant_namespaces} namespaces: say which queues each \
                     tenant's chord callbacks may use, so none can reach another's"
                ),
            });
        }
        let config = Config {
            table_name,
            namespace,
            tenants,
            result_ttl: Duration::from_secs(num("RESULT_TTL_SECONDS", DAY, 1, 365 * DAY)?),
            max_result_ttl: Duration::from_secs(num("MAX_RESULT_TTL_SECONDS", 30 * DAY, 1, 10 * 365 * DAY)?),
            max_wait: Duration::from_secs(num("MAX_WAIT_SECONDS", 20, 0, 900)?),
            max_body_bytes: num("MAX_BODY_BYTES", 1 << 20, 1024, 6 << 20)? as usize,
            max_batch_ids: num("MAX_BATCH_IDS", 1000, 1, 10_000)? as usize,
            batch_response_bytes: num("BATCH_RESPONSE_BYTES", 5_000_000, 64 << 10, 5_800_000)? as usize,
            ddb_max_attempts: num("DDB_MAX_ATTEMPTS", 6, 1, 20)? as u32,
            ddb_initial_backoff: Duration::from_millis(num("DDB_INITIAL_BACKOFF_MS", 25, 1, 10_000)?),
            ddb_max_backoff: Duration::from_millis(num("DDB_MAX_BACKOFF_MS", 2000, 1, 60_000)?),
            auth_mode,
            auto_create_table,
            callbacks,
            results: large_results(&var, &num)?,
            chord: chord_config(&num)?,
            cache: cache_config(&num)?,
        };
        if config.result_ttl > config.max_result_ttl {
            return Err(ConfigError {
                var: "RESULT_TTL_SECONDS",
                message: "is longer than MAX_RESULT_TTL_SECONDS".into(),
            });
        }
        Ok(config)
    }

    /// The namespace of a request: the caller's tenant, or `NAMESPACE`
    /// when `TENANTS` is unset; `None` for a caller `TENANTS` does not name.
    pub fn tenant_of(&self, caller: &crate::tenants::Caller) -> Option<Namespace> {
        match &self.tenants {
            None => Some(self.namespace.clone()),
            Some(map) => map.resolve(caller).cloned(),
        }
    }

    /// A configuration for tests: table `name`, no auth, defaults elsewhere.
    pub fn for_table(name: &str) -> Self {
        let name = name.to_owned();
        Self::from_lookup(|var| match var {
            "TABLE_NAME" => Some(name.clone()),
            "AUTH_MODE" => Some("none".into()),
            _ => None,
        })
        .expect("test configuration is valid")
    }
}

const DAY: u64 = 86_400;

/// A boolean variable: `true`/`1` or `false`/`0` (default false).
fn flag(var: &impl Fn(&'static str) -> Option<String>, name: &'static str) -> Result<bool, ConfigError> {
    match var(name).as_deref().map(str::trim) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(other) => Err(ConfigError { var: name, message: format!("{other:?} is not true or false") }),
    }
}

/// The `CHORD_*` variables.
fn chord_config(
    num: &impl Fn(&'static str, u64, u64, u64) -> Result<u64, ConfigError>,
) -> Result<ChordConfig, ConfigError> {
    Ok(ChordConfig {
        lease: Duration::from_secs(num("CHORD_LEASE_SECONDS", 180, 1, 3600)?),
        max_attempts: num("CHORD_MAX_ATTEMPTS", 8, 1, 100)? as u32,
        max_errbacks: num("CHORD_MAX_ERRBACKS", 16, 0, 100)? as usize,
        max_callback_bytes: num("CHORD_MAX_CALLBACK_BYTES", 65_536, 1024, 262_144)? as usize,
        max_messages: num("CHORD_MAX_MESSAGES", 500, 1, 10_000)? as usize,
        max_results_bytes: num("CHORD_MAX_RESULTS_BYTES", 128 << 20, 1024, 512 << 20)? as usize,
    })
}

/// The variables of large results: `RESULTS_BUCKET` and its bounds.
fn large_results(
    var: &impl Fn(&'static str) -> Option<String>,
    num: &impl Fn(&'static str, u64, u64, u64) -> Result<u64, ConfigError>,
) -> Result<LargeResults, ConfigError> {
    Ok(LargeResults {
        bucket: var("RESULTS_BUCKET").map(|b| b.trim().to_owned()),
        spill_above: num("SPILL_ABOVE_BYTES", 65_536, 1024, 390 << 10)? as usize,
        inline_bytes: num("INLINE_RESULT_BYTES", 4_000_000, 0, 5_800_000)? as usize,
        max_result_bytes: num("MAX_RESULT_BYTES", 512 << 20, 1024, 5 << 30)?,
        presign: Duration::from_secs(num("PRESIGN_SECONDS", 900, 60, 43_200)?),
    })
}

/// The `CACHE_*` variables.
fn cache_config(
    num: &impl Fn(&'static str, u64, u64, u64) -> Result<u64, ConfigError>,
) -> Result<CacheConfig, ConfigError> {
    Ok(CacheConfig {
        lease: Duration::from_secs(num("CACHE_LEASE_SECONDS", 900, 10, DAY)?),
        max_waiters: num("CACHE_MAX_WAITERS", 1000, 1, 10_000)?,
        max_waiters_bytes: num("CACHE_MAX_WAITERS_BYTES", 65_536, 1024, 131_072)?,
        max_cb_args_bytes: num("CACHE_MAX_CB_ARGS_BYTES", 8192, 16, 65_536)? as usize,
        max_keys: num("CACHE_MAX_KEYS", 1000, 1, 5000)? as usize,
        inline_result_bytes: num("CACHE_INLINE_RESULT_BYTES", 204_800, 0, 262_144)? as usize,
    })
}

/// The `CALLBACK_*` variables.
fn callback_config(
    var: &impl Fn(&'static str) -> Option<String>,
    num: &impl Fn(&'static str, u64, u64, u64) -> Result<u64, ConfigError>,
) -> Result<CallbackConfig, ConfigError> {
    let lambda_function = match var("CALLBACK_TARGET").as_deref().map(str::trim) {
        None | Some("sqs") => None,
        Some("lambda") => Some(var("CALLBACK_LAMBDA_FUNCTION").ok_or(ConfigError {
            var: "CALLBACK_LAMBDA_FUNCTION",
            message: "is required when CALLBACK_TARGET=lambda".into(),
        })?),
        Some(other) => {
            return Err(ConfigError { var: "CALLBACK_TARGET", message: format!("{other:?} is not sqs or lambda") })
        }
    };
    let mut pairs = Vec::new();
    for pair in var("CALLBACK_QUEUE_URLS").unwrap_or_default().split(',').filter(|p| !p.trim().is_empty()) {
        let (name, url) = pair
            .split_once('=')
            .ok_or(ConfigError { var: "CALLBACK_QUEUE_URLS", message: format!("{pair:?} is not name=url") })?;
        pairs.push((name.trim().to_owned(), url.trim().to_owned()));
    }
    let default_queue = var("CALLBACK_DEFAULT_QUEUE").unwrap_or_else(|| "celery".into());
    if let Some(prefix) = var("CALLBACK_QUEUE_URL_PREFIX") {
        let names = var("CALLBACK_QUEUE_NAMES").unwrap_or_else(|| default_queue.clone());
        let named = named_queues(prefix.trim(), &names)
            .map_err(|message| ConfigError { var: "CALLBACK_QUEUE_NAMES", message })?;
        pairs.extend(named);
    }
    let tenant_queues = match var("CALLBACK_QUEUES") {
        None => None,
        Some(raw) => {
            Some(parse_tenant_queues(&raw).map_err(|message| ConfigError { var: "CALLBACK_QUEUES", message })?)
        }
    };
    Ok(CallbackConfig {
        lambda_function,
        tenant_queues,
        shared: QueueRoutes::from_pairs(pairs),
        default_queue,
        max_bytes: num("CALLBACK_MAX_BYTES", 1 << 20, 1024, 1 << 20)? as usize,
        deadline_queue_url: var("CHORD_DEADLINE_QUEUE_URL").filter(|url| !url.trim().is_empty()),
    })
}

/// The routes of `names` (comma-separated: exact queue names, or prefixes
/// ending in a single `*`) under a queue URL `prefix`: an exact name's URL
/// is the prefix and the name as kombu spells it, a prefix's the URL prefix.
pub fn named_queues(prefix: &str, names: &str) -> Result<Vec<(String, String)>, String> {
    let mut routes = Vec::new();
    for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name.contains('*') && !name.ends_with('*') || name.matches('*').count() > 1 {
            return Err(format!("{name:?}: a name is exact, or a prefix ending in a single *"));
        }
        let url = if name.ends_with('*') { prefix.to_owned() } else { format!("{prefix}{}", kombu_queue_name(name)) };
        routes.push((name.to_owned(), url));
    }
    Ok(routes)
}

/// `{"<namespace>": {"<queue name or prefix*>": "<url or url prefix>"}}`.
fn parse_tenant_queues(raw: &str) -> Result<HashMap<Namespace, QueueRoutes>, String> {
    let object: HashMap<String, HashMap<String, String>> = serde_json::from_str(raw)
        .map_err(|e| format!("is not a JSON object of namespace to {{queue name: URL}}: {e}"))?;
    let mut map = HashMap::with_capacity(object.len());
    for (ns, queues) in object {
        let ns = Namespace::parse(&ns).map_err(|message| format!("{ns:?}: {message}"))?;
        for (name, url) in &queues {
            if name.is_empty() || !url.starts_with("http") {
                return Err(format!("{}: {name:?} → {url:?} is not a queue name and an https URL", ns.as_str()));
            }
        }
        map.insert(ns, QueueRoutes::from_pairs(queues));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_sane() {
        let c = load(&[("TABLE_NAME", "results")]).unwrap();
        assert_eq!(c.auth_mode, AuthMode::Iam, "secure by default");
        assert_eq!(c.result_ttl, Duration::from_secs(86_400));
        assert_eq!(c.max_wait, Duration::from_secs(20));
        assert_eq!(c.namespace.as_str(), "default");
        assert!(!c.auto_create_table);
    }

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(load(&[]).unwrap_err().var, "TABLE_NAME");
        for (var, value) in [
            ("AUTH_MODE", "open"),
            ("MAX_WAIT_SECONDS", "ten"),
            ("MAX_WAIT_SECONDS", "100000"),
            ("NAMESPACE", "Bad/NS"),
            ("AUTO_CREATE_TABLE", "yes please"),
            ("DDB_MAX_ATTEMPTS", "0"),
            ("CHORD_LEASE_SECONDS", "0"),
            ("CHORD_MAX_ATTEMPTS", "1000"),
            ("CALLBACK_MAX_BYTES", "x"),
            ("CALLBACK_TARGET", "email"),
            ("CALLBACK_QUEUES", "[]"),
            ("CALLBACK_QUEUES", r#"{"a": {"q": "ftp://x"}}"#),
        ] {
            let err = load(&[("TABLE_NAME", "t"), (var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var));
        }
    }

    #[test]
    fn each_tenant_reaches_only_its_own_queues() {
        let c = load(&[
            ("TABLE_NAME", "t"),
            ("TENANTS", r#"{"111": "a", "222": "b"}"#),
            (
                "CALLBACK_QUEUES",
                r#"{"a": {"celery": "https://sqs/1/a-celery", "a.*": "https://sqs/1/"}, "b": {"celery": "https://sqs/1/b-celery"}}"#,
            ),
        ])
        .unwrap();
        let (a, b, other) =
            (Namespace::parse("a").unwrap(), Namespace::parse("b").unwrap(), Namespace::parse("c").unwrap());
        let cb = &c.callbacks;
        assert_eq!(cb.queue_url(&a, "celery").as_deref(), Some("https://sqs/1/a-celery"));
        assert_eq!(cb.queue_url(&b, "celery").as_deref(), Some("https://sqs/1/b-celery"));
        assert_eq!(cb.queue_url(&a, "a.high").as_deref(), Some("https://sqs/1/a-high"));
        assert_eq!(cb.queue_url(&b, "a.high"), None, "b may not use a's queues");
        assert_eq!(cb.queue_url(&other, "celery"), None, "a namespace without queues has none");
    }

    #[test]
    fn several_tenants_need_their_queues_said() {
        let err = load(&[("TABLE_NAME", "t"), ("TENANTS", r#"{"111": "a", "222": "b"}"#)]).unwrap_err();
        assert_eq!(err.var, "CALLBACK_QUEUES");
        // One tenant, or the Lambda target: the shared routes are enough.
        assert!(load(&[("TABLE_NAME", "t"), ("TENANTS", r#"{"111": "a"}"#)]).is_ok());
        let lambda = load(&[
            ("TABLE_NAME", "t"),
            ("TENANTS", r#"{"111": "a", "222": "b"}"#),
            ("CALLBACK_TARGET", "lambda"),
            ("CALLBACK_LAMBDA_FUNCTION", "f"),
        ]);
        assert!(lambda.is_ok());
    }

    #[test]
    fn single_tenant_queues_come_from_the_map_or_the_prefix() {
        let c = load(&[
            ("TABLE_NAME", "t"),
            ("CALLBACK_QUEUE_URLS", "special=https://q/special-url"),
            ("CALLBACK_QUEUE_URL_PREFIX", "https://sqs/123/"),
            ("CALLBACK_QUEUE_NAMES", "celery,proj.*"),
        ])
        .unwrap();
        let ns = Namespace::default();
        assert_eq!(c.callbacks.queue_url(&ns, "special").as_deref(), Some("https://q/special-url"));
        assert_eq!(c.callbacks.queue_url(&ns, "proj.high").as_deref(), Some("https://sqs/123/proj-high"));
        assert_eq!(c.callbacks.queue_url(&ns, "celery").as_deref(), Some("https://sqs/123/celery"));
        assert_eq!(c.callbacks.queue_url(&ns, "payments"), None, "a queue no name grants");
        let bare = load(&[("TABLE_NAME", "t")]).unwrap();
        assert_eq!(bare.callbacks.queue_url(&ns, "celery"), None);
    }

    /// A fresh deployment (the template's defaults: this account's URL
    /// prefix, no names) lets a caller put a task on Celery's default queue
    /// alone, not on any queue of the account; more is granted by name.
    #[test]
    fn the_url_prefix_alone_grants_the_default_queue_only() {
        let ns = Namespace::default();
        let fresh = load(&[("TABLE_NAME", "t"), ("CALLBACK_QUEUE_URL_PREFIX", "https://sqs/123/")]).unwrap();
        assert_eq!(fresh.callbacks.queue_url(&ns, "celery").as_deref(), Some("https://sqs/123/celery"));
        for other in ["payments", "celery-admin", "celeryx", ""] {
            assert_eq!(fresh.callbacks.queue_url(&ns, other), None, "{other:?}");
        }
        let own_default = load(&[
            ("TABLE_NAME", "t"),
            ("CALLBACK_QUEUE_URL_PREFIX", "https://sqs/123/"),
            ("CALLBACK_DEFAULT_QUEUE", "work"),
        ])
        .unwrap();
        assert!(own_default.callbacks.queue_url(&ns, "work").is_some());
        assert_eq!(own_default.callbacks.queue_url(&ns, "celery"), None);
        let any = load(&[
            ("TABLE_NAME", "t"),
            ("CALLBACK_QUEUE_URL_PREFIX", "https://sqs/123/"),
            ("CALLBACK_QUEUE_NAMES", "*"),
        ])
        .unwrap();
        assert!(any.callbacks.queue_url(&ns, "payments").is_some(), "every queue, when told so");
        for bad in ["a*b", "**", "*a"] {
            let err = load(&[
                ("TABLE_NAME", "t"),
                ("CALLBACK_QUEUE_URL_PREFIX", "https://q/"),
                ("CALLBACK_QUEUE_NAMES", bad),
            ]);
            assert!(err.unwrap_err().to_string().contains("CALLBACK_QUEUE_NAMES"), "{bad}");
        }
    }
}
