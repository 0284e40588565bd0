//! The AWS SDK configuration of the local stack's tools (devstack, the
//! benchmark, the load test, the integration tests): region `us-east-1`,
//! static credentials `local`, and DynamoDB Local's or moto's endpoint. The
//! functions themselves never use it; they read the SDK's usual environment.

/// The SDK configuration for a local endpoint; `None` leaves the endpoint
/// to each client (set it with the client's own builder).
pub async fn sdk_config(endpoint: Option<&str>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(crate::store::dynamo::https_client())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("local", "local", None, None, "local"));
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}
