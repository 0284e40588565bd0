//! Concurrent writers on one id end in the state the invariants demand.

use crate::helpers::Api;
use futures::future::join_all;
use serde_json::json;

const STATES: [&str; 4] = ["STARTED", "RETRY", "SUCCESS", "FAILURE"];

/// 20 writers race on one id, five of each state; returns (status, writer,
/// response) for each write.
async fn race(api: &Api, id: &str, states: &[&str]) -> Vec<(String, usize, u16, String)> {
    let writes = (0..20).map(|writer| {
        let state = states[writer % states.len()];
        async move {
            let resp = api.put_task(id, json!({"status": state, "result": {"writer": writer}})).await;
            (
                state.to_owned(),
                writer,
                resp.status,
                resp.json["error"]["stored_status"].as_str().unwrap_or("").to_owned(),
            )
        }
    });
    join_all(writes).await
}

#[tokio::test]
async fn twenty_writers_racing_end_with_exactly_one_success() {
    let api = Api::new();
    for round in 0..5 {
        let id = api.id(&format!("race{round}"));
        let outcomes = race(&api, &id, &STATES).await;
        assert!(outcomes.iter().all(|(_, _, status, _)| *status == 200 || *status == 409), "{outcomes:?}");
        let won: Vec<usize> =
            outcomes.iter().filter(|(s, _, st, _)| s == "SUCCESS" && *st == 200).map(|o| o.1).collect();
        assert_eq!(won.len(), 1, "exactly one SUCCESS is acknowledged: {outcomes:?}");
        let stored = api.get_task(&id).await.expect(200);
        assert_eq!(stored.json["status"], "SUCCESS");
        assert_eq!(stored.json["result"]["writer"], json!(won[0]), "the acknowledged SUCCESS is the one stored");
        for (state, _, status, stored_status) in &outcomes {
            if *status == 409 {
                let ready = ["SUCCESS", "FAILURE", "REVOKED"].contains(&stored_status.as_str());
                assert!(ready, "a {state} is only refused by a ready state, not {stored_status}");
            }
        }
    }
}

#[tokio::test]
async fn racing_without_success_ends_failed_never_started() {
    let api = Api::new();
    for round in 0..3 {
        let id = api.id(&format!("nosuccess{round}"));
        let outcomes = race(&api, &id, &["STARTED", "RETRY", "FAILURE"]).await;
        let failures: Vec<usize> =
            outcomes.iter().filter(|(s, _, st, _)| s == "FAILURE" && *st == 200).map(|o| o.1).collect();
        assert!(!failures.is_empty(), "{outcomes:?}");
        let stored = api.get_task(&id).await.expect(200);
        assert_eq!(stored.json["status"], "FAILURE", "a late STARTED/RETRY never replaces FAILURE");
        let writer = stored.json["result"]["writer"].as_u64().unwrap() as usize;
        assert!(failures.contains(&writer), "the stored FAILURE was acknowledged");
    }
}
