//! Which namespace a caller's results live in. It comes from who the caller
//! is, as API Gateway's IAM authorizer put it in the request context, mapped
//! through the deployment's `TENANTS` table; never from anything the caller
//! writes into the request (no header, path or body field picks it).
//!
//! `TENANTS` is a JSON object from caller to namespace. A key is, most
//! specific first:
//!
//! 1. an IAM user's ARN exactly: `arn:aws:iam::111122223333:user/ci`;
//! 2. an assumed role, without a session name:
//!    `arn:aws:sts::111122223333:assumed-role/worker` (every session of it);
//! 3. an account id: `111122223333`;
//! 4. `*`: every other caller.
//!
//! A role session's name (`assumed-role/<role>/<session>`) and a federated
//! user's name (`federated-user/<name>`) are chosen by whoever assumes the
//! role or gets the token, so a caller of one tenant could take another's:
//! such keys are refused at start-up. Map the role (or the user) instead.
//!
//! With `TENANTS` unset every caller is in `NAMESPACE` (one tenant). With it
//! set, a caller no key matches is refused (403 `unknown_tenant`); `{}`
//! refuses every caller.

use std::collections::HashMap;

use crate::ids::Namespace;

/// The caller as API Gateway's IAM authorizer describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub user_arn: Option<String>,
    pub account_id: Option<String>,
}

impl Caller {
    /// How the caller is named in errors and logs.
    pub fn describe(&self) -> String {
        match (&self.user_arn, &self.account_id) {
            (Some(arn), _) => arn.clone(),
            (None, Some(account)) => format!("account {account}"),
            (None, None) => "a caller without an ARN or account".to_owned(),
        }
    }
}

/// The `TENANTS` table, parsed and checked at start-up.
#[derive(Debug, Clone, Default)]
pub struct TenantMap {
    entries: HashMap<String, Namespace>,
}

impl TenantMap {
    /// Parses `{"<caller>": "<namespace>", ...}`; every namespace is checked.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let object: HashMap<String, String> = serde_json::from_str(raw)
            .map_err(|e| format!("is not a JSON object of caller to namespace strings: {e}"))?;
        let mut entries = HashMap::with_capacity(object.len());
        for (caller, namespace) in object {
            if caller.trim().is_empty() {
                return Err("has an empty caller key".to_owned());
            }
            if let Some(why) = chosen_by_the_caller(&caller) {
                return Err(format!("{caller:?}: {why}"));
            }
            let ns = Namespace::parse(&namespace).map_err(|message| format!("{caller:?}: {message}"))?;
            entries.insert(caller, ns);
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many distinct namespaces the table names.
    pub fn namespace_count(&self) -> usize {
        self.entries.values().collect::<std::collections::HashSet<_>>().len()
    }

    /// The caller's namespace, by the most specific key that matches.
    pub fn resolve(&self, caller: &Caller) -> Option<&Namespace> {
        let arn = caller.user_arn.as_deref();
        arn.and_then(|a| self.entries.get(a))
            .or_else(|| arn.and_then(role_of_session).and_then(|role| self.entries.get(role)))
            .or_else(|| caller.account_id.as_deref().and_then(|a| self.entries.get(a)))
            .or_else(|| self.entries.get("*"))
    }
}

/// Why a key names something its caller picks (and so may not map a
/// tenant), if it does: a role session's name or a federated user's name.
fn chosen_by_the_caller(key: &str) -> Option<String> {
    if let Some(role) = role_of_session(key) {
        return Some(format!(
            "names a role session, whose name whoever assumes the role chooses; map the role ({role:?})"
        ));
    }
    if key.starts_with("arn:") && key.contains(":federated-user/") {
        return Some(
            "names a federated user, whose name whoever calls GetFederationToken chooses; map the account \
             or an IAM user"
                .to_owned(),
        );
    }
    None
}

/// `arn:aws:sts::<account>:assumed-role/<role>/<session>` → the same without
/// `/<session>`; `None` for any other ARN.
fn role_of_session(arn: &str) -> Option<&str> {
    let (prefix, resource) = arn.split_once(":assumed-role/")?;
    if !prefix.starts_with("arn:") || !prefix.contains(":sts:") {
        return None;
    }
    let (role, session) = resource.split_once('/')?;
    if role.is_empty() || session.is_empty() {
        return None;
    }
    Some(&arn[..prefix.len() + ":assumed-role/".len() + role.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(arn: Option<&str>, account: Option<&str>) -> Caller {
        Caller { user_arn: arn.map(str::to_owned), account_id: account.map(str::to_owned) }
    }

    fn map() -> TenantMap {
        TenantMap::parse(
            r#"{
                "arn:aws:iam::111122223333:user/ci": "ci",
                "arn:aws:sts::111122223333:assumed-role/worker": "workers",
                "arn:aws:sts::111122223333:assumed-role/special": "special",
                "444455556666": "other-account"
            }"#,
        )
        .unwrap()
    }

    #[test]
    fn the_most_specific_key_wins() {
        let m = map();
        let ns = |c: &Caller| m.resolve(c).map(|n| n.as_str().to_owned());
        assert_eq!(ns(&caller(Some("arn:aws:iam::111122223333:user/ci"), Some("111122223333"))).as_deref(), Some("ci"));
        let session = caller(Some("arn:aws:sts::111122223333:assumed-role/worker/i-0abc"), Some("111122223333"));
        assert_eq!(ns(&session).as_deref(), Some("workers"));
        let special = caller(Some("arn:aws:sts::111122223333:assumed-role/special/worker"), Some("111122223333"));
        assert_eq!(ns(&special).as_deref(), Some("special"));
        let any_in_account = caller(Some("arn:aws:iam::444455556666:user/x"), Some("444455556666"));
        assert_eq!(ns(&any_in_account).as_deref(), Some("other-account"));
    }

    #[test]
    fn an_unmapped_caller_has_no_namespace_unless_there_is_a_wildcard() {
        let stranger = caller(Some("arn:aws:iam::999999999999:user/x"), Some("999999999999"));
        assert!(map().resolve(&stranger).is_none());
        // A role name that merely starts like a mapped one is another role.
        let lookalike = caller(Some("arn:aws:sts::111122223333:assumed-role/worker-2/s"), Some("999999999999"));
        assert!(map().resolve(&lookalike).is_none());
        let with_wildcard = TenantMap::parse(r#"{"*": "shared"}"#).unwrap();
        assert_eq!(with_wildcard.resolve(&stranger).unwrap().as_str(), "shared");
    }

    #[test]
    fn a_bad_table_is_refused_at_start_up() {
        assert!(TenantMap::parse("[]").is_err());
        assert!(TenantMap::parse(r#"{"a": 3}"#).is_err());
        assert!(TenantMap::parse(r#"{"a": "Has/Slash"}"#).unwrap_err().contains("\"a\""));
        assert!(TenantMap::parse(r#"{" ": "ok"}"#).is_err());
        assert!(TenantMap::parse("{}").unwrap().is_empty());
    }

    /// Tenant B's caller can assume its role with any session name, tenant
    /// A's included: a key naming a session (or a federated user) would let
    /// it in, so the table is refused at start-up, naming the key and why.
    #[test]
    fn keys_whose_names_the_caller_chooses_are_refused_at_start_up() {
        let session = r#"{"arn:aws:sts::111122223333:assumed-role/worker/tenant-a": "a"}"#;
        let err = TenantMap::parse(session).unwrap_err();
        assert!(err.contains("assumed-role/worker/tenant-a") && err.contains("role session"), "{err}");
        assert!(err.contains(r#"map the role ("arn:aws:sts::111122223333:assumed-role/worker")"#), "{err}");
        let federated = r#"{"arn:aws:sts::111122223333:federated-user/alice": "a"}"#;
        let err = TenantMap::parse(federated).unwrap_err();
        assert!(err.contains("federated-user/alice") && err.contains("federated user"), "{err}");
        // Roles, users and accounts stay.
        assert!(
            TenantMap::parse(r#"{"arn:aws:sts::1:assumed-role/worker": "a", "arn:aws:iam::1:user/u": "b"}"#).is_ok()
        );
    }

    #[test]
    fn only_sts_assumed_role_sessions_have_a_role() {
        assert_eq!(role_of_session("arn:aws:sts::1:assumed-role/r/s"), Some("arn:aws:sts::1:assumed-role/r"));
        assert_eq!(role_of_session("arn:aws:iam::1:role/r"), None);
        assert_eq!(role_of_session("arn:aws:sts::1:assumed-role/r"), None);
        assert_eq!(role_of_session("arn:aws:iam::1:user/assumed-role/r/s"), None);
    }
}
