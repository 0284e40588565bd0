use super::*;
use crate::once::PERSIST_ATTEMPTS;
use crate::store::TaskRecord;
use crate::time::now_epoch;
use serde_json::{json, Value};

#[test]
fn results_are_taken_raw() {
    assert_eq!(
        result_of(r#"{"status":"SUCCESS","result":{"n":1.50,"big":123456789012345678901234567890}}"#),
        r#"{"n":1.50,"big":123456789012345678901234567890}"#
    );
    assert_eq!(result_of(r#"{"status":"SUCCESS"}"#), "null");
}

use super::memory::MemoryChordStore as MemoryStore;
use crate::dispatch::DispatchError;
use crate::fakes::{transient, unknown, FakeSink};
use crate::store::{PutOutcome, ResultStore};
use std::sync::atomic::Ordering;

const CALLBACK: &str = r#"{"task":"t.sum","args":[],"kwargs":{},"options":{"task_id":"cb",
    "link_error":[{"task":"t.e1","options":{"task_id":"e1"}},{"task":"t.e2","options":{"task_id":"e2"}}]}}"#;

/// group(t.a.on_error(e.own), t.b | t.c) with the group's errback e.all
/// also on t.a (as group.on_error leaves it) and on the group itself.
const GROUP_WITH_ERRBACKS: &str = r#"{"task":"celery.group","options":{"task_id":"grp","link_error":[{"task":"e.all"}]},
    "kwargs":{"tasks":[
      {"task":"t.a","options":{"task_id":"ga","link_error":[{"task":"e.own"},{"task":"e.all"}]}},
      {"task":"celery.chain","options":{},"kwargs":{"tasks":[
        {"task":"t.b","options":{"task_id":"gb"}},{"task":"t.c","options":{"task_id":"gc"}}]}}]}}"#;

fn joiner(sink: FakeSink) -> Joiner<MemoryStore, FakeSink> {
    Joiner::new(MemoryStore::default(), sink, &Config::for_table("t"))
}

fn gid() -> GroupId {
    GroupId::parse("g1").unwrap()
}

/// Stores part `i` of a chord of `size` with `status` and result `i`,
/// and returns the stream's view of it.
async fn part(j: &Joiner<MemoryStore, FakeSink>, i: u32, size: u32, status: &str) -> Part {
    part_with(j, i, size, status, CALLBACK).await
}

async fn part_with(j: &Joiner<MemoryStore, FakeSink>, i: u32, size: u32, status: &str, callback: &str) -> Part {
    let ns = Namespace::default();
    let task_id = TaskId::parse(&format!("p{i}")).unwrap();
    // A failed part's result is its exception, as Celery stores it.
    let result = if status == "FAILURE" {
        format!(r#"{{"exc_type":"ValueError","exc_message":["part {i}"],"exc_module":"builtins"}}"#)
    } else {
        i.to_string()
    };
    let json = format!(r#"{{"status":"{status}","result":{result},"task_id":"p{i}"}}"#);
    let status = State::parse(status).unwrap();
    let failed = status != State::Success;
    let record = TaskRecord {
        task_id: task_id.clone(),
        status,
        json,
        expires_at: now_epoch() + 3600,
        group_id: Some(gid()),
        group_index: Some(i),
        chord: None,
        upload: None,
        claim: None,
    };
    assert_eq!(j.store.put_task(&ns, &record).await.unwrap(), PutOutcome::Stored);
    Part {
        sequence: format!("seq-{i}"),
        ns,
        group_id: gid(),
        chord: ChordRegistration {
            size,
            callback: callback.into(),
            callback_id: "cb".into(),
            deadline: Signature::parse(callback).ok().and_then(|s| s.deadline().ok().flatten()).map(|d| d.seconds),
        },
        part: ChordPart {
            index: i,
            task_id,
            expires_at: now_epoch() + 3600,
            failed,
            stored_at: Some(crate::time::now_millis()),
        },
    }
}

async fn chord_of(j: &Joiner<MemoryStore, FakeSink>, statuses: &[&str]) -> Vec<Part> {
    let mut parts = Vec::new();
    for (i, status) in statuses.iter().enumerate() {
        parts.push(part(j, i as u32, statuses.len() as u32, status).await);
    }
    parts
}

async fn phase(j: &Joiner<MemoryStore, FakeSink>) -> ChordState {
    j.store.chord_state(&Namespace::default(), &gid()).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_complete_chord_calls_back_once_with_results_in_order_and_a_replay_changes_nothing() {
    let j = joiner(FakeSink::default());
    let parts = chord_of(&j, &["SUCCESS", "SUCCESS", "SUCCESS"]).await;
    let mut shuffled = parts.clone();
    shuffled.reverse();
    assert!(j.handle_parts(shuffled).await.is_empty());
    assert_eq!(j.sink.sent(), [("t.sum".into(), "cb".into(), "[[0,1,2]]".into())]);
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    // The same batch again, and again: nothing more is counted or sent.
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent().len(), 1);
    assert_eq!(phase(&j).await.done, 3);
}

#[tokio::test]
async fn a_header_whose_chain_ends_in_a_group_calls_back_with_that_groups_results_nested() {
    // chord([a, b | group(c, d), e], cb) as the Celery package sends it:
    // four parts in slot order, the shape nesting c's and d's results.
    let callback =
        r#"{"task":"t.sum","args":[],"options":{"task_id":"cb","dynachord_header_shape":[null,[null,null],null]}}"#;
    let j = joiner(FakeSink::default());
    let mut parts = Vec::new();
    for i in 0..4 {
        parts.push(part_with(&j, i, 4, "SUCCESS", callback).await);
    }
    parts.reverse();
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent(), [("t.sum".into(), "cb".into(), "[[0,[1,2],3]]".into())]);
}

/// A group as the body, as Celery freezes it: three tasks, one immutable.
const GROUP_BODY: &str = r#"{"task":"celery.group","kwargs":{"tasks":[
    {"task":"t.a","args":[],"options":{"task_id":"g0","group_index":0}},
    {"task":"t.b","args":[7],"options":{"task_id":"g1","group_index":1}},
    {"task":"t.c","args":[9],"immutable":true,"options":{"task_id":"g2","group_index":2}}]},
    "options":{"task_id":"cb"}}"#;

async fn group_bodied(j: &Joiner<MemoryStore, FakeSink>) -> Vec<Part> {
    vec![part_with(j, 0, 2, "SUCCESS", GROUP_BODY).await, part_with(j, 1, 2, "SUCCESS", GROUP_BODY).await]
}

fn group_sent() -> Vec<(String, String, String)> {
    [("t.a", "g0", "[[0,1]]"), ("t.b", "g1", "[[0,1],7]"), ("t.c", "g2", "[9]")]
        .map(|(t, id, args)| (t.to_owned(), id.to_owned(), args.to_owned()))
        .to_vec()
}

#[tokio::test]
async fn a_group_body_sends_each_task_once_with_the_results_even_when_a_send_fails_midway() {
    let j = joiner(FakeSink::answering(vec![Ok(()), Err(transient())]));
    let parts = group_bodied(&j).await;
    assert_eq!(j.handle_parts(parts.clone()).await.len(), 2, "retried after the second send failed");
    let state = phase(&j).await;
    assert_eq!((state.phase, state.body_sent, state.attempts), (ChordPhase::Open, 1, 1));
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent(), group_sent(), "each task once, in order, the results first unless immutable");
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
}

#[tokio::test]
async fn a_group_body_whose_progress_cannot_be_recorded_goes_on_without_sending_twice() {
    let mut j = joiner(FakeSink::default());
    j.window_messages = 1;
    j.store.ext.fail_records.store(PERSIST_ATTEMPTS, Ordering::SeqCst);
    let parts = group_bodied(&j).await;
    assert_eq!(j.handle_parts(parts.clone()).await.len(), 2);
    assert_eq!(j.sink.sent().len(), 1, "stopped after the send it could not record");
    assert_eq!(phase(&j).await.phase, ChordPhase::Joining, "the claim is kept after a send");
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent(), group_sent());
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
}

/// An errback went out, and every attempt to record it failed: the
/// records come again, and the join goes on from the next errback in
/// this process, never sending the first again (C3).
#[tokio::test]
async fn an_errback_whose_record_fails_is_never_sent_again() {
    let mut j = joiner(FakeSink::default());
    j.window_messages = 1;
    j.store.ext.fail_errback_records.store(PERSIST_ATTEMPTS, Ordering::SeqCst);
    let parts = chord_of(&j, &["SUCCESS", "FAILURE"]).await;
    assert_eq!(j.handle_parts(parts.clone()).await.len(), 2, "the records come again");
    let sent = |j: &Joiner<MemoryStore, FakeSink>| -> Vec<String> { j.sink.sent().into_iter().map(|s| s.0).collect() };
    assert_eq!(sent(&j), ["t.e1"], "stopped after the errback it could not record");
    assert_eq!(phase(&j).await.phase, ChordPhase::Joining, "the claim is kept after a send");
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(sent(&j), ["t.e1", "t.e2"], "each errback once");
    assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
}

#[tokio::test]
async fn a_group_body_that_fails_midway_fails_only_the_tasks_not_sent() {
    let mut j = joiner(FakeSink::answering(vec![Ok(()), Err(transient())]));
    j.config.max_attempts = 1;
    let parts = group_bodied(&j).await;
    assert!(j.handle_parts(parts).await.is_empty(), "failed for good on its last attempt");
    assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
    let (ns, store) = (Namespace::default(), &j.store);
    for (id, expected) in
        [("g0", None), ("g1", Some(State::Failure)), ("g2", Some(State::Failure)), ("cb", Some(State::Failure))]
    {
        let status = store.get_task(&ns, &TaskId::parse(id).unwrap()).await.unwrap().map(|s| s.status);
        // g0 was sent: it runs and stores its own result. The others never run: their waiters get the ChordError.
        assert_eq!(status, expected, "{id}");
    }
}

#[tokio::test]
async fn a_lost_claim_sends_nothing() {
    let j = joiner(FakeSink::default());
    j.store.ext.steal_claims.store(true, Ordering::SeqCst);
    let before = metrics::total(metrics::CHORD_CLAIM_LOST);
    let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
    assert!(j.handle_parts(parts).await.is_empty());
    assert!(j.sink.sent().is_empty(), "nothing sent once the claim is not ours");
    assert!(metrics::total(metrics::CHORD_CLAIM_LOST) > before);
}

#[tokio::test]
async fn a_transient_send_error_gives_the_claim_back_and_the_callback_goes_once_later() {
    let j = joiner(FakeSink::answering(vec![Err(transient())]));
    let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
    let retry = j.handle_parts(parts.clone()).await;
    assert_eq!(retry, ["seq-0", "seq-1"], "the records are retried");
    let state = phase(&j).await;
    assert_eq!((state.phase, state.attempts), (ChordPhase::Open, 1), "claim given back, attempt counted");
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent().len(), 1, "sent once: {:?}", j.sink.sent());
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
}

/// A body larger than a window goes out window by window, its progress
/// recorded after each; a window that stops midway records what went out,
/// and the retry sends only the rest.
#[tokio::test]
async fn a_body_goes_out_in_windows_and_a_retry_sends_only_what_did_not_go_out() {
    let mut j = joiner(FakeSink::answering(vec![Ok(()), Ok(()), Err(transient())]));
    j.window_messages = 2;
    let parts = group_bodied(&j).await;
    assert_eq!(j.handle_parts(parts.clone()).await.len(), 2, "retried: the second window did not go out");
    let state = phase(&j).await;
    assert_eq!((state.phase, state.body_sent, state.body_sending), (ChordPhase::Open, 2, 2));
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent(), group_sent(), "each task once, in order");
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
}

/// Sent together, a window's middle message did not go out while a later
/// one did: sending it again later would repeat the later one, so the
/// chord fails, sparing the tasks that went out (they run).
#[tokio::test]
async fn a_window_whose_middle_message_did_not_go_out_fails_the_chord_sparing_those_that_did() {
    let mut sink = FakeSink::answering(vec![Ok(()), Err(transient()), Ok(())]);
    sink.all_at_once = true;
    let j = joiner(sink);
    let parts = group_bodied(&j).await;
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    let state = phase(&j).await;
    assert_eq!(state.phase, ChordPhase::Failed);
    assert!(state.error.as_deref().unwrap().contains("ThrottlingException"), "{state:?}");
    let sent: Vec<String> = j.sink.sent().into_iter().map(|s| s.1).collect();
    assert_eq!(sent, ["g0", "g2"], "nothing sent again");
    let ns = Namespace::default();
    for (id, expected) in [("g0", None), ("g1", Some(State::Failure)), ("g2", None), ("cb", Some(State::Failure))] {
        let status = j.store.get_task(&ns, &TaskId::parse(id).unwrap()).await.unwrap().map(|s| s.status);
        assert_eq!(status, expected, "{id}");
    }
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent().len(), 2);
}

/// A send that may have gone out (a time-out, a 5xx after the request
/// went out) counts as sent: the join goes on, and neither it nor a replay
/// sends that message again (O5).
#[tokio::test]
async fn a_send_whose_outcome_is_unknown_counts_as_sent_and_is_never_sent_again() {
    let j = joiner(FakeSink::answering(vec![Ok(()), Err(unknown())]));
    let before = metrics::total(metrics::SEND_OUTCOME_UNKNOWN);
    let parts = group_bodied(&j).await;
    assert!(j.handle_parts(parts.clone()).await.is_empty(), "nothing to retry");
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent(), group_sent(), "each task once, the unknown one included");
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    assert!(metrics::total(metrics::SEND_OUTCOME_UNKNOWN) > before);
    // An errback too: the next one goes out, and none twice.
    let j = joiner(FakeSink::answering(vec![Err(unknown())]));
    let parts = chord_of(&j, &["SUCCESS", "FAILURE"]).await;
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    assert!(j.handle_parts(parts).await.is_empty());
    let sent: Vec<String> = j.sink.sent().into_iter().map(|s| s.0).collect();
    assert_eq!(sent, ["t.e1", "t.e2"]);
    assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
}

/// A joiner whose chord (a group body when `statuses` is empty) was claimed
/// by an invocation that re-checked its claim for a send (`sending`) and
/// died: its lease has run out.
async fn dead_claimer(sending: Sending, statuses: &[&str]) -> (Joiner<MemoryStore, FakeSink>, Vec<Part>) {
    let (ns, lease) = (Namespace::default(), Duration::from_secs(60));
    let j = joiner(FakeSink::default());
    let parts = match statuses {
        [] => group_bodied(&j).await,
        statuses => chord_of(&j, statuses).await,
    };
    let counted: Vec<ChordPart> = parts.iter().map(|p| p.part.clone()).collect();
    j.store.count_parts(&ns, &gid(), &parts[0].chord, &counted).await.unwrap();
    assert!(j.store.claim_chord(&ns, &gid(), "dead", lease).await.unwrap().is_some());
    if let Sending::Errbacks(_) = sending {
        let error = "ChordError: Dependency p1 raised ValueError('part 1')";
        assert!(j.store.record_failure(&ns, &gid(), "dead", error, 0).await.unwrap());
    }
    assert!(j.store.renew_claim(&ns, &gid(), "dead", lease, sending).await.unwrap());
    j.store.lapse_claims();
    (j, parts)
}

/// A claimer that re-checked its claim for a send and then died (a crash,
/// a time-out: the send may or may not have gone out) leaves its mark on
/// the chord's state. The invocation that takes the chord over when the
/// lease runs out never sends that message again: the body's next
/// message, or the next errback, is the first it sends (O5).
#[tokio::test]
async fn a_claim_taken_over_from_one_that_was_sending_never_sends_that_message_again() {
    let before = metrics::total(metrics::CHORD_RESEND_SKIPPED);
    let (j, parts) = dead_claimer(Sending::Body(1), &[]).await;
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent(), group_sent()[1..], "the first task, which may have gone out, is not sent again");
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    assert!(metrics::total(metrics::CHORD_RESEND_SKIPPED) > before);
    // A single callback that may have gone out: the chord is marked dispatched, nothing sent.
    let (j, parts) = dead_claimer(Sending::Body(1), &["SUCCESS", "SUCCESS"]).await;
    assert!(j.handle_parts(parts).await.is_empty());
    assert!(j.sink.sent().is_empty());
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    // Errbacks: the first may have gone out, the second goes.
    let (j, parts) = dead_claimer(Sending::Errbacks(1), &["SUCCESS", "FAILURE"]).await;
    assert!(j.handle_parts(parts).await.is_empty());
    let sent: Vec<String> = j.sink.sent().into_iter().map(|s| s.0).collect();
    assert_eq!(sent, ["t.e2"]);
    assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
}

/// A send that did not go out gives the claim back with its mark undone,
/// so the next claim sends that message (it never went out).
#[tokio::test]
async fn a_send_that_did_not_go_out_is_sent_by_the_next_claim_even_after_its_mark() {
    let j = joiner(FakeSink::answering(vec![Ok(()), Err(transient())]));
    let parts = group_bodied(&j).await;
    assert_eq!(j.handle_parts(parts.clone()).await.len(), 2);
    let state = phase(&j).await;
    assert_eq!((state.body_sent, state.body_sending), (1, 1), "the mark of the failed send is undone");
    j.store.lapse_claims();
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent(), group_sent());
}

#[tokio::test]
async fn a_failed_mark_after_a_send_never_leads_to_a_second_send() {
    let j = joiner(FakeSink::default());
    // Every attempt of the first mark fails, as if DynamoDB were down.
    j.store.ext.fail_finishes.store(PERSIST_ATTEMPTS, Ordering::SeqCst);
    let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
    let retry = j.handle_parts(parts.clone()).await;
    assert_eq!(retry.len(), 2, "the records come again to finish the mark");
    assert_eq!(j.sink.sent().len(), 1);
    let state = phase(&j).await;
    assert_eq!(state.phase, ChordPhase::Joining, "the claim is kept, never given back after a send");
    assert_eq!(state.attempts, 0);
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched, "finished from the chord's state");
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent().len(), 1, "never a second send");
}

#[tokio::test]
async fn a_mark_that_fails_a_few_times_is_retried_on_its_own() {
    let j = joiner(FakeSink::default());
    j.store.ext.fail_finishes.store(2, Ordering::SeqCst);
    let parts = chord_of(&j, &["SUCCESS"]).await;
    assert!(j.handle_parts(parts).await.is_empty(), "no record retried");
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    assert_eq!(j.sink.sent().len(), 1);
}

#[tokio::test]
async fn a_permanent_error_fails_the_chord_once_and_sends_its_errbacks() {
    let refused = DispatchError::Refused { target: "SQS", code: "AccessDenied".into() };
    let j = joiner(FakeSink::answering(vec![Err(refused)]));
    let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    let state = phase(&j).await;
    assert_eq!(state.phase, ChordPhase::Failed);
    assert!(state.error.as_deref().unwrap().contains("AccessDenied"), "{state:?}");
    let sent: Vec<String> = j.sink.sent().into_iter().map(|(task, _, _)| task).collect();
    assert_eq!(sent, ["t.e1", "t.e2"], "errbacks only, once each");
    let cb = j.store.get_task(&Namespace::default(), &TaskId::parse("cb").unwrap()).await.unwrap().unwrap();
    assert!(cb.json.contains("ChordError") && cb.json.contains("AccessDenied"), "{}", cb.json);
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent().len(), 2, "a replay sends nothing more");
}

#[tokio::test]
async fn a_failed_part_fails_the_chord_with_celerys_chord_error() {
    let j = joiner(FakeSink::default());
    let parts = chord_of(&j, &["SUCCESS", "FAILURE", "SUCCESS"]).await;
    assert!(j.handle_parts(parts).await.is_empty());
    let state = phase(&j).await;
    assert_eq!(state.phase, ChordPhase::Failed);
    assert!(state.error.as_deref().unwrap().starts_with("Dependency p1 raised"), "{state:?}");
    assert!(j.sink.sent().iter().all(|(task, _, _)| task != "t.sum"), "the callback is never sent");
}

#[tokio::test]
async fn errbacks_go_out_as_celery_sends_them_with_the_failed_callback_in_a_header() {
    let callback = r#"{"task":"t.sum","args":[7],"kwargs":{"k":1},"options":{"task_id":"cb","link_error":[
        {"task":"t.old","args":["note"],"options":{"task_id":"e1"}},
        {"task":"t.fixed","args":["a","b"],"immutable":true,"options":{"task_id":"e2"}}]}}"#;
    let j = joiner(FakeSink::default());
    let parts = vec![part_with(&j, 0, 2, "SUCCESS", callback).await, part_with(&j, 1, 2, "FAILURE", callback).await];
    assert!(j.handle_parts(parts).await.is_empty());
    let sent: Vec<(String, String)> = j.sink.sent().into_iter().map(|(task, _, args)| (task, args)).collect();
    let expected = [("t.old", r#"["cb","note"]"#), ("t.fixed", r#"["a","b"]"#)];
    assert_eq!(
        sent,
        expected.map(|(t, a)| (t.to_owned(), a.to_owned())),
        "the failed task's id first, unless immutable"
    );
    let headers = j.sink.chord_errors.lock().unwrap().clone();
    assert_eq!(headers.len(), 2, "one header a message");
    for (header, immutable) in headers.iter().zip([false, true]) {
        assert_eq!(header["immutable"], immutable);
        assert_eq!((&header["id"], &header["task"], &header["args"]), (&json!("cb"), &json!("t.sum"), &json!([7])));
        assert_eq!(header["kwargs"], json!({"k": 1}));
        assert_eq!(header["errbacks"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            (&header["exc"]["exc_type"], &header["exc"]["exc_module"]),
            (&json!("ChordError"), &json!("celery.exceptions"))
        );
        assert!(header["exc"]["exc_message"][0].as_str().unwrap().starts_with("Dependency p1 raised"), "{header}");
    }
}

#[tokio::test]
async fn a_failed_group_body_gives_each_member_the_parts_exception_and_calls_its_errbacks_as_celery() {
    let j = joiner(FakeSink::default());
    let parts = vec![
        part_with(&j, 0, 2, "FAILURE", GROUP_WITH_ERRBACKS).await,
        part_with(&j, 1, 2, "SUCCESS", GROUP_WITH_ERRBACKS).await,
    ];
    assert!(j.handle_parts(parts).await.is_empty());
    let ns = Namespace::default();
    for id in ["grp", "ga", "gb", "gc"] {
        let stored = j.store.get_task(&ns, &TaskId::parse(id).unwrap()).await.unwrap().unwrap();
        let meta: Value = serde_json::from_str(&stored.json).unwrap();
        assert_eq!(meta["result"]["exc_type"], "ValueError", "{id}: the failed part's own exception");
        assert_eq!(meta["result"]["exc_message"], json!(["part 0"]), "{id}");
    }
    let sent: Vec<(String, String)> = j.sink.sent().into_iter().map(|(task, _, args)| (task, args)).collect();
    let expected = [("e.own", r#"["ga"]"#), ("e.all", r#"["ga"]"#), ("e.all", r#"["gc"]"#)];
    assert_eq!(
        sent,
        expected.map(|(t, a)| (t.to_owned(), a.to_owned())),
        "each member's own, then the group's, once each"
    );
    let headers = j.sink.chord_errors.lock().unwrap().clone();
    assert_eq!(headers.iter().map(|h| h["id"].as_str().unwrap()).collect::<Vec<_>>(), ["ga", "ga", "gc"]);
    assert!(headers.iter().all(|h| h["exc"]["exc_type"] == "ValueError"), "{headers:?}");
}

/// An errback refused for good does not keep the next from going out.
#[tokio::test]
async fn an_errback_refused_for_good_is_passed_over_and_the_next_goes_out() {
    let refused = DispatchError::Refused { target: "SQS", code: "AccessDenied".into() };
    let j = joiner(FakeSink::answering(vec![Err(refused)]));
    let parts = chord_of(&j, &["SUCCESS", "FAILURE"]).await;
    assert!(j.handle_parts(parts).await.is_empty());
    let sent: Vec<String> = j.sink.sent().into_iter().map(|s| s.0).collect();
    assert_eq!(sent, ["t.e2"]);
    assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
}

#[tokio::test]
async fn a_group_body_refused_midway_calls_errbacks_only_for_the_members_not_sent() {
    let refused = DispatchError::Refused { target: "SQS", code: "AccessDenied".into() };
    let j = joiner(FakeSink::answering(vec![Ok(()), Err(refused)]));
    let parts = vec![
        part_with(&j, 0, 2, "SUCCESS", GROUP_WITH_ERRBACKS).await,
        part_with(&j, 1, 2, "SUCCESS", GROUP_WITH_ERRBACKS).await,
    ];
    assert!(j.handle_parts(parts).await.is_empty());
    let sent: Vec<(String, String)> = j.sink.sent().into_iter().map(|(task, _, args)| (task, args)).collect();
    let expected = [("t.a", "[[0,1]]"), ("e.all", r#"["gc"]"#)];
    assert_eq!(sent, expected.map(|(t, a)| (t.to_owned(), a.to_owned())), "t.a was sent and runs: no errback for it");
    let headers = j.sink.chord_errors.lock().unwrap().clone();
    assert_eq!(headers[0]["exc"]["exc_type"], "ChordError", "no part failed: the ChordError itself");
}

#[tokio::test]
async fn errbacks_are_sent_at_most_once_across_retries() {
    // The callback is refused for good; the second errback fails once
    // with an error a retry may fix.
    let refused = DispatchError::Refused { target: "SQS", code: "AccessDenied".into() };
    let j = joiner(FakeSink::answering(vec![Err(refused), Ok(()), Err(transient())]));
    let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
    assert_eq!(j.handle_parts(parts.clone()).await.len(), 2, "retried after the errback's failure");
    assert_eq!(phase(&j).await.errbacks_sent, 1, "progress is on the chord's item");
    assert!(j.handle_parts(parts).await.is_empty());
    let sent: Vec<String> = j.sink.sent().into_iter().map(|(task, _, _)| task).collect();
    assert_eq!(sent, ["t.e1", "t.e2"], "each errback once");
    assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
}

#[tokio::test]
async fn a_chord_that_keeps_failing_is_failed_after_its_attempts_and_stops_coming_back() {
    let attempts = Config::for_table("t").chord.max_attempts as usize;
    let j = joiner(FakeSink::answering((0..100).map(|_| Err(transient())).collect()));
    let parts = chord_of(&j, &["SUCCESS"]).await;
    let mut retried = 0;
    while !j.handle_parts(parts.clone()).await.is_empty() {
        retried += 1;
        assert!(retried < 100, "a poison chord must not be retried for ever");
    }
    assert_eq!(retried, attempts - 1);
    let state = phase(&j).await;
    assert_eq!(state.phase, ChordPhase::Failed);
    assert!(state.error.as_deref().unwrap().contains(&format!("after {attempts} attempts")), "{state:?}");
}

#[tokio::test]
async fn a_chord_whose_part_records_expired_fails_instead_of_calling_back_short() {
    let j = joiner(FakeSink::default());
    let parts = chord_of(&j, &["SUCCESS", "SUCCESS", "SUCCESS"]).await;
    assert!(j.handle_parts(parts[..2].to_vec()).await.is_empty());
    j.store.drop_parts(&Namespace::default(), &gid());
    assert!(j.handle_parts(parts[2..].to_vec()).await.is_empty());
    let state = phase(&j).await;
    assert_eq!(state.phase, ChordPhase::Failed);
    assert!(state.error.as_deref().unwrap().contains("1 of the chord's 3 parts"), "{state:?}");
    assert!(j.sink.sent().iter().all(|(task, _, _)| task != "t.sum"));
}

#[tokio::test]
async fn results_past_the_targets_limit_go_by_reference_and_past_the_joins_limit_fail_the_chord() {
    let (mut by_reference, mut too_many) = (joiner(FakeSink::default()), joiner(FakeSink::default()));
    by_reference.max_message_bytes = 1024;
    too_many.config.max_results_bytes = 1024;
    let ns = Namespace::default();
    for j in [&by_reference, &too_many] {
        let mut parts = Vec::new();
        for i in 0..50u32 {
            let mut p = part(j, i, 50, "SUCCESS").await;
            let big = format!(r#"{{"status":"SUCCESS","result":"{i}{}","task_id":"p{i}"}}"#, "x".repeat(100));
            let record = TaskRecord {
                task_id: p.part.task_id.clone(),
                status: State::Success,
                json: big,
                expires_at: now_epoch() + 3600,
                group_id: None,
                group_index: None,
                chord: None,
                upload: None,
                claim: None,
            };
            j.store.delete_task(&ns, &p.part.task_id).await.unwrap();
            j.store.put_task(&ns, &record).await.unwrap();
            p.sequence = format!("s{i}");
            parts.push(p);
        }
        assert!(j.handle_parts(parts.clone()).await.is_empty());
        // A second delivery changes nothing.
        assert!(j.handle_parts(parts).await.is_empty());
    }
    assert_eq!(phase(&by_reference).await.phase, ChordPhase::Dispatched);
    let sent = by_reference.sink.sent();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let args: Value = serde_json::from_str(&sent[0].2).unwrap();
    let id = results_id(&gid());
    assert_eq!(args[0], json!({"dynachord_ref": {"task_id": id.as_str(), "bytes": args[0]["dynachord_ref"]["bytes"]}}));
    let stored = by_reference.store.get_task(&ns, &id).await.unwrap().unwrap();
    let results: Value = serde_json::from_str(&stored.json).unwrap();
    let results = results["result"].as_array().unwrap().clone();
    assert_eq!(results.len(), 50);
    assert_eq!(results[7], json!(format!("7{}", "x".repeat(100))), "in order");
    assert_eq!(args[0]["dynachord_ref"]["bytes"], Value::Array(results).to_string().len());

    let state = phase(&too_many).await;
    assert_eq!(state.phase, ChordPhase::Failed);
    assert!(state.error.as_deref().unwrap().contains("more than 1024 bytes"), "{state:?}");
    assert!(too_many.sink.sent().iter().all(|(task, _, _)| task != "t.sum"));
}

#[tokio::test]
async fn the_results_and_message_limits_hold_at_the_limit_and_not_one_past_it() {
    // Two parts whose results are their index: `[0,1]` (5 bytes), and the
    // fake sink counts a message by its args, `[[0,1]]` (7 bytes).
    let outcome = |results_limit: usize, message_limit: usize| async move {
        let mut j = joiner(FakeSink::default());
        j.config.max_results_bytes = results_limit;
        j.max_message_bytes = message_limit;
        let parts = chord_of(&j, &["SUCCESS", "SUCCESS"]).await;
        assert!(j.handle_parts(parts).await.is_empty());
        (phase(&j).await.phase, j.sink.sent().first().map(|(_, _, args)| args.clone()))
    };
    let (results, message) = ("[0,1]".len(), "[[0,1]]".len());
    assert_eq!(outcome(results, message).await, (ChordPhase::Dispatched, Some("[[0,1]]".into())));
    assert_eq!(outcome(results - 1, message).await.0, ChordPhase::Failed, "one byte past CHORD_MAX_RESULTS_BYTES");
    let (phase, args) = outcome(results, message - 1).await;
    assert_eq!(phase, ChordPhase::Dispatched);
    assert!(args.unwrap().contains("dynachord_ref"), "one byte past CALLBACK_MAX_BYTES: by reference");
}

#[tokio::test]
async fn each_counted_part_extends_the_chords_life() {
    let j = joiner(FakeSink::default());
    let mut parts = chord_of(&j, &["SUCCESS", "SUCCESS", "SUCCESS"]).await;
    parts[1].part.expires_at += 1000;
    assert!(j.handle_parts(parts[..1].to_vec()).await.is_empty());
    let first = phase(&j).await.expires_at;
    assert!(j.handle_parts(parts[1..2].to_vec()).await.is_empty());
    let extended = phase(&j).await.expires_at;
    assert!(extended >= parts[1].part.expires_at && extended > first, "{first} → {extended}");
}

/// Replaces part `p`'s stored result with `result` (JSON text).
async fn restore(j: &Joiner<MemoryStore, FakeSink>, p: &Part, result: &str) {
    let ns = Namespace::default();
    let json = format!(r#"{{"status":"SUCCESS","result":{result},"task_id":"{}"}}"#, p.part.task_id);
    let record = TaskRecord {
        task_id: p.part.task_id.clone(),
        status: State::Success,
        json,
        expires_at: now_epoch() + 3600,
        group_id: None,
        group_index: None,
        chord: None,
        upload: None,
        claim: None,
    };
    j.store.delete_task(&ns, &p.part.task_id).await.unwrap();
    j.store.put_task(&ns, &record).await.unwrap();
}

#[tokio::test]
async fn a_chord_of_tiny_then_huge_results_fails_cleanly_without_reading_more_than_a_window() {
    // 25 tiny parts, then 40 parts of a 1 MB string each (which DynamoDB
    // would store compressed to almost nothing): 40 MB of results, past a
    // CHORD_MAX_RESULTS_BYTES of 20 MB.
    let mut j = joiner(FakeSink::default());
    j.config.max_results_bytes = 20 << 20;
    let mut parts = Vec::new();
    for i in 0..65u32 {
        let p = part(&j, i, 65, "SUCCESS").await;
        if i >= 25 {
            restore(&j, &p, &format!("\"{}\"", "x".repeat(1 << 20))).await;
        }
        parts.push(p);
    }
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    let state = phase(&j).await;
    assert_eq!(state.phase, ChordPhase::Failed);
    assert!(state.error.as_deref().unwrap().contains("(CHORD_MAX_RESULTS_BYTES)"), "{state:?}");
    assert!(j.sink.sent().iter().all(|(task, ..)| task != "t.sum"), "the callback never went out");
    let largest = j.store.largest_read.load(Ordering::SeqCst);
    assert!(largest <= 8 << 20, "one read inflated {largest} bytes, more than a window's budget");
    // A window of 1 MB parts holds what its budget allows, not 80 of them.
    assert!(largest >= 7 << 20, "{largest}");
}

#[tokio::test]
async fn a_chord_of_many_parts_reads_them_all_across_windows_in_order() {
    let mut j = joiner(FakeSink::default());
    j.max_message_bytes = usize::MAX; // the list itself, not a reference to it
    let mut parts = Vec::new();
    for i in 0..250u32 {
        let p = part(&j, i, 250, "SUCCESS").await;
        if i % 50 == 7 {
            restore(&j, &p, &format!("\"{}\"", "y".repeat(3 << 20))).await;
        }
        parts.push(p);
    }
    assert!(j.handle_parts(parts).await.is_empty());
    let sent = j.sink.sent();
    let args: Value = serde_json::from_str(&sent[0].2).unwrap();
    let results = args[0].as_array().unwrap();
    assert_eq!(results.len(), 250);
    assert_eq!((results[6].clone(), results[8].clone(), results[249].clone()), (json!(6), json!(8), json!(249)));
    assert_eq!(results[57].as_str().unwrap().len(), 3 << 20);
    assert!(j.store.largest_read.load(Ordering::SeqCst) <= 8 << 20);
}

#[tokio::test]
async fn a_chords_status_counts_its_parts_by_state_and_lists_the_failed_ones_on_request() {
    let j = joiner(FakeSink::default());
    let statuses = ["SUCCESS", "FAILURE", "SUCCESS", "REVOKED", "SUCCESS", "SUCCESS"];
    let mut parts = Vec::new();
    for (i, status) in statuses.iter().enumerate().take(5) {
        parts.push(part(&j, i as u32, 6, status).await);
    }
    // Counted twice, as a redelivered batch would be: each part once.
    j.store
        .count_parts(
            &Namespace::default(),
            &gid(),
            &parts[0].chord,
            &parts.iter().map(|p| p.part.clone()).collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    assert!(j.handle_parts(parts).await.is_empty());
    let app = crate::service::App { config: Config::for_table("t"), store: j.store };
    let (ns, g) = (Namespace::default(), gid());
    let status = |failed_ids| crate::service::chord_status(&app, &ns, &g, failed_ids);
    let plain: Value = serde_json::from_str(&status(false).await.unwrap().body).unwrap();
    assert_eq!(
        (&plain["done"], &plain["succeeded"], &plain["failed"], &plain["pending"]),
        (&json!(5), &json!(3), &json!(2), &json!(1))
    );
    assert!(plain.get("failed_ids").is_none());
    let listed: Value = serde_json::from_str(&status(true).await.unwrap().body).unwrap();
    assert_eq!((&listed["failed_ids"], &listed["failed_ids_truncated"]), (&json!(["p1", "p3"]), &json!(false)));
}

/// A chord of `statuses` whose body tolerates failures as `options` say:
/// the joiner, after the join.
async fn tolerating(statuses: &[&str], options: &str) -> Joiner<MemoryStore, FakeSink> {
    let j = joiner(FakeSink::default());
    let callback = format!(r#"{{"task":"t.sum","options":{{"task_id":"cb",{options}}}}}"#);
    let mut parts = Vec::new();
    for (i, status) in statuses.iter().enumerate() {
        parts.push(part_with(&j, i as u32, statuses.len() as u32, status, &callback).await);
    }
    assert!(j.handle_parts(parts).await.is_empty());
    j
}

#[tokio::test]
async fn a_body_that_tolerates_failures_gets_their_exceptions_in_their_slots_up_to_its_limit() {
    let four = ["SUCCESS", "FAILURE", "SUCCESS", "FAILURE"];
    for options in [r#""tolerated_failures":2"#, r#""tolerated_failure_percentage":50"#, r#""tolerated_failures":2.0"#]
    {
        let j = tolerating(&four, options).await;
        assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched, "{options}");
        let sent = j.sink.sent();
        assert_eq!(sent.len(), 1, "{options}: {sent:?}");
        let args: Value = serde_json::from_str(&sent[0].2).unwrap();
        let exception =
            |i: u32| json!({"exc_type": "ValueError", "exc_message": [format!("part {i}")], "exc_module": "builtins"});
        assert_eq!(args[0], json!([0, exception(1), 2, exception(3)]), "{options}");
    }
    // One past the limit, by count or by share: the chord fails as Celery's do.
    let five = ["SUCCESS", "FAILURE", "FAILURE", "FAILURE", "SUCCESS"];
    for options in [
        r#""tolerated_failures":2"#,
        r#""tolerated_failure_percentage":40"#,
        r#""tolerated_failures":5,"tolerated_failure_percentage":40"#,
    ] {
        let j = tolerating(&five, options).await;
        let state = phase(&j).await;
        assert_eq!(state.phase, ChordPhase::Failed, "{options}");
        assert!(state.error.unwrap().contains("Dependency p3 raised ValueError"), "{options}");
        assert!(j.sink.sent().iter().all(|(task, ..)| task != "t.sum"));
    }
}

#[test]
fn a_tolerance_must_be_a_count_or_a_share() {
    let sig =
        |options: &str| Signature::parse(&format!(r#"{{"task":"t","options":{{"task_id":"cb",{options}}}}}"#)).unwrap();
    assert_eq!(sig(r#""tolerated_failures":3"#).tolerated_failures(10), Ok(3));
    assert_eq!(sig(r#""tolerated_failure_percentage":25"#).tolerated_failures(10), Ok(2));
    assert_eq!(sig(r#""x":1"#).tolerated_failures(10), Ok(0));
    for bad in [
        r#""tolerated_failures":-1"#,
        r#""tolerated_failures":1.5"#,
        r#""tolerated_failures":"3""#,
        r#""tolerated_failure_percentage":101"#,
    ] {
        assert!(sig(bad).tolerated_failures(10).is_err(), "{bad}");
    }
}

/// The parts' results still stored, by part index.
async fn parts_stored(j: &Joiner<MemoryStore, FakeSink>, n: u32) -> Vec<bool> {
    let mut stored = Vec::new();
    for i in 0..n {
        let id = TaskId::parse(&format!("p{i}")).unwrap();
        stored.push(j.store.get_task(&Namespace::default(), &id).await.unwrap().is_some());
    }
    stored
}

#[tokio::test]
async fn a_body_that_asks_forgets_its_parts_results_once_sent_unless_a_part_failed() {
    let before = metrics::total(metrics::CHORD_PARTS_FORGOTTEN);
    let j = tolerating(&["SUCCESS", "SUCCESS", "SUCCESS"], r#""forget_parts":true"#).await;
    assert_eq!(j.sink.sent().len(), 1, "the callback went out first");
    assert_eq!(parts_stored(&j, 3).await, [false, false, false]);
    assert!(metrics::total(metrics::CHORD_PARTS_FORGOTTEN) >= before + 3);
    // Not asked: kept.
    let j = tolerating(&["SUCCESS", "SUCCESS"], r#""forget_parts":false"#).await;
    assert_eq!(parts_stored(&j, 2).await, [true, true]);
    // A tolerated failure: kept, for a redrive.
    let j = tolerating(&["SUCCESS", "FAILURE"], r#""forget_parts":true,"tolerated_failures":1"#).await;
    assert_eq!(j.sink.sent().len(), 1);
    assert_eq!(parts_stored(&j, 2).await, [true, true]);
    // A failed chord: kept.
    let j = tolerating(&["SUCCESS", "FAILURE"], r#""forget_parts":true"#).await;
    assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
    assert_eq!(parts_stored(&j, 2).await, [true, true]);
}

// Redrive (invariant C11).

/// Stores part `i` again, as a worker does, with `result_extended`'s
/// task name and arguments, and returns the stream's view of it.
async fn extended_part(j: &Joiner<MemoryStore, FakeSink>, i: u32, size: u32, status: &str, callback: &str) -> Part {
    let mut part = part_with(j, i, size, status, callback).await;
    let ns = Namespace::default();
    let stored = j.store.get_task(&ns, &part.part.task_id).await.unwrap().unwrap();
    let mut meta: Value = serde_json::from_str(&stored.json).unwrap();
    meta["name"] = json!("t.part");
    meta["args"] = json!([i, "x"]);
    meta["kwargs"] = json!({"k": i});
    meta["queue"] = json!("work");
    j.store.delete_task(&ns, &part.part.task_id).await.unwrap();
    let record = TaskRecord {
        task_id: part.part.task_id.clone(),
        status: State::parse(status).unwrap(),
        json: meta.to_string(),
        expires_at: now_epoch() + 3600,
        group_id: Some(gid()),
        group_index: Some(i),
        chord: None,
        upload: None,
        claim: None,
    };
    j.store.put_task(&ns, &record).await.unwrap();
    part.part.stored_at = Some(crate::time::now_millis());
    part
}

/// A chord of `statuses`, with its parts' arguments stored, joined.
async fn extended_chord(j: &Joiner<MemoryStore, FakeSink>, statuses: &[&str], callback: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    for (i, status) in statuses.iter().enumerate() {
        parts.push(extended_part(j, i as u32, statuses.len() as u32, status, callback).await);
    }
    assert!(j.handle_parts(parts.clone()).await.is_empty());
    parts
}

/// Asks a redrive as the route does, and delivers its stream record.
async fn redrive(j: &Joiner<MemoryStore, FakeSink>) -> Vec<String> {
    let ns = Namespace::default();
    let state = phase(j).await;
    assert!(j.store.start_redrive(&ns, &gid(), &state, &RedriveTo::default()).await.unwrap());
    deliver_redrive(j).await
}

async fn deliver_redrive(j: &Joiner<MemoryStore, FakeSink>) -> Vec<String> {
    let record = Redrive { sequence: "seq-redrive".into(), ns: Namespace::default(), group_id: gid() };
    j.handle_redrives(vec![record]).await
}

/// The worker runs a redriven part again: `status` stored over its failure.
async fn rerun(j: &Joiner<MemoryStore, FakeSink>, i: u32, size: u32, status: &str, callback: &str) -> Part {
    // A result stored after the redrive, a millisecond at least.
    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    extended_part(j, i, size, status, callback).await
}

#[tokio::test]
async fn a_redrive_sends_only_the_failed_parts_again_and_the_chord_joins_once_with_every_result() {
    let j = joiner(FakeSink::default());
    let old = extended_chord(&j, &["SUCCESS", "FAILURE", "SUCCESS", "FAILURE"], CALLBACK).await;
    assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
    let before = j.sink.sent().len();
    assert!(redrive(&j).await.is_empty());
    let sent: Vec<_> = j.sink.sent()[before..].to_vec();
    assert_eq!(
        sent,
        [("t.part".into(), "p1".into(), r#"[1,"x"]"#.into()), ("t.part".into(), "p3".into(), r#"[3,"x"]"#.into())]
    );
    let state = phase(&j).await;
    assert_eq!((state.phase, state.done, state.failed, state.redrives), (ChordPhase::Open, 2, 0, 1));
    // The stream replays the old batch, failures and all, during the
    // redrive: nothing is counted again.
    assert!(j.handle_parts(old.clone()).await.is_empty());
    assert_eq!((phase(&j).await.done, phase(&j).await.phase), (2, ChordPhase::Open));
    // The failed parts run again and succeed: the chord joins, once.
    let new = vec![rerun(&j, 1, 4, "SUCCESS", CALLBACK).await, rerun(&j, 3, 4, "SUCCESS", CALLBACK).await];
    assert!(j.handle_parts(new.clone()).await.is_empty());
    assert!(j.handle_parts(new).await.is_empty());
    assert!(j.handle_parts(old).await.is_empty());
    let callbacks: Vec<_> = j.sink.sent().into_iter().filter(|(task, ..)| task == "t.sum").collect();
    assert_eq!(callbacks, [("t.sum".into(), "cb".into(), "[[0,1,2,3]]".into())]);
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    // A redrive record delivered again changes nothing.
    assert!(deliver_redrive(&j).await.is_empty());
    assert_eq!(j.sink.sent().iter().filter(|(task, ..)| task != "t.e1" && task != "t.e2").count(), 3);
}

#[tokio::test]
async fn a_chord_that_tolerated_failures_is_redriven_and_calls_back_again_with_every_result() {
    let j = joiner(FakeSink::default());
    let callback = r#"{"task":"t.sum","options":{"task_id":"cb","tolerated_failures":1}}"#;
    extended_chord(&j, &["SUCCESS", "FAILURE", "SUCCESS"], callback).await;
    assert_eq!(phase(&j).await.phase, ChordPhase::Dispatched);
    assert!(redrive(&j).await.is_empty());
    let part = rerun(&j, 1, 3, "SUCCESS", callback).await;
    assert!(j.handle_parts(vec![part]).await.is_empty());
    let callbacks: Vec<String> =
        j.sink.sent().into_iter().filter(|(task, ..)| task == "t.sum").map(|(.., args)| args).collect();
    assert_eq!(callbacks.len(), 2, "{callbacks:?}");
    assert_eq!(callbacks[1], "[[0,1,2]]");
}

#[tokio::test]
async fn a_part_that_fails_again_fails_the_chord_again_and_it_can_be_redriven_again() {
    let j = joiner(FakeSink::default());
    extended_chord(&j, &["FAILURE", "SUCCESS"], CALLBACK).await;
    assert!(redrive(&j).await.is_empty());
    let part = rerun(&j, 0, 2, "FAILURE", CALLBACK).await;
    assert!(j.handle_parts(vec![part]).await.is_empty());
    let state = phase(&j).await;
    assert_eq!((state.phase, state.failed), (ChordPhase::Failed, 1));
    assert!(redrive(&j).await.is_empty());
    let part = rerun(&j, 0, 2, "SUCCESS", CALLBACK).await;
    assert!(j.handle_parts(vec![part]).await.is_empty());
    let state = phase(&j).await;
    assert_eq!((state.phase, state.redrives), (ChordPhase::Dispatched, 2));
}

#[tokio::test]
async fn a_redriven_part_whose_send_did_not_go_out_is_counted_failed_again_and_sent_by_the_retry() {
    let j = joiner(FakeSink::default());
    extended_chord(&j, &["FAILURE", "FAILURE"], r#"{"task":"t.sum","options":{"task_id":"cb"}}"#).await;
    assert!(j.sink.sent().is_empty(), "a failed chord without errbacks sends nothing");
    *j.sink.script_mut() = vec![Err(transient())].into();
    assert_eq!(redrive(&j).await, ["seq-redrive"], "retried");
    let state = phase(&j).await;
    assert_eq!((state.phase, state.done, state.failed, state.attempts), (ChordPhase::Redriving, 2, 2, 1));
    assert!(j.sink.sent().is_empty(), "in turn, the first did not go out and stopped the window");
    assert!(deliver_redrive(&j).await.is_empty());
    let ids: Vec<String> = j.sink.sent().into_iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids, ["p0", "p1"]);
    assert_eq!(phase(&j).await.phase, ChordPhase::Open);
}

#[tokio::test]
async fn a_redriven_part_whose_outcome_is_unknown_counts_as_sent() {
    let j = joiner(FakeSink::default());
    extended_chord(&j, &["FAILURE", "SUCCESS"], r#"{"task":"t.sum","options":{"task_id":"cb"}}"#).await;
    *j.sink.script_mut() = vec![Err(unknown())].into();
    assert!(redrive(&j).await.is_empty());
    assert_eq!(j.sink.sent().len(), 1);
    let state = phase(&j).await;
    assert_eq!((state.phase, state.done, state.failed), (ChordPhase::Open, 1, 0));
}

#[tokio::test]
async fn a_redrive_taken_over_from_a_claimer_that_died_mid_send_never_sends_its_window_again() {
    let j = joiner(FakeSink::default());
    extended_chord(&j, &["FAILURE", "SUCCESS", "FAILURE"], r#"{"task":"t.sum","options":{"task_id":"cb"}}"#).await;
    let (ns, state) = (Namespace::default(), phase(&j).await);
    assert!(j.store.start_redrive(&ns, &gid(), &state, &RedriveTo::default()).await.unwrap());
    // A claimer removes the first failed part from the count, as just
    // before its send, and dies there.
    assert!(j.store.claim_redrive(&ns, &gid(), "dead", std::time::Duration::from_secs(60)).await.unwrap().is_some());
    let first = j.store.failed_parts(&ns, &gid(), 1).await.unwrap();
    assert!(j.store.uncount_parts(&ns, &gid(), "dead", std::time::Duration::from_secs(60), &first).await.unwrap());
    // While its lease holds, nobody else sends.
    assert_eq!(deliver_redrive(&j).await, ["seq-redrive"]);
    assert!(j.sink.sent().is_empty());
    j.store.lapse_claims();
    assert!(deliver_redrive(&j).await.is_empty());
    let ids: Vec<String> = j.sink.sent().into_iter().map(|(_, id, _)| id).collect();
    assert_eq!(ids, ["p2"], "p0 may have gone out: it is not sent again");
    assert_eq!(phase(&j).await.phase, ChordPhase::Open);
}

#[tokio::test]
async fn a_redrive_of_parts_whose_arguments_were_not_stored_fails_the_chord_again_with_why() {
    let j = joiner(FakeSink::default());
    // `part` stores no task name nor arguments (no result_extended).
    let parts = chord_of(&j, &["FAILURE", "SUCCESS"]).await;
    assert!(j.handle_parts(parts).await.is_empty());
    let sent = j.sink.sent().len();
    // The route forgets the callback's ChordError when it starts a redrive.
    let (ns, cb) = (Namespace::default(), TaskId::parse("cb").unwrap());
    j.store.delete_task(&ns, &cb).await.unwrap();
    assert!(redrive(&j).await.is_empty());
    let state = phase(&j).await;
    assert_eq!((state.phase, state.failed), (ChordPhase::Failed, 1));
    assert!(state.error.unwrap().contains("result_extended=True"));
    // Failed again as a join fails a chord: the callback has the ChordError
    // (nobody waits on it for ever), and its errbacks go once more.
    let callback = j.store.get_task(&ns, &cb).await.unwrap().expect("the callback's ChordError");
    assert!(callback.json.contains("redrive stopped"), "{}", callback.json);
    let errbacks: Vec<String> = j.sink.sent()[sent..].iter().map(|(task, ..)| task.clone()).collect();
    assert_eq!(errbacks, ["t.e1", "t.e2"]);
}

#[test]
fn a_redriven_parts_message_carries_its_chord_and_goes_to_its_own_queue() {
    let stored = r#"{"status":"FAILURE","name":"t.part","args":[1],"kwargs":{"k":2},"queue":"work","root_id":"r"}"#;
    let part =
        ChordPart { index: 4, task_id: TaskId::parse("p4").unwrap(), expires_at: 0, failed: true, stored_at: None };
    let to = RedriveTo { queue: None, prefix: Some("test-".into()) };
    let (sig, args) = part_message(stored, &part, &gid(), CALLBACK, &to, 2).unwrap();
    assert_eq!((sig.task.as_str(), sig.task_id.as_str(), args.as_str()), ("t.part", "p4", "[1]"));
    assert_eq!(sig.options["group_id"], "g1");
    assert_eq!(sig.options["group_index"], 4);
    assert_eq!(sig.options["chord"]["task"], "t.sum");
    assert_eq!(sig.options["root_id"], "r");
    assert_eq!(sig.options[crate::celery::REDRIVE_HEADER], 2, "the worker's guard claims it over its FAILURE");
    assert_eq!(sig.queue(), Some("test-work"));
    let to = RedriveTo { queue: Some("fix".into()), prefix: None };
    assert_eq!(part_message(stored, &part, &gid(), CALLBACK, &to, 1).unwrap().0.queue(), Some("fix"));
    let bare = r#"{"status":"FAILURE","result":null}"#;
    assert!(part_message(bare, &part, &gid(), CALLBACK, &RedriveTo::default(), 1)
        .unwrap_err()
        .contains("result_extended"));
}

// Deadlines (invariant C12).

fn wake() -> Wake {
    Wake { id: "m1".into(), ns: Namespace::default(), group_id: gid() }
}

#[tokio::test]
async fn a_chord_with_a_deadline_arms_one_wake_up_and_is_reported_once_past_it() {
    let j = joiner(FakeSink::default());
    let callback = r#"{"task":"t.sum","options":{"task_id":"cb","deadline_seconds":600}}"#;
    let first = part_with(&j, 0, 2, "SUCCESS", callback).await;
    assert!(j.handle_parts(vec![first.clone()]).await.is_empty());
    assert!(j.handle_parts(vec![first]).await.is_empty());
    let later = j.sink.later.lock().unwrap().clone();
    assert_eq!(later.len(), 1, "armed once: {later:?}");
    assert!(later[0].1 <= std::time::Duration::from_secs(600) && later[0].1 >= std::time::Duration::from_secs(598));
    let state = phase(&j).await;
    assert!(state.deadline_armed && state.deadline_at.is_some() && state.stalled_at.is_none());
    // Woken before the deadline (SQS delays 15 minutes at most): sent on again, nothing reported.
    assert!(j.handle_wakes(vec![wake()]).await.is_empty());
    assert_eq!(j.sink.later.lock().unwrap().len(), 2);
    assert!(phase(&j).await.stalled_at.is_none());
    // Past it: reported once, the chord still open (the body did not ask to fail).
    j.store.pass_deadlines();
    assert!(j.handle_wakes(vec![wake()]).await.is_empty());
    let stalled = phase(&j).await.stalled_at;
    assert!(stalled.is_some());
    assert!(j.handle_wakes(vec![wake()]).await.is_empty());
    assert_eq!((phase(&j).await.stalled_at, phase(&j).await.phase), (stalled, ChordPhase::Open));
    assert!(j.sink.sent().is_empty());
    // The last part comes late: the chord joins as any chord.
    let last = part_with(&j, 1, 2, "SUCCESS", callback).await;
    assert!(j.handle_parts(vec![last]).await.is_empty());
    assert_eq!(j.sink.sent(), [("t.sum".into(), "cb".into(), "[[0,1]]".into())]);
    assert_eq!(j.sink.later.lock().unwrap().len(), 2, "a final chord arms nothing");
}

#[tokio::test]
async fn a_chord_that_asks_fails_at_its_deadline_naming_its_missing_parts_and_a_late_part_changes_nothing() {
    let j = joiner(FakeSink::default());
    let callback = r#"{"task":"t.sum","options":{"task_id":"cb","deadline_seconds":60,"fail_at_deadline":true,
        "link_error":[{"task":"t.e1","options":{"task_id":"e1"}}]}}"#;
    let parts = vec![part_with(&j, 0, 4, "SUCCESS", callback).await, part_with(&j, 2, 4, "SUCCESS", callback).await];
    assert!(j.handle_parts(parts).await.is_empty());
    j.store.pass_deadlines();
    assert!(j.handle_wakes(vec![wake()]).await.is_empty());
    let state = phase(&j).await;
    assert_eq!(state.phase, ChordPhase::Failed);
    let error = state.error.unwrap();
    assert!(error.contains("deadline passed") && error.contains("2 of 4 (group_index 1, 3)"), "{error}");
    let tasks: Vec<String> = j.sink.sent().into_iter().map(|(task, ..)| task).collect();
    assert_eq!(tasks, ["t.e1"], "the errback, once");
    let cb = j.store.get_task(&Namespace::default(), &TaskId::parse("cb").unwrap()).await.unwrap().unwrap();
    assert!(cb.json.contains("ChordError") && cb.json.contains("group_index 1, 3"), "{}", cb.json);
    // The missing parts come late: nothing more happens; a copy of the wake-up neither.
    let late = vec![part_with(&j, 1, 4, "SUCCESS", callback).await, part_with(&j, 3, 4, "SUCCESS", callback).await];
    assert!(j.handle_parts(late).await.is_empty());
    assert!(j.handle_wakes(vec![wake()]).await.is_empty());
    assert_eq!(j.sink.sent().len(), 1);
    assert_eq!(phase(&j).await.phase, ChordPhase::Failed);
}

#[tokio::test]
async fn a_deadline_that_cannot_be_armed_never_holds_its_chord_back() {
    let j = joiner(FakeSink::without_deadline_queue());
    let callback = r#"{"task":"t.sum","options":{"task_id":"cb","deadline_seconds":60}}"#;
    let parts = vec![part_with(&j, 0, 2, "SUCCESS", callback).await, part_with(&j, 1, 2, "SUCCESS", callback).await];
    assert!(j.handle_parts(parts).await.is_empty());
    assert_eq!(j.sink.sent(), [("t.sum".into(), "cb".into(), "[[0,1]]".into())]);
}

#[test]
fn a_deadline_is_whole_seconds_up_to_a_week_and_failing_at_it_needs_one() {
    let sig =
        |options: &str| Signature::parse(&format!(r#"{{"task":"t","options":{{"task_id":"cb",{options}}}}}"#)).unwrap();
    assert_eq!(sig(r#""x":1"#).deadline(), Ok(None));
    let deadline = sig(r#""deadline_seconds":30,"fail_at_deadline":true"#).deadline().unwrap().unwrap();
    assert_eq!((deadline.seconds, deadline.fail), (30, true));
    for bad in [
        r#""deadline_seconds":0"#,
        r#""deadline_seconds":1.5"#,
        r#""deadline_seconds":"30""#,
        r#""deadline_seconds":604801"#,
        r#""fail_at_deadline":true"#,
        r#""deadline_seconds":30,"fail_at_deadline":"yes""#,
    ] {
        assert!(sig(bad).deadline().is_err(), "{bad}");
    }
}
