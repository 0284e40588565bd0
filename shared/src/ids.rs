//! Validated identifiers. Ids end up inside DynamoDB keys, so they are checked
//! once, at construction: a [`TaskId`] or [`GroupId`] that exists is valid.

use std::fmt;

/// Longest task or group id accepted. Celery ids are 36-character UUIDs; custom
/// ids get room to spare.
pub const MAX_ID_LEN: usize = 128;

/// Why an id was refused; the message is shown to the caller as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} characters long; the limit is {MAX_ID_LEN}")]
    TooLong { kind: &'static str, len: usize },
    #[error("{kind} contains {found:?}; allowed are ASCII letters, digits and - _ . : @")]
    BadChar { kind: &'static str, found: char },
}

fn check_id(kind: &'static str, raw: &str) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if raw.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, len: raw.chars().count() });
    }
    match raw.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.:@".contains(*c))) {
        Some(found) => Err(IdError::BadChar { kind, found }),
        None => Ok(()),
    }
}

/// Whether `raw` is a SHA-256 in lowercase hex (an uploaded object's name).
pub fn is_sha256_hex(raw: &str) -> bool {
    raw.len() == 64 && raw.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The id of a processing cache's task: `dcache-{hash}-{nonce}`, so its
/// stored result names the cache entry it settles (`docs/CACHE.md`).
pub fn processing_task_id(hash: &str) -> TaskId {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    TaskId::parse(&format!("dcache-{hash}-{nonce}")).expect("hex and dashes make a valid id")
}

/// The cache entry's hash a processing's task id names, if it is one.
pub fn entry_of_processing(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("dcache-")?;
    let (hash, nonce) = rest.split_once('-')?;
    let hex = |s: &str, len| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (hex(hash, 32) && hex(nonce, 32)).then_some(hash)
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Checks length (1 to [`MAX_ID_LEN`]) and charset.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                check_id($kind, raw).map(|()| Self(raw.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A task id, as Celery assigns it (usually a UUID).
    TaskId,
    "task id"
);
id_type!(
    /// A group id (`GroupResult.id`, also the chord's id).
    GroupId,
    "group id"
);

/// A tenant's namespace: the prefix of every key it owns. Lower-case letters,
/// digits and `-`, 1 to 63 characters, so it can never contain the key separator.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok = !raw.is_empty()
            && raw.len() <= 63
            && raw.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(format!("namespace {raw:?} must be 1 to 63 characters of a-z, 0-9 and -"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Namespace {
    fn default() -> Self {
        Self("default".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_celery_uuids_and_custom_ids() {
        assert!(TaskId::parse("d9c8a4a6-2c1e-4f55-9a43-2b1f7c1e9f00").is_ok());
        assert!(TaskId::parse("report:user@42.v2_final").is_ok());
        assert!(TaskId::parse(&"a".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn refuses_empty_long_and_odd_ids() {
        assert_eq!(TaskId::parse(""), Err(IdError::Empty { kind: "task id" }));
        assert!(matches!(TaskId::parse(&"a".repeat(MAX_ID_LEN + 1)), Err(IdError::TooLong { len: 129, .. })));
        for bad in ["a/b", "a b", "a#b", "é", "a%2Fb", "a\nb"] {
            assert!(matches!(TaskId::parse(bad), Err(IdError::BadChar { .. })), "{bad}");
        }
    }

    #[test]
    fn namespace_cannot_hold_a_separator() {
        assert!(Namespace::parse("tenant-1").is_ok());
        for bad in ["", "Tenant", "a/b", "a#b", &"a".repeat(64)] {
            assert!(Namespace::parse(bad).is_err(), "{bad}");
        }
    }
}
