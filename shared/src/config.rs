//! The one configuration, read from the environment once at init. Every limit
//! the service enforces lives here with its default, so the documented limits
//! (README, "Limits") and the enforced ones cannot drift apart.

use std::time::Duration;

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
    /// `TENANTS` (default none): caller identity → namespace (see [`crate::tenants`]).
    pub tenants: TenantMap,
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
            Some(raw) => TenantMap::parse(&raw).map_err(|message| ConfigError { var: "TENANTS", message })?,
            None => TenantMap::default(),
        };
        let auth_mode = match var("AUTH_MODE").as_deref().map(str::trim) {
            None | Some("iam") => AuthMode::Iam,
            Some("none") => AuthMode::None,
            Some(other) => {
                return Err(ConfigError { var: "AUTH_MODE", message: format!("{other:?} is not iam or none") })
            }
        };
        let auto_create_table = match var("AUTO_CREATE_TABLE").as_deref().map(str::trim) {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") => true,
            Some(other) => {
                return Err(ConfigError {
                    var: "AUTO_CREATE_TABLE",
                    message: format!("{other:?} is not true or false"),
                })
            }
        };
        const DAY: u64 = 86_400;
        let config = Config {
            table_name,
            namespace,
            tenants,
            result_ttl: Duration::from_secs(num("RESULT_TTL_SECONDS", DAY, 1, 365 * DAY)?),
            max_result_ttl: Duration::from_secs(num("MAX_RESULT_TTL_SECONDS", 30 * DAY, 1, 365 * DAY)?),
            max_wait: Duration::from_secs(num("MAX_WAIT_SECONDS", 20, 0, 900)?),
            max_body_bytes: num("MAX_BODY_BYTES", 1 << 20, 1024, 6 << 20)? as usize,
            max_batch_ids: num("MAX_BATCH_IDS", 1000, 1, 10_000)? as usize,
            ddb_max_attempts: num("DDB_MAX_ATTEMPTS", 6, 1, 20)? as u32,
            ddb_initial_backoff: Duration::from_millis(num("DDB_INITIAL_BACKOFF_MS", 25, 1, 10_000)?),
            ddb_max_backoff: Duration::from_millis(num("DDB_MAX_BACKOFF_MS", 2000, 1, 60_000)?),
            auth_mode,
            auto_create_table,
        };
        if config.result_ttl > config.max_result_ttl {
            return Err(ConfigError {
                var: "RESULT_TTL_SECONDS",
                message: "is longer than MAX_RESULT_TTL_SECONDS".into(),
            });
        }
        Ok(config)
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
        ] {
            let err = load(&[("TABLE_NAME", "t"), (var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var));
        }
    }
}
