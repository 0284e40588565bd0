//! The `chord-join` function: a DynamoDB Streams consumer. Counts chord parts
//! once each, claims and joins complete chords, and dispatches each callback
//! once (see `dynachord::chord`). Answers `batchItemFailures` so one bad
//! chord never blocks or replays the rest of a batch. Also settles the
//! processing cache's entries (see `dynachord::cache`).

use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use dynachord::cache::{done_of, Settler};
use dynachord::chord::Joiner;
use dynachord::config::Config;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    dynachord::init_tracing();
    let joiner = Joiner::from_env().await?;
    let settler = Settler::new(joiner.store.clone(), joiner.sink.clone(), Config::from_env()?);
    run(service_fn(|event: LambdaEvent<Event>| {
        let (joiner, settler) = (&joiner, &settler);
        async move {
            // The processing cache's tasks settle their entries; chord parts join their chords.
            let done = event.payload.records.iter().filter_map(done_of).collect();
            let (mut response, settled) = tokio::join!(joiner.handle(event.payload), settler.handle(done));
            for sequence in settled {
                let mut failure = aws_lambda_events::event::streams::DynamoDbBatchItemFailure::default();
                failure.item_identifier = Some(sequence);
                response.batch_item_failures.push(failure);
            }
            Ok::<DynamoDbEventResponse, Error>(response)
        }
    }))
    .await
}
