//! The `batch-fetch` function. Route:
//! - `POST /v1/tasks/batch-get`: `{"task_ids": [...], "wait": S?}` to results in request order

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
            match incoming.route {
                Route::BatchGet => service::batch_fetch(app, &incoming.ns, &incoming.body).await,
                other => Err(other.not_here()),
            }
        })
    }))
    .await
}
