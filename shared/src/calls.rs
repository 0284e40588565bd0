//! Counts the DynamoDB requests made while serving one HTTP request, retries
//! included, so "one store = one write" is something we can measure rather
//! than hope: every response carries the count in `x-dynachord-ddb-calls`,
//! and the benchmark reads it.
//!
//! The count lives in a task-local, so concurrent requests in one process do
//! not mix; work done for a request must stay in its task (join futures,
//! don't spawn), which the store does.

use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use std::cell::Cell;
use std::future::Future;

tokio::task_local! {
    static CALLS: Cell<u32>;
}

/// Runs `work`, returning its output and the DynamoDB requests it sent.
pub async fn counted<F: Future>(work: F) -> (F::Output, u32) {
    CALLS
        .scope(Cell::new(0), async move {
            let out = work.await;
            (out, CALLS.with(Cell::get))
        })
        .await
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
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // Outside `counted` (start-up, table creation) there is nothing to count.
        let _ = CALLS.try_with(|calls| calls.set(calls.get() + 1));
        Ok(())
    }
}
