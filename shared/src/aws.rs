//! The AWS SDK set-up, in one place: the HTTPS client every AWS client here
//! uses, the functions' shared configuration (retries, timeouts), the
//! DynamoDB client's (with the call counter), and the local stack's tools'.

use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use std::time::Duration;

use crate::config::Config;

/// The HTTPS client of every AWS client here: hyper with rustls on ring,
/// trusting the system's certificates. The SDK's default would be rustls on
/// aws-lc, which the workspace leaves out to keep the functions small (ring
/// made each zip 0.65 MB smaller; see docs/OPERATIONS.md).
pub fn https_client() -> aws_smithy_runtime_api::client::http::SharedHttpClient {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https()
}

/// The AWS configuration every client of a function shares: region,
/// credentials and endpoints from the environment (`AWS_ENDPOINT_URL_DYNAMODB`
/// locally), our retry attempts and backoff for throttling and transient
/// errors, and timeouts so an unreachable service fails fast into a 503.
pub async fn shared_config(config: &Config) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(https_client())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(config.ddb_max_attempts)
                .with_initial_backoff(config.ddb_initial_backoff)
                .with_max_backoff(config.ddb_max_backoff),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .load()
        .await
}

/// The DynamoDB client configuration over a shared one: adds the call counter.
pub fn dynamodb_config(shared: &aws_config::SdkConfig) -> aws_sdk_dynamodb::Config {
    aws_sdk_dynamodb::config::Builder::from(shared).interceptor(crate::calls::CountCalls).build()
}

/// The SDK configuration of the local stack's tools (devstack, the
/// benchmark, the load test, the integration tests): region `us-east-1`,
/// static credentials `local`, and DynamoDB Local's or moto's endpoint. The
/// functions themselves never use it; they read the SDK's usual environment.
/// `None` leaves the endpoint to each client (set it with the client's own
/// builder).
pub async fn local_config(endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(https_client())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("local", "local", None, None, "local"));
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}
