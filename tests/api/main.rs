//! The integration suite: the real functions under `cargo lambda watch`, on
//! DynamoDB Local, over HTTP, as a worker would call them. `./dev test`
//! starts the local stack (or reuses one that is up) and runs this.
//!
//! Every test makes its own ids (a random prefix per test), so tests run in
//! parallel and in any order on one table.

mod helpers;
mod sqs;

mod batch;
mod cache;
mod chords;
mod claims;
mod errors;
mod front_doors;
mod groups;
mod large;
mod limits;
mod longpoll;
mod races;
mod tasks;
mod tenants;
