//! dynachord's backend library: everything the Lambda functions do, testable
//! without Lambda.
//!
//! A worker stores a Celery task result with one conditional write; clients read
//! it back with a consistent read, long-poll until it is ready, or fetch many at
//! once with parallel `BatchGetItem`. The functions in `functions/*` are thin:
//! they build an [`http::App`] once and hand each request to [`http::handle`].
//!
//! # Layout
//!
//! Layers point one way: a module uses only those listed before it (see
//! `docs/ARCHITECTURE.md`).
//!
//! - [`ids`], [`time`], [`whole`]: validated identifiers (an invalid id cannot be
//!   constructed, so it never reaches a key), wall-clock helpers, and whole
//!   numbers as JSON Schema counts them.
//! - [`celery`]: Celery's wire formats: the signature, Python reprs, kombu's
//!   queue names and SQS envelope.
//! - [`meta`]: Celery task meta and states: what a worker stores and a client reads.
//! - [`tenants`], [`config`]: the caller's namespace from its IAM identity
//!   (`TENANTS`), and the one typed configuration, read at init.
//! - [`error`]: the error types of each boundary.
//! - [`calls`], [`metrics`]: the DynamoDB requests each request makes, and
//!   CloudWatch metrics written as log lines.
//! - [`store`]: the [`store::ResultStore`] and [`store::ChordStore`] traits,
//!   their DynamoDB implementation, the table schema, retry/backoff.
//! - [`dispatch`]: callback targets: Celery task messages on SQS, Lambda invokes.
//! - [`chord`]: the chord join from DynamoDB Streams (the `chord-join` function).
//! - [`service`]: the operations behind the routes (store, fetch, long-poll,
//!   batch-get, forget, groups), generic over the store.
//! - [`cache`]: the processing cache: get-or-delegate, invalidate, entry
//!   state, and the settling of processings from the stream.
//! - [`local`]: the SDK configuration of the local stack's tools.
//! - [`http`]: routes, request parsing (auth, body cap, query), and the mapping
//!   of every error to a status and a JSON body.

pub mod aws;
pub mod cache;
pub mod calls;
pub mod celery;
pub mod chord;
pub mod config;
pub mod dispatch;
pub mod error;
#[cfg(test)]
mod fakes;
pub mod http;
pub mod ids;
pub mod meta;
pub mod metrics;
pub mod once;
#[cfg(test)]
mod scripted;
pub mod service;
pub mod store;
pub mod stream;
pub mod tenants;
pub mod time;
pub mod whole;

/// Sets up tracing for a function: JSON lines, level from `RUST_LOG` (default
/// `info`). Call once at the top of `main`.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .with_target(false)
        .without_time()
        .init();
}
