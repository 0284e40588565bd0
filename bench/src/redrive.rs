//! A chord's redrive (`--redrive 1000`): a chord of N parts of which one in
//! ten fails; the bench plays the worker, storing each part as Celery's does
//! with `result_extended`. Measured, medians over rounds: the first join
//! (the last part's store until the chord has failed); the redrive's
//! sending (its `POST` until every failed part's message is on the queue);
//! and the join again (the last re-run part's store until the callback is
//! on the queue). The tasks' own run time is not in any of them.

use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use crate::fanout::{fresh_queue, queued};
use crate::{median, Service};

/// The chord's status once `ready` holds for it.
async fn status_when(service: &Service, gid: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let resp = service.http.get(format!("{}/v1/chords/{gid}", service.base)).send().await.expect("answers");
        if resp.status().is_success() {
            let status: Value = resp.json().await.expect("JSON");
            if ready(&status) {
                return status;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(600), "chord {gid} never got there");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stores `parts` (index, status) of the chord, 32 at a time.
async fn store_parts(service: &Service, tag: &str, queue: &str, n: usize, parts: &[(usize, &str)]) {
    let callback = json!({"task": "bench.cb", "options": {"task_id": format!("{tag}-cb"), "queue": queue}});
    let bodies = parts.iter().map(|&(i, status)| {
        let result = if status == "FAILURE" {
            json!({"exc_type": "ValueError", "exc_message": ["first run fails", i], "exc_module": "builtins"})
        } else {
            json!(i)
        };
        let part = json!({"status": status, "result": result, "task_id": format!("{tag}-p{i}"),
            "name": "bench.t", "args": [i], "kwargs": {}, "queue": queue,
            "group_id": format!("{tag}-g"), "group_index": i, "chord": {"size": n, "callback": callback}});
        service.http.put(format!("{}/v1/tasks/{tag}-p{i}", service.base)).body(part.to_string())
    });
    futures::stream::iter(bodies)
        .for_each_concurrent(32, |req| async move {
            service.send(req).await;
        })
        .await;
}

/// One round: (first join, the redrive's sending, the join again), in seconds.
async fn round(service: &Service, sqs: &aws_sdk_sqs::Client, n: usize) -> (f64, f64, f64) {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let url = fresh_queue(sqs, &tag).await;
    let queue = url.rsplit('/').next().unwrap().to_owned();
    let gid = format!("{tag}-g");
    let failing: Vec<usize> = (0..n).filter(|i| i % 10 == 3).collect();
    let first: Vec<(usize, &str)> =
        (0..n).map(|i| (i, if failing.contains(&i) { "FAILURE" } else { "SUCCESS" })).collect();
    let (last, rest) = first.split_last().unwrap();
    store_parts(service, &tag, &queue, n, rest).await;
    let started = Instant::now();
    store_parts(service, &tag, &queue, n, std::slice::from_ref(last)).await;
    status_when(service, &gid, |s| s["state"] == "failed").await;
    let first_join = started.elapsed().as_secs_f64();

    let started = Instant::now();
    service.send(service.http.post(format!("{}/v1/chords/{gid}/redrive", service.base))).await;
    while queued(sqs, &url).await < failing.len() {
        assert!(started.elapsed() < Duration::from_secs(600), "the failed parts never all arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resend = started.elapsed().as_secs_f64();
    // The redrive has opened the chord before the parts run again (as a worker's would).
    status_when(service, &gid, |s| s["state"] == "open").await;

    let rerun: Vec<(usize, &str)> = failing.iter().map(|&i| (i, "SUCCESS")).collect();
    let (last, rest) = rerun.split_last().unwrap();
    store_parts(service, &tag, &queue, n, rest).await;
    let started = Instant::now();
    store_parts(service, &tag, &queue, n, std::slice::from_ref(last)).await;
    while queued(sqs, &url).await < failing.len() + 1 {
        assert!(started.elapsed() < Duration::from_secs(600), "the callback never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rejoin = started.elapsed().as_secs_f64();
    let status = status_when(service, &gid, |s| s["state"] == "dispatched").await;
    assert_eq!(status["succeeded"], json!(n), "{status}");
    let _ = sqs.delete_queue().queue_url(&url).send().await;
    (first_join, resend, rejoin)
}

pub async fn redrive_bench(service: &Service, sqs: &aws_sdk_sqs::Client, n: usize, rounds: usize) {
    let (mut first, mut resend, mut rejoin) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (a, b, c) = round(service, sqs, n).await;
        first.push(a);
        resend.push(b);
        rejoin.push(c);
    }
    let failed = (0..n).filter(|i| i % 10 == 3).count();
    let (first, resend, rejoin) = (median(first), median(resend), median(rejoin));
    println!("\nredrive: a chord of {n} parts, {failed} of them failed, redriven (the tasks' run time aside)");
    println!("{:<62} {:>9} {:>12}", "what (median)", "seconds", "vs 1st join");
    println!("{:<62} {first:>9.3} {:>12}", "first join: last part stored -> chord failed", "1.00x");
    println!(
        "{:<62} {resend:>9.3} {:>11.2}x",
        format!("redrive: POST -> all {failed} failed parts on the queue"),
        resend / first
    );
    println!(
        "{:<62} {rejoin:>9.3} {:>11.2}x",
        "join again: last re-run part stored -> callback on the queue",
        rejoin / first
    );
}
