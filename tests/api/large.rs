//! Results past DynamoDB's item limit and Lambda's body limits, through S3
//! (moto's server on the local stack): the spill at store, uploads through a
//! presigned PUT, answers by presigned GET, and the bucket's objects kept in
//! step with the items (refused, replaced, forgotten, orphaned).

use dynachord::store::blobs::{gunzip, gzip, sha256_hex};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{random_hex, success, Api};

/// The local stack's bucket, on moto's server.
struct Bucket {
    s3: aws_sdk_s3::Client,
    name: String,
}

impl Bucket {
    async fn local() -> Self {
        let endpoint = std::env::var("SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".into());
        let config = dynachord::aws::local_config(Some(&endpoint)).await;
        let s3 =
            aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&config).force_path_style(true).build());
        Self { s3, name: "dynachord-local-results".into() }
    }

    /// The keys of a task's objects.
    async fn objects_of(&self, id: &str) -> Vec<String> {
        self.objects_under(&format!("default/task/{id}/")).await
    }

    /// The keys of a saved group's objects.
    async fn objects_of_group(&self, id: &str) -> Vec<String> {
        self.objects_under(&format!("default/group/{id}/")).await
    }

    async fn objects_under(&self, prefix: &str) -> Vec<String> {
        let listed = self.s3.list_objects_v2().bucket(&self.name).prefix(prefix).send().await;
        listed.unwrap().contents().iter().filter_map(|o| o.key().map(str::to_owned)).collect()
    }

    async fn tag_of(&self, key: &str) -> String {
        let tags = self.s3.get_object_tagging().bucket(&self.name).key(key).send().await.unwrap();
        tags.tag_set().iter().map(|t| format!("{}={}", t.key(), t.value())).collect::<Vec<_>>().join(",")
    }

    /// When the object was last written, in seconds since the epoch: what S3's
    /// lifecycle counts an object's age from.
    async fn written_at(&self, key: &str) -> i64 {
        let head = self.s3.head_object().bucket(&self.name).key(key).send().await.unwrap();
        head.last_modified().expect("a last-modified time").secs()
    }

    async fn put(&self, key: &str, body: Vec<u8>) {
        self.s3.put_object().bucket(&self.name).key(key).body(body.into()).send().await.unwrap();
    }
}

/// The result of a GET answered by reference: read from its presigned URL.
async fn resolve(meta: &Value) -> String {
    let url =
        meta["result_ref"]["url"].as_str().unwrap_or_else(|| panic!("no result_ref in {:.300}", meta.to_string()));
    let bytes = reqwest::get(url).await.unwrap().error_for_status().unwrap().bytes().await.unwrap();
    gunzip(&bytes).unwrap()
}

/// Asks for an upload of a task's result and PUTs `object` to the presigned URL; returns its SHA-256.
async fn upload(api: &Api, id: &str, object: &[u8]) -> String {
    upload_at(api, &format!("/v1/tasks/{id}"), object).await
}

/// The same for the task or group at `owner` (`/v1/tasks/{id}`, `/v1/groups/{id}`).
async fn upload_at(api: &Api, owner: &str, object: &[u8]) -> String {
    let sha = sha256_hex(object);
    let body = json!({"sha256": sha, "bytes": object.len()}).to_string();
    let grant = api.call(Method::POST, &format!("{owner}/upload"), Some(body)).await.expect(200);
    assert_eq!(grant.json["method"], "PUT");
    let mut put = reqwest::Client::new().put(grant.json["url"].as_str().unwrap()).body(object.to_vec());
    for (name, value) in grant.json["headers"].as_object().unwrap() {
        put = put.header(name.as_str(), value.as_str().unwrap());
    }
    put.send().await.unwrap().error_for_status().unwrap();
    sha
}

fn committed(sha: &str) -> String {
    json!({"status": "SUCCESS", "result_upload": {"sha256": sha}}).to_string()
}

#[tokio::test]
async fn a_result_past_the_spill_threshold_goes_to_s3_and_round_trips_exactly() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    // 900 KB of random hex compresses to about 450 KB: past the item limit.
    let (large, medium) = (api.id("large"), api.id("medium"));
    let (big, mid) = (random_hex(900_000), random_hex(200_000));
    api.put_task(&large, success(json!(big))).await.expect(200);
    api.put_task(&medium, success(json!(mid))).await.expect(200);
    // Under INLINE_RESULT_BYTES (4 MB): read from S3 and put back in the answer.
    let got = api.get_task(&large).await.expect(200);
    assert_eq!((&got.json["status"], &got.json["result"]), (&json!("SUCCESS"), &json!(big)));
    assert!(got.json.get("result_ref").is_none(), "answered whole");
    assert_eq!(api.get_task(&medium).await.expect(200).json["result"], json!(mid));
    let keys = bucket.objects_of(&large).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert_eq!(bucket.tag_of(&keys[0]).await, "dynachord-expiry=1d", "the default TTL's lifetime class");
    // The same through batch-get: read from S3, in the answer.
    let items = api.batch_get(&[medium.clone(), large.clone()], None).await.expect(200).json["results"].clone();
    assert_eq!((&items[0]["result"], &items[1]["result"]), (&json!(mid), &json!(big)));
    api.forget(&large).await.expect(204);
    assert!(bucket.objects_of(&large).await.is_empty(), "forget deletes the object");
    assert_eq!(api.get_task(&large).await.json["status"], "PENDING");
}

#[tokio::test]
async fn an_upload_is_committed_by_the_store_and_served_by_reference() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    let id = api.id("uploaded");
    // About 5 MB: past INLINE_RESULT_BYTES (4 MB), so a GET answers a presigned URL.
    let result = json!({"rows": (0..250_000).map(|i| format!("row {i} {}", random_hex(8))).collect::<Vec<_>>()});
    let text = result.to_string();
    let sha = upload(&api, &id, &gzip(text.as_bytes())).await;
    assert_eq!(api.get_task(&id).await.json["status"], "PENDING", "nothing is stored before the commit");
    let stored = api.put_task_raw(&id, &committed(&sha)).await.expect(200);
    assert_eq!(stored.json["status"], "SUCCESS");
    let got = api.get_task(&id).await.expect(200);
    assert_eq!(got.json["result_ref"]["bytes"], text.len());
    assert_eq!(resolve(&got.json).await, text);
    assert_eq!(bucket.objects_of(&id).await, [format!("default/task/{id}/{sha}")]);
    // A commit sent again is a 409, and keeps the object it points to.
    api.put_task_raw(&id, &committed(&sha)).await.expect_error(409, "state_conflict");
    assert_eq!(resolve(&api.get_task(&id).await.json).await, text);
}

#[tokio::test]
async fn a_stored_object_cannot_be_replaced_and_an_altered_one_is_never_served() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    let id = api.id("altered");
    // 150 KB: small enough for the local stack to read it into its answer.
    let text = json!(random_hex(150_000)).to_string();
    let object = gzip(text.as_bytes());
    let sha = sha256_hex(&object);
    let body = json!({"sha256": sha, "bytes": object.len()}).to_string();
    let grant = api.call(Method::POST, &format!("/v1/tasks/{id}/upload"), Some(body)).await.expect(200);
    let put = |bytes: Vec<u8>| {
        let mut put = reqwest::Client::new().put(grant.json["url"].as_str().unwrap()).body(bytes);
        for (name, value) in grant.json["headers"].as_object().unwrap() {
            put = put.header(name.as_str(), value.as_str().unwrap());
        }
        put.send()
    };
    assert!(put(object.clone()).await.unwrap().status().is_success());
    api.put_task_raw(&id, &committed(&sha)).await.expect(200);
    assert_eq!(api.get_task(&id).await.expect(200).json["result"].to_string(), text);
    // The URL is still valid, but it never writes over an object.
    let mut other = gzip(json!(random_hex(150_000)).to_string().as_bytes());
    other.resize(object.len(), b' ');
    assert_eq!(put(other).await.unwrap().status(), 412);
    assert_eq!(api.get_task(&id).await.expect(200).json["result"].to_string(), text);
    // Altered behind the service's back: refused, never served.
    bucket.put(&format!("default/task/{id}/{sha}"), gzip(b"\"tampered\"")).await;
    let refused = api.get_task(&id).await.expect_error(500, "internal");
    assert!(!refused.text.contains("tampered"), "{}", refused.text);
}

#[tokio::test]
async fn an_upload_missing_altered_or_not_json_is_refused_and_nothing_is_stored() {
    let api = Api::new();
    let id = api.id("bad-upload");
    let never = sha256_hex(b"never uploaded");
    api.put_task_raw(&id, &committed(&never)).await.expect_error(400, "invalid_upload");
    // Uploaded, then committed under another hash: no object there.
    let sha = upload(&api, &id, &gzip(b"[1,2,3]")).await;
    let other = sha256_hex(b"other");
    api.put_task_raw(&id, &committed(&other)).await.expect_error(400, "invalid_upload");
    for (name, object) in [("truncated", gzip(b"[1,2,")), ("plain", b"[1,2,3]".to_vec()), ("two", gzip(b"1 2"))] {
        let id = api.id(name);
        let sha = upload(&api, &id, &object).await;
        let refused = api.put_task_raw(&id, &committed(&sha)).await.expect_error(400, "invalid_upload");
        assert!(refused.text.contains("gzip-compressed JSON"), "{}", refused.text);
        assert_eq!(api.get_task(&id).await.json["status"], "PENDING");
    }
    // A result in the body and an upload: refused before any work.
    let both = json!({"status": "SUCCESS", "result": 1, "result_upload": {"sha256": sha}}).to_string();
    api.put_task_raw(&id, &both).await.expect_error(400, "invalid_meta");
    assert_eq!(api.get_task(&id).await.json["status"], "PENDING");
    // Bad upload requests.
    let path = format!("/v1/tasks/{id}/upload");
    for body in [json!({"sha256": "abc"}), json!({}), json!({"sha256": sha, "bytes": (5u64 << 30) + 1})] {
        let resp = api.call(Method::POST, &path, Some(body.to_string())).await;
        assert!(matches!(resp.status, 400 | 413), "{}", resp.text);
    }
}

#[tokio::test]
async fn the_upload_size_limit_is_checked_at_the_limit_and_one_past_it() {
    let api = Api::new();
    let id = api.id("limit");
    let path = format!("/v1/tasks/{id}/upload");
    let sha = sha256_hex(b"x");
    // MAX_RESULT_BYTES is 512 MiB by default.
    let at = api.call(Method::POST, &path, Some(json!({"sha256": sha, "bytes": 512u64 << 20}).to_string())).await;
    at.expect(200);
    let past =
        api.call(Method::POST, &path, Some(json!({"sha256": sha, "bytes": (512u64 << 20) + 1}).to_string())).await;
    past.expect_error(413, "result_too_large");
}

#[tokio::test]
async fn a_refused_store_deletes_its_object_and_a_replaced_result_its_old_one() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    let id = api.id("replaced");
    let failure = json!({"status": "FAILURE", "result": {"exc_type": "ValueError", "exc_message": [random_hex(600_000)], "exc_module": "builtins"}});
    api.put_task(&id, failure).await.expect(200);
    let first = bucket.objects_of(&id).await;
    assert_eq!(first.len(), 1);
    // A SUCCESS replaces the FAILURE: the FAILURE's object goes.
    let winner = random_hex(600_000);
    api.put_task(&id, success(json!(winner))).await.expect(200);
    let second = bucket.objects_of(&id).await;
    assert_eq!(second.len(), 1);
    assert_ne!(first, second);
    // Another SUCCESS is refused: its object goes, the stored one stays.
    api.put_task(&id, success(json!(random_hex(600_000)))).await.expect_error(409, "state_conflict");
    assert_eq!(bucket.objects_of(&id).await, second);
    // The same SUCCESS sent again (a retried store) is refused and keeps its object.
    api.put_task(&id, success(json!(winner))).await.expect_error(409, "state_conflict");
    assert_eq!(bucket.objects_of(&id).await, second);
    // 600 KB, under INLINE_RESULT_BYTES: read back from S3 into the answer.
    assert_eq!(api.get_task(&id).await.expect(200).json["result"], json!(winner));
}

/// The same id storing the same large result again after its item expired
/// finds its object there (objects are named by content): the object is
/// written again, so S3's lifecycle counts its age from the new store, not
/// the first (S8), and it carries the new item's lifetime class.
#[tokio::test]
async fn a_result_stored_again_renews_its_objects_age_and_class() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    let id = api.id("again");
    let value = json!(random_hex(200_000));
    let mut short = success(value.clone());
    short["expires_in"] = json!(1);
    api.put_task(&id, short).await.expect(200);
    let keys = bucket.objects_of(&id).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let first = bucket.written_at(&keys[0]).await;
    // Until the item has expired (reads treat it as missing) and the clock
    // has passed the object's second, so a new write shows.
    crate::helpers::poll_until("the first item expired", std::time::Duration::from_secs(30), || async {
        let expired = api.get_task(&id).await.json["status"] == "PENDING";
        let later =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64 > first;
        (expired && later).then_some(())
    })
    .await;
    let mut long = success(value.clone());
    long["expires_in"] = json!(7 * 86_400);
    api.put_task(&id, long).await.expect(200);
    assert_eq!(bucket.objects_of(&id).await, keys, "the same object");
    assert!(bucket.written_at(&keys[0]).await > first, "written again: its age counts from now");
    assert_eq!(bucket.tag_of(&keys[0]).await, "dynachord-expiry=7d");
    assert_eq!(api.get_task(&id).await.expect(200).json["result"], value);
}

#[tokio::test]
async fn an_object_no_item_points_to_is_never_served() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    // What a store that crashed between its S3 put and its item write
    // leaves behind, and an upload never committed.
    let (crashed, uncommitted) = (api.id("crashed"), api.id("uncommitted"));
    let object = gzip(json!(random_hex(1000)).to_string().as_bytes());
    bucket.put(&format!("default/task/{crashed}/{}", sha256_hex(&object)), object.clone()).await;
    upload(&api, &uncommitted, &object).await;
    for id in [&crashed, &uncommitted] {
        assert_eq!(api.get_task(id).await.expect(200).json["status"], "PENDING");
        assert_eq!(bucket.objects_of(id).await.len(), 1);
    }
    let items = api.batch_get(&[crashed, uncommitted], None).await.expect(200).json["results"].clone();
    assert!(items.as_array().unwrap().iter().all(|r| r["status"] == "PENDING"), "{items}");
}

#[tokio::test]
async fn a_meta_past_the_item_limit_without_its_result_is_refused_clearly_and_stored_whole_as_a_fields_upload() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    let id = api.id("huge-traceback");
    // The result goes to S3; a traceback of 900 KB of random hex sent in the body does not.
    let exc = json!({"exc_type": "E", "exc_message": [], "exc_module": "m"});
    let traceback = random_hex(900_000);
    let meta = json!({"status": "FAILURE", "result": exc, "traceback": traceback});
    let refused = api.put_task(&id, meta).await.expect_error(413, "result_too_large");
    assert!(refused.json["error"]["message"].as_str().unwrap().contains("upload"), "{}", refused.json);
    assert_eq!(api.get_task(&id).await.json["status"], "PENDING");
    assert!(bucket.objects_of(&id).await.is_empty(), "the result's object went with the refusal");
    // Uploaded with the result as the meta's large fields, it is stored and read back whole.
    let fields = json!({"result": exc, "traceback": traceback});
    let sha = upload(&api, &id, &gzip(fields.to_string().as_bytes())).await;
    let commit = json!({"status": "FAILURE", "result_upload": {"sha256": sha, "fields": true}});
    api.put_task(&id, commit).await.expect(200);
    let got = api.get_task(&id).await.expect(200).json;
    assert_eq!((&got["status"], &got["result"]), (&json!("FAILURE"), &exc));
    assert_eq!(got["traceback"], traceback);
}

/// `result_extended` arguments of megabytes: the meta is too large to send
/// even without its result, so the worker uploads result, args and kwargs
/// as one object (`"fields": true`); reads put them back in place.
#[tokio::test]
async fn a_meta_whose_arguments_are_megabytes_is_uploaded_with_them_and_read_back_whole() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    let id = api.id("big-args");
    let arg = random_hex(2_000_000);
    let fields = json!({"result": {"n": 3}, "args": [arg, 1], "kwargs": {"k": "v"}});
    let sha = upload(&api, &id, &gzip(fields.to_string().as_bytes())).await;
    let commit = json!({"status": "SUCCESS", "name": "proj.big", "worker": "w1", "queue": "q",
        "result_upload": {"sha256": sha, "fields": true}});
    api.put_task(&id, commit.clone()).await.expect(200);
    // 2 MB, under INLINE_RESULT_BYTES: put back into the answer.
    let got = api.get_task(&id).await.expect(200).json;
    assert_eq!((&got["result"], &got["args"], &got["kwargs"]), (&fields["result"], &fields["args"], &fields["kwargs"]));
    assert_eq!((&got["name"], &got["worker"], &got["queue"]), (&json!("proj.big"), &json!("w1"), &json!("q")));
    assert!(got.get("result_ref").is_none());
    let items = api.batch_get(std::slice::from_ref(&id), None).await.expect(200).json["results"].clone();
    assert_eq!(items[0]["args"], fields["args"]);
    assert_eq!(items[0]["result"], fields["result"]);
    assert_eq!(bucket.objects_of(&id).await, [format!("default/task/{id}/{sha}")]);
    // Past INLINE_RESULT_BYTES: a reference that says it holds the fields.
    let huge = api.id("huger-args");
    let fields = json!({"result": null, "args": [random_hex(4_500_000)]});
    let sha = upload(&api, &huge, &gzip(fields.to_string().as_bytes())).await;
    let commit = json!({"status": "SUCCESS", "result_upload": {"sha256": sha, "fields": true}});
    api.put_task(&huge, commit).await.expect(200);
    let got = api.get_task(&huge).await.expect(200).json;
    assert_eq!(got["result_ref"]["fields"], true, "{:.300}", got.to_string());
    assert_eq!(serde_json::from_str::<Value>(&resolve(&got).await).unwrap(), fields);
    api.forget(&huge).await.expect(204);
    assert!(bucket.objects_of(&huge).await.is_empty(), "forget deletes the object");
}

#[tokio::test]
async fn a_fields_upload_of_the_wrong_shape_or_beside_the_same_fields_is_refused_and_nothing_is_stored() {
    let api = Api::new();
    for (name, object) in [
        ("status-inside", json!({"result": 1, "status": "SUCCESS"})),
        ("args-not-a-list", json!({"args": {"a": 1}})),
        ("kwargs-not-an-object", json!({"kwargs": [1]})),
        ("not-an-object", json!([1, 2])),
    ] {
        let id = api.id(name);
        let sha = upload(&api, &id, &gzip(object.to_string().as_bytes())).await;
        let commit = json!({"status": "SUCCESS", "result_upload": {"sha256": sha, "fields": true}});
        api.put_task(&id, commit).await.expect_error(400, "invalid_upload");
        assert_eq!(api.get_task(&id).await.json["status"], "PENDING", "{name}");
    }
    let id = api.id("twice");
    let sha = upload(&api, &id, &gzip(br#"{"args":[1]}"#)).await;
    for also in [json!({"args": [2]}), json!({"kwargs": {}})] {
        let mut commit = json!({"status": "SUCCESS", "result_upload": {"sha256": sha, "fields": true}});
        commit.as_object_mut().unwrap().extend(also.as_object().unwrap().clone());
        api.put_task(&id, commit).await.expect_error(400, "invalid_meta");
    }
    assert_eq!(api.get_task(&id).await.json["status"], "PENDING");
}

/// `GroupResult.save()` of 50,000 tasks: about 2.7 MB as Celery's tuple,
/// past a request's size, so it is uploaded and committed as a large result is.
#[tokio::test]
async fn a_saved_group_of_fifty_thousand_is_uploaded_and_read_back_and_its_object_follows_the_group() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    let gid = api.id("fifty-thousand");
    let members: Vec<Value> =
        (0..50_000).map(|i| json!([[format!("{gid}-{i:05}-{}", random_hex(8)), null], null])).collect();
    let tuple = json!([[gid, null], members]);
    let text = tuple.to_string();
    assert!(text.len() > 2_000_000, "{}", text.len());
    let owner = format!("/v1/groups/{gid}");
    let sha = upload_at(&api, &owner, &gzip(text.as_bytes())).await;
    api.get_group(&gid).await.expect_error(404, "group_not_found");
    let commit = json!({"result_upload": {"sha256": sha}}).to_string();
    api.put_group(&gid, &commit).await.expect(200);
    // Under INLINE_RESULT_BYTES: read from S3 into the answer, exactly.
    let got = api.get_group(&gid).await.expect(200);
    assert_eq!(got.json, json!({"result": tuple}));
    assert_eq!(bucket.objects_of_group(&gid).await, [format!("default/group/{gid}/{sha}")]);
    // Saved again small: the old object goes.
    api.put_group(&gid, &json!({"result": [[gid, null], []]}).to_string()).await.expect(200);
    assert!(bucket.objects_of_group(&gid).await.is_empty());
    assert_eq!(api.get_group(&gid).await.expect(200).json["result"], json!([[gid, null], []]));
    // Uploaded again, then deleted: the object goes with the group.
    let sha = upload_at(&api, &owner, &gzip(text.as_bytes())).await;
    api.put_group(&gid, &json!({"result_upload": {"sha256": sha}}).to_string()).await.expect(200);
    api.delete_group(&gid).await.expect(204);
    assert!(bucket.objects_of_group(&gid).await.is_empty());
    api.get_group(&gid).await.expect_error(404, "group_not_found");
}

#[tokio::test]
async fn a_saved_group_past_the_item_limit_goes_to_s3_and_past_the_answer_limit_comes_by_reference() {
    let (api, bucket) = (Api::new(), Bucket::local().await);
    // Sent in the request, 900 KB of random hex compresses past the item limit: spilled.
    let spilled = api.id("spilled-group");
    let result = json!([[spilled, null], [[[random_hex(900_000), null], null]]]);
    api.put_group(&spilled, &json!({"result": result}).to_string()).await.expect(200);
    assert_eq!(bucket.objects_of_group(&spilled).await.len(), 1);
    assert_eq!(api.get_group(&spilled).await.expect(200).json, json!({"result": result}));
    // Uploaded, past INLINE_RESULT_BYTES (4 MB): a reference.
    let large = api.id("referenced-group");
    let result = json!([[large, null], [[[random_hex(4_500_000), null], null]]]);
    let text = result.to_string();
    let sha = upload_at(&api, &format!("/v1/groups/{large}"), &gzip(text.as_bytes())).await;
    api.put_group(&large, &json!({"result_upload": {"sha256": sha}, "expires_in": 600}).to_string()).await.expect(200);
    let got = api.get_group(&large).await.expect(200).json;
    assert_eq!(got["result"], Value::Null);
    assert_eq!(got["result_ref"]["bytes"], text.len());
    assert_eq!(resolve(&got).await, text);
    // Bad saves change nothing.
    let never = sha256_hex(b"never uploaded");
    for body in [
        json!({"result_upload": {"sha256": never}}),
        json!({"result_upload": {"sha256": "abc"}}),
        json!({"result_upload": {"sha256": sha, "fields": true}}),
        json!({"result": 1, "result_upload": {"sha256": sha}}),
        json!({}),
    ] {
        let refused = api.put_group(&large, &body.to_string()).await;
        assert_eq!(refused.status, 400, "{body}: {}", refused.text);
    }
    assert_eq!(api.get_group(&large).await.expect(200).json["result_ref"]["bytes"], text.len());
}

/// A chord whose parts were called with arguments of megabytes
/// (`result_extended`): each part's result, args and kwargs were uploaded
/// as one object. The callback gets the parts' results, not their fields;
/// a redrive sends a failed part again with its arguments from S3.
#[tokio::test]
async fn a_chords_parts_with_uploaded_arguments_call_back_with_their_results_and_are_redriven_with_their_arguments() {
    let api = Api::new();
    let queue = crate::sqs::Queue::new(&api.id("q")).await;
    let chord = crate::chords::Chord::new(&api, &queue, json!({}));
    let ids: Vec<String> = (0..3).map(|i| api.id(&format!("p{i}"))).collect();
    // Small enough for a queue message (the redrive sends them again); the
    // service takes a fields upload of any size alike.
    let args: Vec<Value> = (0..3).map(|i| json!([random_hex(100_000), i])).collect();
    let failure = json!({"exc_type": "ValueError", "exc_message": ["boom"], "exc_module": "builtins"});
    let store = |i: usize, status: &'static str, result: Value| {
        let (api, chord, queue, ids, args) = (&api, &chord, &queue, &ids, &args);
        async move {
            let fields = json!({"result": result, "args": args[i], "kwargs": {"k": i}});
            let sha = upload(api, &ids[i], &gzip(fields.to_string().as_bytes())).await;
            let mut part = chord.part(&ids[i], i, 3, status, Value::Null);
            let part = part.as_object_mut().unwrap();
            part.remove("result");
            part.insert("result_upload".into(), json!({"sha256": sha, "fields": true}));
            part.insert("name".into(), json!("proj.tasks.big"));
            part.insert("queue".into(), json!(queue.name));
            api.put_task(&ids[i], Value::Object(part.clone())).await.expect(200);
        }
    };
    store(0, "SUCCESS", json!({"n": 0})).await;
    store(1, "FAILURE", failure).await;
    store(2, "SUCCESS", json!({"n": 2})).await;
    let gid = &chord.gid;
    crate::helpers::poll_until("the chord failed", std::time::Duration::from_secs(60), || async {
        let status = api.call(Method::GET, &format!("/v1/chords/{gid}"), None).await;
        (status.json["state"] == "failed").then_some(())
    })
    .await;
    api.call(Method::POST, &format!("/v1/chords/{gid}/redrive"), None).await.expect(202);
    let resent = queue.expect(std::time::Duration::from_secs(60), std::time::Duration::from_secs(2)).await;
    assert_eq!(resent.len(), 1, "the failed part only");
    assert_eq!(resent[0].headers["id"], json!(ids[1]));
    assert_eq!(resent[0].body[0], args[1], "sent again with its arguments, read from S3");
    assert_eq!(resent[0].body[1], json!({"k": 1}));
    // It runs again and succeeds: the chord calls back with the results only.
    store(1, "SUCCESS", json!({"n": 1})).await;
    let callbacks = queue.expect(std::time::Duration::from_secs(60), std::time::Duration::from_secs(2)).await;
    assert_eq!(callbacks.len(), 1, "{callbacks:?}");
    assert_eq!(callbacks[0].body[0], json!([[{"n": 0}, {"n": 1}, {"n": 2}]]));
}
