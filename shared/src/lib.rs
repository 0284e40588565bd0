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
//! Layers point one way: a module uses only those listed before it. The
//! list, with what each layer holds, is in `docs/ARCHITECTURE.md` ("The
//! library's layers"); it is written there once.

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
