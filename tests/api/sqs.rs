//! Reading chord callbacks from the local stack's SQS (moto), decoded from
//! kombu's envelope into Celery's message.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value;
use std::time::{Duration, Instant};

pub struct Queue {
    client: aws_sdk_sqs::Client,
    pub name: String,
    url: String,
}

/// A Celery task message as a worker would see it.
#[derive(Debug)]
pub struct TaskMessage {
    pub headers: Value,
    pub properties: Value,
    /// `[args, kwargs, embed]`
    pub body: Value,
    /// The same, as sent.
    pub raw_body: String,
}

impl Queue {
    /// A new, empty queue of this test's own.
    pub async fn new(name: &str) -> Self {
        let endpoint = std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".into());
        let config = dynachord::aws::local_config(Some(&endpoint)).await;
        let client = aws_sdk_sqs::Client::new(&config);
        let url = client.create_queue().queue_name(name).send().await.expect("moto's SQS answers").queue_url.unwrap();
        Self { client, name: name.to_owned(), url }
    }

    /// Receives every message that arrives within `window` (deleting them).
    pub async fn drain(&self, window: Duration) -> Vec<TaskMessage> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            let wait = (deadline - Instant::now()).as_secs().clamp(1, 5) as i32;
            let got = self
                .client
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(10)
                .wait_time_seconds(wait)
                .send()
                .await
                .unwrap();
            for m in got.messages.unwrap_or_default() {
                self.client
                    .delete_message()
                    .queue_url(&self.url)
                    .receipt_handle(m.receipt_handle.unwrap())
                    .send()
                    .await
                    .unwrap();
                out.push(decode(&m.body.unwrap()));
            }
        }
        out
    }

    /// Waits up to `limit` for the first message, then collects what else
    /// arrives in the following `settle` (to catch duplicates).
    pub async fn expect(&self, limit: Duration, settle: Duration) -> Vec<TaskMessage> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < deadline {
            got = self.drain(Duration::from_secs(2)).await;
        }
        if !got.is_empty() {
            got.extend(self.drain(settle).await);
        }
        got
    }
}

fn decode(body: &str) -> TaskMessage {
    let envelope: Value =
        serde_json::from_slice(&B64.decode(body).expect("message body is base64")).expect("envelope is JSON");
    assert_eq!(envelope["properties"]["body_encoding"], "base64");
    assert_eq!(envelope["content-type"], "application/json");
    let inner = String::from_utf8(B64.decode(envelope["body"].as_str().unwrap()).unwrap()).unwrap();
    TaskMessage {
        headers: envelope["headers"].clone(),
        properties: envelope["properties"].clone(),
        body: serde_json::from_str(&inner).expect("Celery body is JSON"),
        raw_body: inner,
    }
}
