//! The `store` function. Routes:
//! - `PUT /v1/tasks/{task_id}`: store a result (one conditional write)
//! - `POST /v1/tasks/{task_id}/upload`: a presigned URL to upload a large result
//! - `DELETE /v1/tasks/{task_id}`: forget a result
//! - `PUT /v1/groups/{group_id}`: save a group
//! - `POST /v1/groups/{group_id}/upload`: a presigned URL to upload a large saved group
//! - `DELETE /v1/groups/{group_id}`: delete a group
//! - `POST /v1/chords/{group_id}/redrive`: send a chord's failed parts again
//! - `POST /v1/cache/get-or-delegate`, `/v1/cache/entry`, `/v1/cache/invalidate`:
//!   the processing cache (a miss sends the processing's task message)

use dynachord::aws::shared_config;
use dynachord::dispatch::Target;
use dynachord::http::{self, App, Route};
use dynachord::{cache, config::Config, service, store::DynamoStore};
use lambda_http::{run, service_fn, Error, Request};

#[tokio::main]
async fn main() -> Result<(), Error> {
    dynachord::init_tracing();
    let config = Config::from_env()?;
    let shared = shared_config(&config).await;
    let store = DynamoStore::from_shared(&config, &shared).await?;
    let sink = Target::new(config.callbacks.clone(), &shared);
    let app = App { config, store };
    run(service_fn(|request: Request| {
        let (app, sink) = (&app, &sink);
        http::handle(app, request, move |incoming| async move {
            let ns = &incoming.ns;
            match incoming.route {
                Route::PutTask(id) => service::store_task(app, ns, &id, &incoming.body).await,
                Route::UploadTask(id) => service::upload_task(app, ns, &id, &incoming.body).await,
                Route::DeleteTask(id) => service::forget_task(app, ns, &id).await,
                Route::PutGroup(id) => service::save_group(app, ns, &id, &incoming.body).await,
                Route::UploadGroup(id) => service::upload_group(app, ns, &id, &incoming.body).await,
                Route::DeleteGroup(id) => service::delete_group(app, ns, &id).await,
                Route::RedriveChord(id) => service::redrive_chord(app, ns, &id, &incoming.body).await,
                Route::CacheGetOrDelegate => cache::get_or_delegate(app, sink, ns, &incoming.body).await,
                Route::CacheEntry => cache::entry_state(app, ns, &incoming.body).await,
                Route::CacheInvalidate => cache::invalidate(app, ns, &incoming.body).await,
                other => Err(other.not_here()),
            }
        })
    }))
    .await
}
