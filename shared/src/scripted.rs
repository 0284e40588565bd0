//! A scripted HTTP layer for the SDK clients in unit tests: every request is
//! answered by a closure, so retries, backoff and error mapping run as they do in
//! production against answers DynamoDB Local cannot give (throttling, say).
//!
//! It stands in for `aws-smithy-http-client`'s `test-util`, which would change
//! that crate's features under `cargo test` and so make cargo build the whole SDK
//! a second time beside the functions' own build.

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use lambda_http::http;
use std::sync::Arc;

type Respond = dyn Fn(http::Request<SdkBody>) -> http::Response<SdkBody> + Send + Sync;

#[derive(Clone)]
struct Scripted(Arc<Respond>);

impl std::fmt::Debug for Scripted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scripted")
    }
}

impl HttpConnector for Scripted {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let request = request.try_into_http1x().expect("an SDK request converts to http 1.x");
        let response = HttpResponse::try_from((self.0)(request)).expect("a scripted response converts");
        HttpConnectorFuture::ready(Ok(response))
    }
}

impl HttpClient for Scripted {
    fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

/// An HTTP client whose every answer comes from `respond`.
pub fn client<B: Into<SdkBody>>(
    respond: impl Fn(http::Request<SdkBody>) -> http::Response<B> + Send + Sync + 'static,
) -> SharedHttpClient {
    SharedHttpClient::new(Scripted(Arc::new(move |req| respond(req).map(Into::into))))
}
