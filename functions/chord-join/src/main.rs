//! The `chord-join` function: a DynamoDB Streams consumer. Counts chord parts
//! once each, claims and joins complete chords, and dispatches each callback
//! once (see `dynachord::chord`). Answers `batchItemFailures` so one bad
//! chord never blocks or replays the rest of a batch.

use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use dynachord::chord::Joiner;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    dynachord::init_tracing();
    let joiner = Joiner::from_env().await?;
    run(service_fn(|event: LambdaEvent<Event>| {
        let joiner = &joiner;
        async move { Ok::<DynamoDbEventResponse, Error>(joiner.handle(event.payload).await) }
    }))
    .await
}
