//! The errors of each boundary. [`ApiError`] is what a caller sees: each
//! variant maps once to a status and an `error.code`. [`StoreError`] is what
//! the store reports; it becomes an [`ApiError`] in one `From`.

use crate::ids::IdError;
use crate::meta::MetaError;

/// Everything that can go wrong with a request, as the caller sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadId(#[from] IdError),
    #[error("{0}")]
    BadMeta(#[from] MetaError),
    #[error("{0}")]
    BadBody(String),
    #[error("{0}")]
    BadQuery(String),
    #[error("expires_in {requested} is outside 1..={max} seconds")]
    ExpiresOutOfRange { requested: u64, max: u64 },
    #[error("body is {size} bytes; the limit is {limit}")]
    BodyTooLarge { size: usize, limit: usize },
    #[error("batch has {count} ids; the limit is {limit}")]
    BatchTooLarge { count: usize, limit: usize },
    #[error("stored result would be {size} bytes after compression; the limit is {limit} (upload the large fields first: POST .../upload, then result_upload; see docs/LARGE_RESULTS.md)")]
    ResultTooLarge { size: usize, limit: usize },
    #[error("{0}")]
    BadUpload(String),
    #[error("the uploaded result is more than {limit} bytes uncompressed; the limit is MAX_RESULT_BYTES")]
    UploadTooLarge { limit: u64 },
    #[error("large results are not enabled: this deployment has no results bucket (RESULTS_BUCKET)")]
    NoBucket,
    #[error("chord callback is {size} bytes; the limit is {limit}")]
    CallbackTooLarge { size: usize, limit: usize },
    #[error("chord callback refused: {0}")]
    CallbackNotAllowed(String),
    /// A processing cache miss past the waiters' bound.
    #[error("{0}")]
    TooManyWaiters(String),
    /// A miss whose operation the request does not describe.
    #[error("{0}")]
    UnknownOperation(String),
    /// The processing could not be handed to its queue or function.
    #[error("the processing could not be delegated: {0}; retry")]
    DelegationFailed(String),
    /// Its queue or function refused the processing's message for good (it
    /// does not exist, or the message is too large): the request's to mend.
    #[error("the processing could not be delegated: {0}")]
    DelegationRefused(String),
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("group {0} not found")]
    GroupNotFound(String),
    #[error("chord {0} not found: no part of it has been counted yet")]
    ChordNotFound(String),
    /// A redrive the chord's state does not allow (still open, nothing
    /// failed, its parts' arguments not stored).
    #[error("{0}")]
    RedriveRefused(String),
    #[error("task {task_id} is already {stored}; a {refused} result does not replace it")]
    Conflict { task_id: String, stored: String, refused: String },
    /// A claim on a task's run refused: the task is ready (`stored`), or
    /// another live claim holds it for `expires_in_ms` more.
    #[error("{}", claim_refusal(task_id, stored, *expires_in_ms))]
    ClaimRefused { task_id: String, stored: String, expires_in_ms: Option<u64> },
    #[error("request lacks API Gateway's IAM authorizer context")]
    Unauthenticated,
    #[error("caller {0} is not mapped to a tenant (TENANTS)")]
    UnknownTenant(String),
    #[error("DynamoDB is throttling; retry after {retry_after_secs} s")]
    Throttled { retry_after_secs: u32 },
    #[error("DynamoDB is unavailable; retry after {retry_after_secs} s")]
    Unavailable { retry_after_secs: u32 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The message a caller is shown. An error that carries another
    /// service's text (an SDK's, which can name ARNs, accounts, tables and
    /// queues) shows none of it, only where the log has it; a 5xx names the
    /// request id when there is one.
    pub fn public_message(&self, request_id: Option<&str>) -> String {
        let status = self.status_and_code().0;
        let under = request_id.map_or_else(String::new, |id| format!(" under request id {id}"));
        match self {
            Self::Internal(_) => format!("internal error; the service's log has the details{under}"),
            Self::DelegationFailed(_) => {
                format!("the processing could not be delegated; retry (the service's log has the details{under})")
            }
            _ if status >= 500 => match request_id {
                Some(id) => format!("{self} (request id {id})"),
                None => self.to_string(),
            },
            _ => self.to_string(),
        }
    }

    /// The HTTP status and `error.code` of this error: the one mapping.
    pub fn status_and_code(&self) -> (u16, &'static str) {
        match self {
            Self::BadId(_) => (400, "invalid_id"),
            Self::BadMeta(_) => (400, "invalid_meta"),
            Self::BadBody(_) => (400, "invalid_body"),
            Self::BadQuery(_) => (400, "invalid_query"),
            Self::ExpiresOutOfRange { .. } => (400, "invalid_body"),
            Self::BodyTooLarge { .. } => (413, "body_too_large"),
            Self::BatchTooLarge { .. } => (413, "batch_too_large"),
            Self::ResultTooLarge { .. } => (413, "result_too_large"),
            Self::CallbackTooLarge { .. } => (413, "callback_too_large"),
            Self::BadUpload(_) => (400, "invalid_upload"),
            Self::UploadTooLarge { .. } => (413, "result_too_large"),
            Self::NoBucket => (400, "large_results_disabled"),
            Self::CallbackNotAllowed(_) => (400, "callback_not_allowed"),
            Self::TooManyWaiters(_) => (409, "too_many_waiters"),
            Self::UnknownOperation(_) => (400, "unknown_operation"),
            Self::DelegationFailed(_) => (503, "delegation_failed"),
            Self::DelegationRefused(_) => (400, "delegation_refused"),
            Self::NoRoute { .. } => (404, "no_route"),
            Self::GroupNotFound(_) => (404, "group_not_found"),
            Self::ChordNotFound(_) => (404, "chord_not_found"),
            Self::Conflict { .. } => (409, "state_conflict"),
            Self::ClaimRefused { expires_in_ms: None, .. } => (409, "state_conflict"),
            Self::ClaimRefused { .. } => (409, "task_claimed"),
            Self::RedriveRefused(_) => (409, "redrive_refused"),
            Self::Unauthenticated => (401, "unauthenticated"),
            Self::UnknownTenant(_) => (403, "unknown_tenant"),
            Self::Throttled { .. } => (503, "throttled"),
            Self::Unavailable { .. } => (503, "unavailable"),
            Self::Internal(_) => (500, "internal"),
        }
    }

    /// Seconds for the `Retry-After` header, on the retryable errors.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::Throttled { retry_after_secs } | Self::Unavailable { retry_after_secs } => Some(*retry_after_secs),
            Self::DelegationFailed(_) => Some(1),
            _ => None,
        }
    }

    /// `{"error": {"code", "message", ...}}`; a conflict also names the stored status.
    ///
    /// A 5xx never shows the underlying error (an SDK's text can name ARNs,
    /// accounts and tables): its message is generic and names `request_id`,
    /// under which the log has the details.
    pub fn to_json(&self, request_id: &str) -> String {
        let (status, code) = self.status_and_code();
        let message = self.public_message(Some(request_id));
        let mut error = serde_json::json!({"code": code, "message": message});
        if status >= 500 {
            error["request_id"] = request_id.into();
        }
        if let Self::Conflict { stored, .. } | Self::ClaimRefused { stored, .. } = self {
            error["stored_status"] = stored.clone().into();
        }
        if let Self::ClaimRefused { expires_in_ms: Some(ms), .. } = self {
            // How long the holder's claim lives unless renewed.
            error["claim_expires_in"] = (*ms as f64 / 1000.0).into();
        }
        if let Self::ExpiresOutOfRange { max, .. } = self {
            // The package clamps a longer result_expires to this.
            error["max_expires_in"] = (*max).into();
        }
        serde_json::json!({ "error": error }).to_string()
    }
}

fn claim_refusal(task_id: &str, stored: &str, expires_in_ms: Option<u64>) -> String {
    match expires_in_ms {
        None => format!("task {task_id} is already {stored}; it is not run again"),
        Some(ms) => format!(
            "task {task_id} is claimed by another run ({stored}) for {:.1} s more unless renewed",
            ms as f64 / 1000.0
        ),
    }
}

/// What the store reports. Throttling and unreachability are retried inside
/// the store first; these are what is left when retries run out.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("item would be {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("throttled after {attempts} attempts")]
    Throttled { attempts: u32 },
    #[error("DynamoDB unreachable: {0}")]
    Unavailable(String),
    #[error("DynamoDB error: {0}")]
    Other(String),
    /// An uploaded result that cannot be committed (missing, altered, not JSON).
    #[error("{0}")]
    BadUpload(String),
    #[error("uploaded result over {limit} bytes")]
    UploadTooLarge { limit: u64 },
    /// A large result, and no results bucket to put it in.
    #[error("no results bucket")]
    NoBucket,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Throttled { .. } => ApiError::Throttled { retry_after_secs: 1 },
            StoreError::Unavailable(_) => ApiError::Unavailable { retry_after_secs: 2 },
            StoreError::TooLarge { size, limit } => ApiError::ResultTooLarge { size, limit },
            StoreError::Other(message) => ApiError::Internal(message),
            StoreError::BadUpload(message) => ApiError::BadUpload(message),
            StoreError::UploadTooLarge { limit } => ApiError::UploadTooLarge { limit },
            StoreError::NoBucket => ApiError::NoBucket,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_json_with_code_and_message() {
        let e = ApiError::Conflict { task_id: "t".into(), stored: "SUCCESS".into(), refused: "STARTED".into() };
        let v: serde_json::Value = serde_json::from_str(&e.to_json("r-1")).unwrap();
        assert_eq!(v["error"]["code"], "state_conflict");
        assert_eq!(v["error"]["stored_status"], "SUCCESS");
        assert!(v["error"]["message"].as_str().unwrap().contains("already SUCCESS"));
        assert_eq!(e.status_and_code().0, 409);
    }

    #[test]
    fn a_5xx_body_carries_no_sdk_text_only_the_request_id() {
        let detail = "AccessDeniedException: User: arn:aws:sts::123456789012:assumed-role/x is not authorized on table secret-table";
        let e = ApiError::from(StoreError::Other(detail.into()));
        assert_eq!(e.status_and_code(), (500, "internal"));
        let body = e.to_json("req-42");
        assert!(!body.contains("arn:") && !body.contains("123456789012") && !body.contains("secret-table"), "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["request_id"], "req-42");
        assert!(v["error"]["message"].as_str().unwrap().contains("req-42"));
        let unavailable = ApiError::from(StoreError::Unavailable(detail.into())).to_json("req-43");
        assert!(!unavailable.contains("arn:") && unavailable.contains("req-43"), "{unavailable}");
    }

    #[test]
    fn a_failed_delegation_shows_no_sdk_text_alone_or_in_a_bulk_answer() {
        let detail = "dispatch failure: arn:aws:sqs:eu-west-1:123456789012:secret-queue timed out";
        let e = ApiError::DelegationFailed(detail.into());
        for text in [e.to_json("req-7"), e.public_message(None)] {
            assert!(!text.contains("arn:") && !text.contains("123456789012"), "{text}");
            assert!(text.contains("could not be delegated"), "{text}");
        }
        assert!(e.to_json("req-7").contains("req-7"));
    }

    #[test]
    fn throttling_is_a_retryable_503() {
        let e = ApiError::from(StoreError::Throttled { attempts: 6 });
        assert_eq!(e.status_and_code(), (503, "throttled"));
        assert_eq!(e.retry_after(), Some(1));
    }
}
