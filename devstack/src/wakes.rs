//! The deadline queue's event source, as Lambda's SQS event source mapping
//! runs it on AWS: receives the messages that wake `chord-join` at a
//! chord's deadline (`dynachord::chord::deadline`), invokes it with them as
//! an SQS event, and deletes those it did not report in
//! `batchItemFailures`; those come back after their visibility timeout.

use serde_json::{json, Value};
use std::time::Duration;

/// The deadline queue's name on the local stack.
pub const DEADLINE_QUEUE: &str = "dynachord-chord-deadlines";

/// Receives from `queue_url` and invokes chord-join at `invoke_url`, for ever.
pub async fn run(sqs: aws_sdk_sqs::Client, queue_url: String, invoke_url: String, timeout: Duration) {
    let http = reqwest::Client::new();
    loop {
        let received =
            sqs.receive_message().queue_url(&queue_url).max_number_of_messages(10).wait_time_seconds(1).send().await;
        let messages = match received {
            Ok(out) => out.messages.unwrap_or_default(),
            Err(e) => {
                eprintln!("devstack: receiving deadline messages: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        let records: Vec<Value> = messages
            .iter()
            .map(|m| {
                json!({
                    "messageId": m.message_id(), "receiptHandle": m.receipt_handle(), "body": m.body(),
                    "attributes": {}, "messageAttributes": {}, "eventSource": "aws:sqs",
                    "eventSourceARN": format!("arn:aws:sqs:us-east-1:123456789012:{DEADLINE_QUEUE}"),
                    "awsRegion": "us-east-1",
                })
            })
            .collect();
        let answer = http.post(&invoke_url).json(&json!({ "Records": records })).timeout(timeout).send().await;
        let failed: Vec<String> = match answer {
            Ok(response) if response.status().is_success() => {
                let body: Value = response.json().await.unwrap_or(Value::Null);
                let failures = body["batchItemFailures"].as_array().cloned().unwrap_or_default();
                failures.iter().filter_map(|f| f["itemIdentifier"].as_str().map(str::to_owned)).collect()
            }
            // The whole batch comes back, as Lambda retries a failed invocation.
            other => {
                eprintln!("devstack: chord-join on deadline messages: {other:?}");
                continue;
            }
        };
        for message in messages.iter().filter(|m| !failed.iter().any(|f| Some(f.as_str()) == m.message_id())) {
            let handle = message.receipt_handle().unwrap_or_default();
            if let Err(e) = sqs.delete_message().queue_url(&queue_url).receipt_handle(handle).send().await {
                eprintln!("devstack: deleting a deadline message: {e}");
            }
        }
    }
}
