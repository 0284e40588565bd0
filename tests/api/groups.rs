//! GroupResult.save / restore / delete.

use crate::helpers::{poll_until, Api};
use serde_json::json;

#[tokio::test]
async fn save_restore_delete_a_group() {
    let api = Api::new();
    let gid = api.id("g");
    let saved = json!({"result": [[gid, null], [[[api.id("t1"), null], null], [[api.id("t2"), null], null]]]});
    api.put_group(&gid, &saved.to_string()).await.expect(200);
    assert_eq!(api.get_group(&gid).await.expect(200).json, saved);
    // A later save replaces the group.
    let resaved = json!({"result": [[gid, null], []]});
    api.put_group(&gid, &resaved.to_string()).await.expect(200);
    assert_eq!(api.get_group(&gid).await.expect(200).json, resaved);
    api.delete_group(&gid).await.expect(204);
    api.get_group(&gid).await.expect_error(404, "group_not_found");
    api.delete_group(&gid).await.expect(204);
}

#[tokio::test]
async fn bad_group_bodies_change_nothing() {
    let api = Api::new();
    let gid = api.id("g");
    let saved = r#"{"result":[["x",null],[]]}"#;
    api.put_group(&gid, saved).await.expect(200);
    for body in
        ["", "{", "[]", r#"{"results": []}"#, r#"{"result": [], "extra": 1}"#, r#"{"result": [], "expires_in": 0}"#]
    {
        api.put_group(&gid, body).await.expect_error(400, "invalid_body");
    }
    assert_eq!(api.get_group(&gid).await.text, saved);
}

#[tokio::test]
async fn an_expired_group_is_gone() {
    let api = Api::new();
    let gid = api.id("g");
    api.put_group(&gid, r#"{"result": [], "expires_in": 1}"#).await.expect(200);
    // Expiry has whole-second resolution: poll until it has passed.
    let gone = || async {
        let resp = api.get_group(&gid).await;
        (resp.status == 404).then_some(resp)
    };
    poll_until("the group to expire", std::time::Duration::from_secs(30), gone)
        .await
        .expect_error(404, "group_not_found");
}
