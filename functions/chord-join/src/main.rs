//! The `chord-join` function: a DynamoDB Streams consumer. Counts chord parts
//! once each, claims and joins complete chords, and dispatches each callback
//! once (see `dynachord::chord`). Also settles the processing cache's
//! entries (see `dynachord::cache::settle`), and sends a redriven chord's
//! failed parts again (see `dynachord::chord::redrive`). Messages of the
//! deadline queue wake it to report a chord open past its deadline (see
//! `dynachord::chord::deadline`). Both send by one protocol
//! (`dynachord::once`), and answer `batchItemFailures` so one bad chord or
//! entry never blocks or replays the rest of a batch.

use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use dynachord::cache::{done_of, Settler};
use dynachord::chord::{part_of, redrive_of, wake_of, Joiner};
use dynachord::config::Config;
use dynachord::once::batch_item_failures;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    dynachord::init_tracing();
    let joiner = Joiner::from_env().await?;
    let settler = Settler::new(joiner.store.clone(), joiner.sink.clone(), Config::from_env()?);
    run(service_fn(|event: LambdaEvent<Value>| {
        let (joiner, settler) = (&joiner, &settler);
        async move {
            let records = event.payload.get("Records").and_then(Value::as_array).cloned().unwrap_or_default();
            // The deadline queue's messages: chords to look at past their deadline.
            if records.first().and_then(|r| r.get("eventSource")).and_then(Value::as_str) == Some("aws:sqs") {
                let wakes = records.iter().filter_map(wake_of).collect();
                return Ok::<DynamoDbEventResponse, Error>(batch_item_failures(joiner.handle_wakes(wakes).await));
            }
            // The processing cache's tasks settle their entries; chord parts
            // join their chords; a redriving chord sends its failed parts again.
            let event: Event = serde_json::from_value(event.payload)?;
            let records = &event.records;
            let parts = records.iter().filter_map(part_of).collect();
            let done = records.iter().filter_map(done_of).collect();
            let redrives = records.iter().filter_map(redrive_of).collect();
            let (joined, settled, redriven) =
                tokio::join!(joiner.handle_parts(parts), settler.handle(done), joiner.handle_redrives(redrives));
            let failures = joined.into_iter().chain(settled).chain(redriven);
            Ok(batch_item_failures(failures))
        }
    }))
    .await
}
