//! The `fetch` function. Routes:
//! - `GET /v1/tasks/{task_id}?wait=S`: a result, long-polling up to S seconds
//! - `GET /v1/groups/{group_id}`: restore a saved group
//! - `GET /v1/chords/{group_id}`: a chord's progress

use dynachord::http::{self, App, Route};
use dynachord::{config::Config, service, store::DynamoStore};
use lambda_http::{run, service_fn, Error, Request};

#[tokio::main]
async fn main() -> Result<(), Error> {
    dynachord::init_tracing();
    let config = Config::from_env()?;
    let store = DynamoStore::from_config(&config).await?;
    let app = App { config, store };
    run(service_fn(|request: Request| {
        let app = &app;
        http::handle(app, request, move |incoming| async move {
            let ns = &incoming.ns;
            match incoming.route {
                Route::GetTask(id, wait) => service::fetch_task(app, ns, &id, wait).await,
                Route::GetGroup(id) => service::restore_group(app, ns, &id).await,
                Route::GetChord(id, failed_ids) => service::chord_status(app, ns, &id, failed_ids).await,
                other => Err(other.not_here()),
            }
        })
    }))
    .await
}
