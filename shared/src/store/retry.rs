//! Exponential backoff with full jitter, for the retries the SDK does not do
//! itself (unprocessed batch keys). The SDK's own retries (throttling,
//! transient errors) use the same attempts and delays, set in
//! [`crate::aws::shared_config`]. And what an SDK error means once they are
//! spent ([`classify`]), for DynamoDB and S3 alike.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use rand::Rng;
use std::time::Duration;

use crate::config::Config;
use crate::error::StoreError;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub max_attempts: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn from_config(config: &Config) -> Self {
        Self { max_attempts: config.ddb_max_attempts, initial: config.ddb_initial_backoff, max: config.ddb_max_backoff }
    }

    /// The delay before retry number `retry` (1 for the first retry): a
    /// uniform draw from zero to `initial * 2^(retry-1)`, capped at `max`.
    pub fn delay(&self, retry: u32) -> Duration {
        let ceiling = self.initial.saturating_mul(1 << retry.saturating_sub(1).min(20)).min(self.max);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }
}

const THROTTLING_CODES: [&str; 6] = [
    "SlowDown",
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
    "Throttling",
    "TransactionInProgressException",
];

/// Maps an SDK error (after the SDK's own retries) to what the caller should
/// hear: throttling and unreachability are retryable 503s, the rest 500.
pub fn classify<E, R>(err: SdkError<E, R>, attempts: u32) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    if err.code().is_some_and(|code| THROTTLING_CODES.contains(&code)) {
        return StoreError::Throttled { attempts };
    }
    let detail = aws_sdk_dynamodb::error::DisplayErrorContext(&err).to_string();
    match &err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            StoreError::Unavailable(detail)
        }
        _ if matches!(err.code(), Some("InternalServerError" | "ServiceUnavailable")) => {
            StoreError::Unavailable(detail)
        }
        _ => StoreError::Other(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_cap_and_are_jittered() {
        let b = Backoff { max_attempts: 10, initial: Duration::from_millis(10), max: Duration::from_millis(100) };
        for _ in 0..200 {
            assert!(b.delay(1) <= Duration::from_millis(10));
            assert!(b.delay(3) <= Duration::from_millis(40));
            assert!(b.delay(30) <= Duration::from_millis(100));
        }
        let draws: std::collections::HashSet<_> = (0..50).map(|_| b.delay(5)).collect();
        assert!(draws.len() > 5, "jitter spreads retries");
    }
}
