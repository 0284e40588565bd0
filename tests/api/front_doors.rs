//! The function-URL front door (FrontDoor FunctionUrls): each HTTP function
//! answers at its own URL, as `cargo lambda watch` serves it on the local
//! stack (`/lambda-url/<function>`), with no router in front. The functions
//! route and check every request themselves, as API Gateway's routes did,
//! and the caller's IAM identity from a function URL's event lands in its
//! tenant as it does behind the HTTP API.

use crate::helpers::{api_gateway_event, success, Api};
use reqwest::Method;
use serde_json::json;

/// The same client at each HTTP function's own URL: store, fetch, batch-fetch.
fn doors(api: &Api) -> (Api, Api, Api) {
    (api.under("/lambda-url/store"), api.under("/lambda-url/fetch"), api.under("/lambda-url/batch-fetch"))
}

#[tokio::test]
async fn each_function_serves_its_routes_at_its_own_url() {
    let api = Api::new();
    let (store, fetch, batch) = doors(&api);
    let id = api.id("furl");
    store.put_task(&id, success(json!({"door": "function-url"}))).await.expect(200);
    let got = fetch.get_task_wait(&id, 1.0).await.expect(200);
    assert_eq!(got.json["result"], json!({"door": "function-url"}));
    let batch_got = batch.batch_get(std::slice::from_ref(&id), None).await.expect(200);
    assert_eq!(batch_got.json["results"][0]["status"], "SUCCESS", "{}", batch_got.text);
    // What the router serves is the same stored result.
    assert_eq!(api.get_task(&id).await.expect(200).json["result"], json!({"door": "function-url"}));
    store.forget(&id).await.expect(204);
    assert_eq!(fetch.get_task(&id).await.expect(200).json["status"], "PENDING");
}

#[tokio::test]
async fn a_function_answers_a_route_it_does_not_serve_with_its_own_json_404_and_changes_nothing() {
    let api = Api::new();
    let (store, fetch, batch) = doors(&api);
    let id = api.id("wrong-door");
    // A store sent to fetch's URL, a read sent to store's, a batch to fetch's.
    fetch.put_task(&id, success(json!(1))).await.expect_error(404, "no_route");
    store.get_task(&id).await.expect_error(404, "no_route");
    fetch.batch_get(std::slice::from_ref(&id), None).await.expect_error(404, "no_route");
    batch.get_task(&id).await.expect_error(404, "no_route");
    // Unknown paths and methods, as API Gateway answered them before a function ran.
    for (door, method, path) in [
        (&store, Method::PATCH, format!("/v1/tasks/{id}")),
        (&fetch, Method::GET, "/v2/tasks/x".to_owned()),
        (&batch, Method::GET, "/".to_owned()),
        (&store, Method::POST, "/v1/groups".to_owned()),
        // The batch route's name is no task's, by any method, at any URL.
        (&store, Method::PUT, "/v1/tasks/batch-get".to_owned()),
        (&store, Method::DELETE, "/v1/tasks/batch-get".to_owned()),
        (&fetch, Method::GET, "/v1/tasks/batch-get".to_owned()),
    ] {
        door.call(method.clone(), &path, None).await.expect_error(404, "no_route");
    }
    assert_eq!(api.get_task(&id).await.expect(200).json["status"], "PENDING", "nothing was stored");
}

/// The event a function URL with IAM auth sends (payload 2.0): the caller in
/// `requestContext.authorizer.iam`, the URL's own domain, route `$default`.
fn function_url_event(method: &str, path: &str, body: Option<&str>, arn: &str) -> serde_json::Value {
    let mut event = api_gateway_event(method, path, "", body.map(str::as_bytes), Some(arn));
    let context = &mut event["requestContext"];
    context["apiId"] = "abcdefghijklmnop".into();
    context["domainName"] = "abcdefghijklmnop.lambda-url.us-east-1.on.aws".into();
    context["domainPrefix"] = "abcdefghijklmnop".into();
    event["headers"]["host"] = "abcdefghijklmnop.lambda-url.us-east-1.on.aws".into();
    event
}

#[tokio::test]
async fn a_function_url_callers_iam_identity_lands_in_its_tenant() {
    let api = Api::new();
    let id = api.id("furl-tenant");
    let tenant_a = "arn:aws:iam::111111111111:user/tenant-a";
    let body = success(json!("a's")).to_string();
    let stored =
        api.invoke_event("store", &function_url_event("PUT", &format!("/v1/tasks/{id}"), Some(&body), tenant_a)).await;
    stored.expect(200);
    let read = api.invoke_event("fetch", &function_url_event("GET", &format!("/v1/tasks/{id}"), None, tenant_a)).await;
    assert_eq!(read.expect(200).json["result"], "a's");
    // Another tenant, and the default namespace, do not see it.
    let tenant_b = "arn:aws:iam::222222222222:user/tenant-b";
    let other = api.invoke_event("fetch", &function_url_event("GET", &format!("/v1/tasks/{id}"), None, tenant_b)).await;
    assert_eq!(other.expect(200).json["status"], "PENDING");
    assert_eq!(api.get_task(&id).await.expect(200).json["status"], "PENDING");
    // A caller no tenant names is refused, and nothing is stored for it.
    let stranger = "arn:aws:iam::999999999999:user/nobody";
    let refused = api
        .invoke_event("store", &function_url_event("PUT", &format!("/v1/tasks/{id}-x"), Some(&body), stranger))
        .await;
    assert_eq!(refused.status, 403, "{}", refused.text);
}
