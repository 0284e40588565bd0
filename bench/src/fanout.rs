//! A chord body's fan-out (`--fanout N`): a one-part chord whose body is a
//! group of N tasks, from the part's store until the chord is dispatched
//! with all N messages on their queue; against, in the same run on the same
//! moto server, N raw SendMessage calls one at a time and N/10
//! SendMessageBatch calls one at a time. Each on a fresh queue (moto's sends
//! slow down as a queue fills). Medians over rounds.

use serde_json::json;
use std::time::{Duration, Instant};

use crate::{median, Service};

pub(crate) async fn fresh_queue(sqs: &aws_sdk_sqs::Client, tag: &str) -> String {
    let name = format!("bench-fan-{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    sqs.create_queue().queue_name(&name).send().await.expect("SQS answers").queue_url.unwrap()
}

pub(crate) async fn queued(sqs: &aws_sdk_sqs::Client, url: &str) -> usize {
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
        .expect("SQS answers");
    let count = attrs
        .attributes
        .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages).cloned());
    count.and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// One chord: the part's store until all `n` messages are on the queue.
async fn chord_fanout(service: &Service, sqs: &aws_sdk_sqs::Client, n: usize) -> f64 {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let url = fresh_queue(sqs, &tag).await;
    let queue = url.rsplit('/').next().unwrap().to_owned();
    let members: Vec<_> = (0..n)
        .map(|i| json!({"task": "bench.t", "options": {"task_id": format!("{tag}-{i}"), "queue": queue}}))
        .collect();
    let callback =
        json!({"task": "celery.group", "kwargs": {"tasks": members}, "options": {"task_id": format!("{tag}-cb")}});
    let part = json!({"status": "SUCCESS", "result": 1, "group_id": format!("{tag}-g"), "group_index": 0,
        "chord": {"size": 1, "callback": callback}});
    let started = Instant::now();
    service.send(service.http.put(format!("{}/v1/tasks/{tag}-p0", service.base)).body(part.to_string())).await;
    while queued(sqs, &url).await < n {
        assert!(started.elapsed() < Duration::from_secs(600), "the body's messages never all arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let _ = sqs.delete_queue().queue_url(&url).send().await;
    took
}

/// `n` messages sent raw, one request at a time, `per_request` a request.
async fn raw_sends(sqs: &aws_sdk_sqs::Client, n: usize, per_request: usize) -> f64 {
    use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
    let url = fresh_queue(sqs, "raw").await;
    let body = json!({"task": "bench.t", "args": [], "kwargs": {}}).to_string();
    let started = Instant::now();
    for start in (0..n).step_by(per_request) {
        let end = (start + per_request).min(n);
        if per_request == 1 {
            sqs.send_message().queue_url(&url).message_body(&body).send().await.expect("SQS answers");
        } else {
            let entries = (start..end).map(|i| {
                SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(&body).build().unwrap()
            });
            let batch = sqs.send_message_batch().queue_url(&url).set_entries(Some(entries.collect()));
            batch.send().await.expect("SQS answers");
        }
    }
    let took = started.elapsed().as_secs_f64();
    let _ = sqs.delete_queue().queue_url(&url).send().await;
    took
}

pub async fn fanout_bench(service: &Service, sqs: &aws_sdk_sqs::Client, n: usize, rounds: usize) {
    let (mut chord, mut single, mut batched) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        chord.push(chord_fanout(service, sqs, n).await);
        single.push(raw_sends(sqs, n, 1).await);
        batched.push(raw_sends(sqs, n, 10).await);
    }
    let (chord, single, batched) = (median(chord), median(single), median(batched));
    println!("\nfan-out: a one-part chord whose body is a group of {n} tasks, store -> all {n} messages on the queue");
    println!("{:<52} {:>9} {:>10}", "what (median)", "seconds", "vs chord");
    println!("{:<52} {chord:>9.3} {:>10}", format!("service: chord body of {n} tasks dispatched"), "1.00x");
    println!("{:<52} {single:>9.3} {:>9.2}x", format!("raw: SendMessage x {n}, one at a time"), single / chord);
    println!(
        "{:<52} {batched:>9.3} {:>9.2}x",
        format!("raw: SendMessageBatch x {}, one at a time", n.div_ceil(10)),
        batched / chord
    );
}
