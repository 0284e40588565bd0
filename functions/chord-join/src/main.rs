//! The `chord-join` function: a DynamoDB Streams consumer. Counts chord parts
//! once each, claims and joins complete chords, and dispatches each callback
//! once (see `dynachord::chord`). Also settles the processing cache's
//! entries (see `dynachord::cache::settle`), and sends a redriven chord's
//! failed parts again (see `dynachord::chord::redrive`). Both send by one protocol
//! (`dynachord::once`), and answer `batchItemFailures` so one bad chord or
//! entry never blocks or replays the rest of a batch.

use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use dynachord::cache::{done_of, Settler};
use dynachord::chord::{part_of, redrive_of, Joiner};
use dynachord::config::Config;
use dynachord::once::batch_item_failures;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    dynachord::init_tracing();
    let joiner = Joiner::from_env().await?;
    let settler = Settler::new(joiner.store.clone(), joiner.sink.clone(), Config::from_env()?);
    run(service_fn(|event: LambdaEvent<Event>| {
        let (joiner, settler) = (&joiner, &settler);
        async move {
            // The processing cache's tasks settle their entries; chord parts
            // join their chords; a redriving chord sends its failed parts again.
            let records = &event.payload.records;
            let parts = records.iter().filter_map(part_of).collect();
            let done = records.iter().filter_map(done_of).collect();
            let redrives = records.iter().filter_map(redrive_of).collect();
            let (joined, settled, redriven) =
                tokio::join!(joiner.handle_parts(parts), settler.handle(done), joiner.handle_redrives(redrives));
            let failures = joined.into_iter().chain(settled).chain(redriven);
            Ok::<DynamoDbEventResponse, Error>(batch_item_failures(failures))
        }
    }))
    .await
}
