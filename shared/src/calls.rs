//! Counts the DynamoDB requests made while serving one HTTP request, retries
//! included, so "one store = one write" is something we can measure rather
//! than hope: every response carries the count in `x-dynachord-ddb-calls`,
//! and the benchmark reads it. S3 requests (large results) are counted the
//! same way, in `x-dynachord-s3-calls`.
//!
//! The count lives in a task-local, so concurrent requests in one process do
//! not mix; work done for a request must stay in its task (join futures,
//! don't spawn), which the store does.

use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use std::cell::Cell;
use std::future::Future;

tokio::task_local! {
    static CALLS: Cell<u32>;
    static RETRIES: Cell<u32>;
    static S3_CALLS: Cell<u32>;
}

/// The requests one piece of work made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// DynamoDB requests, retries included.
    pub ddb: u32,
    /// Of those, the retries: the SDK's own (throttling, transient errors)
    /// and the store's (unprocessed batch keys).
    pub ddb_retries: u32,
    /// S3 requests (large results).
    pub s3: u32,
}

/// Notes a DynamoDB request that repeats an earlier one (the store's own
/// retry of unprocessed keys); the SDK's retries are noted by [`CountCalls`].
pub fn note_retry() {
    let _ = RETRIES.try_with(|r| r.set(r.get() + 1));
}

/// Runs `work`, returning its output and the DynamoDB requests it sent.
pub async fn counted<F: Future>(work: F) -> (F::Output, u32) {
    let ((out, ddb), _) = counted_s3(counted_ddb(work)).await;
    (out, ddb)
}

/// Runs `work`, returning its output and every request it made.
pub async fn counted_all<F: Future>(work: F) -> (F::Output, Calls) {
    let work = RETRIES.scope(Cell::new(0), async move {
        let out = work.await;
        (out, RETRIES.with(Cell::get))
    });
    let (((out, ddb_retries), ddb), s3) = counted_s3(counted_ddb(work)).await;
    (out, Calls { ddb, ddb_retries, s3 })
}

async fn counted_ddb<F: Future>(work: F) -> (F::Output, u32) {
    CALLS
        .scope(Cell::new(0), async move {
            let out = work.await;
            (out, CALLS.with(Cell::get))
        })
        .await
}

async fn counted_s3<F: Future>(work: F) -> (F::Output, u32) {
    S3_CALLS
        .scope(Cell::new(0), async move {
            let out = work.await;
            (out, S3_CALLS.with(Cell::get))
        })
        .await
}

/// As [`CountCalls`], for the S3 client: one tick per request that went
/// out. Counted after transmission, because presigning a URL runs the same
/// pipeline up to the transmit and sends nothing.
#[derive(Debug, Default)]
pub struct CountS3Calls;

impl Intercept for CountS3Calls {
    fn name(&self) -> &'static str {
        "dynachord::CountS3Calls"
    }

    fn read_after_transmit(
        &self,
        _context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let _ = S3_CALLS.try_with(|calls| calls.set(calls.get() + 1));
        Ok(())
    }
}

/// The SDK interceptor that feeds [`counted`]: one tick per request sent
/// (each retry attempt is a request).
#[derive(Debug, Default)]
pub struct CountCalls;

impl Intercept for CountCalls {
    fn name(&self) -> &'static str {
        "dynachord::CountCalls"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // Outside `counted` (start-up, table creation) there is nothing to count.
        let _ = CALLS.try_with(|calls| calls.set(calls.get() + 1));
        let attempt = cfg.load::<RequestAttempts>().map_or(1, RequestAttempts::attempts);
        if attempt > 1 {
            note_retry();
        }
        Ok(())
    }
}
