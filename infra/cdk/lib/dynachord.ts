// The Dynachord construct: the whole service (table, results bucket, the four
// functions, the HTTP API, chord-join's stream mapping and dead-letter queue,
// alarms and dashboard), the same resources infra/template.yaml deploys with
// SAM. Settings are the SAM template's parameters, by the same names; each may
// be a literal or a token (the app passes CfnParameters). docs/CDK.md says how
// to use it; tests/infra/test_cdk.py compares its synthesized template with
// the SAM template's.

import * as fs from "node:fs";
import * as path from "node:path";
import {
  Aws,
  CfnCondition,
  CfnResource,
  Duration,
  Fn,
  RemovalPolicy,
  Token,
  Validations,
  aws_apigatewayv2 as apigw,
  aws_applicationautoscaling as autoscaling,
  aws_cloudwatch as cloudwatch,
  aws_dynamodb as dynamodb,
  aws_iam as iam,
  aws_lambda as lambda,
  aws_logs as logs,
  aws_s3 as s3,
  aws_sqs as sqs,
} from "aws-cdk-lib";
import { Construct } from "constructs";
import { PARAMETERS, ParameterName } from "./parameters";
import { DASHBOARD_BODY } from "./dashboard";

/** A setting: a literal, or a token such as a CfnParameter's value. */
export type Setting = string | number | string[];

/** The settings, named as the SAM template's parameters (see lib/parameters.ts). */
export type DynachordSettings = { [K in ParameterName]: Setting };

/** The four functions, by their binary's name. */
export const FUNCTIONS = ["store", "fetch", "batch-fetch", "chord-join"] as const;
export type FunctionName = (typeof FUNCTIONS)[number];

export interface DynachordProps {
  /** Any of the SAM template's parameters; the rest take its defaults. */
  readonly settings?: Partial<DynachordSettings>;
  /**
   * Each function's code. Default: `{assetsDir}/{name}/bootstrap.zip`, or that directory
   * `cargo lambda build --release --arm64` (or `--x86-64`, to match
   * Architecture) writes each `bootstrap` to.
   */
  readonly code?: Partial<Record<FunctionName, lambda.Code>>;
  /** Default: the workspace's `target/lambda`. */
  readonly assetsDir?: string;
}

/** One function's own part of the template: what differs between the four. */
interface FunctionSpec {
  readonly id: string;
  readonly binary: FunctionName;
  readonly description: string;
  readonly memorySize: number;
  readonly timeout: number;
  readonly environment?: Record<string, string>;
  readonly statements: unknown[];
  readonly managedPolicies?: string[];
  readonly extraPolicies?: { name: string; statements: unknown[] }[];
}

/** An HTTP API route: the SAM template's logical name, method, path and function. */
const ROUTES: [string, string, string, string][] = [
  ["PutTask", "PUT", "/v1/tasks/{task_id}", "Store"],
  ["UploadTask", "POST", "/v1/tasks/{task_id}/upload", "Store"],
  ["DeleteTask", "DELETE", "/v1/tasks/{task_id}", "Store"],
  ["PutGroup", "PUT", "/v1/groups/{group_id}", "Store"],
  ["UploadGroup", "POST", "/v1/groups/{group_id}/upload", "Store"],
  ["DeleteGroup", "DELETE", "/v1/groups/{group_id}", "Store"],
  ["RedriveChord", "POST", "/v1/chords/{group_id}/redrive", "Store"],
  ["CacheGetOrDelegate", "POST", "/v1/cache/get-or-delegate", "Store"],
  ["CacheEntry", "POST", "/v1/cache/entry", "Store"],
  ["CacheInvalidate", "POST", "/v1/cache/invalidate", "Store"],
  ["GetTask", "GET", "/v1/tasks/{task_id}", "Fetch"],
  ["GetGroup", "GET", "/v1/groups/{group_id}", "Fetch"],
  ["GetChord", "GET", "/v1/chords/{group_id}", "Fetch"],
  ["BatchGet", "POST", "/v1/tasks/batch-get", "BatchFetch"],
];

/**
 * A function's code as cargo lambda writes it: `{dir}/{name}/bootstrap.zip`
 * (`--output-format zip`, as `./dev build-lambdas` builds), used as it is, or
 * else the directory holding `bootstrap`, which CDK zips.
 */
function defaultCode(dir: string, name: FunctionName): lambda.Code {
  const zip = path.join(dir, name, "bootstrap.zip");
  return lambda.Code.fromAsset(fs.existsSync(zip) ? zip : path.join(dir, name));
}

/** The bucket's lifetime classes (shared/src/store/blobs.rs tags objects with them). */
const EXPIRY_DAYS = [1, 7, 30, 90, 365, 3650];

export class Dynachord extends Construct {
  readonly table: dynamodb.CfnTable;
  readonly bucket: s3.CfnBucket;
  readonly api: apigw.CfnApi;
  readonly deadLetterQueue: sqs.CfnQueue;
  readonly deadlineQueue: sqs.CfnQueue;
  /** Whether the functions are traced (Tracing is not Disabled). */
  readonly isTracingOn: CfnCondition;
  readonly functions: Record<FunctionName, lambda.Function>;
  /** Base URL of the v1 API (FrontDoor HttpApi). */
  readonly apiUrl: string;
  /** Celery's result_backend for this stack, either front door. */
  readonly resultBackend: string;
  /** Whether the HTTP API is the front door (FrontDoor HttpApi). */
  readonly useHttpApi: CfnCondition;
  /** The CloudWatch dashboard's console URL. */
  readonly dashboardUrl: string;

  constructor(scope: Construct, id: string, props: DynachordProps = {}) {
    super(scope, id);
    const given = props.settings ?? {};
    const setting = (name: ParameterName): Setting => given[name] ?? PARAMETERS[name].default;
    const str = (name: ParameterName): string => {
      const value = setting(name);
      return Array.isArray(value) ? Fn.join(",", value) : Token.asString(value);
    };
    const num = (name: ParameterName): number => {
      const value = setting(name);
      return typeof value === "number" ? value : Token.asNumber(value);
    };
    const list = (name: ParameterName): string[] => {
      const value = setting(name);
      return Array.isArray(value) ? value : Fn.split(",", Token.asString(value));
    };

    const condition = (name: string, expression: ReturnType<typeof Fn.conditionEquals>) =>
      new CfnCondition(this, name, { expression });
    const isProvisioned = condition("IsProvisioned", Fn.conditionEquals(str("BillingMode"), "PROVISIONED"));
    const useAutoScaling = condition(
      "UseAutoScaling",
      Fn.conditionAnd(isProvisioned, Fn.conditionEquals(str("EnableAutoScaling"), "true")),
    );
    const isIamAuth = condition("IsIamAuth", Fn.conditionEquals(str("AuthMode"), "iam"));
    const useHttpApi = condition("UseHttpApi", Fn.conditionEquals(str("FrontDoor"), "HttpApi"));
    const useFunctionUrls = condition("UseFunctionUrls", Fn.conditionEquals(str("FrontDoor"), "FunctionUrls"));
    this.useHttpApi = useHttpApi;
    // A setting that is not empty (a list: any of its members).
    const isSet = (name: string, value: string) => condition(name, Fn.conditionNot(Fn.conditionEquals(value, "")));
    const hasQueueArns = isSet("HasQueueArns", Fn.join("", list("CallbackQueueArns")));
    const hasQueuePrefix = isSet("HasQueuePrefix", str("CallbackQueueUrlPrefix"));
    const isLambdaTarget = condition("IsLambdaTarget", Fn.conditionEquals(str("CallbackTarget"), "lambda"));
    const hasAlarmTopic = isSet("HasAlarmTopic", str("AlarmTopicArn"));
    const isDeletionProtected = condition(
      "IsDeletionProtected",
      Fn.conditionEquals(str("DeletionProtection"), "true"),
    );
    const hasQueueKmsKeys = isSet("HasQueueKmsKeys", Fn.join("", list("CallbackQueueKmsKeyArns")));
    const policyArn = (name: string) => `arn:${Aws.PARTITION}:iam::aws:policy/${name}`;
    // As SAM does: X-Ray write access and a tracing mode unless Tracing is Disabled.
    const isTracingOn = condition("IsTracingOn", Fn.conditionNot(Fn.conditionEquals(str("Tracing"), "Disabled")));
    this.isTracingOn = isTracingOn;
    const hasChordJoinReservation = condition(
      "HasChordJoinReservation",
      Fn.conditionNot(Fn.conditionEquals(str("ChordJoinReservedConcurrency"), "0")),
    );

    // Results too large for an item: one object per result, tagged with the
    // lifetime class that outlives its item; one rule per class removes it.
    this.bucket = new s3.CfnBucket(this, "ResultsBucket", {
      bucketEncryption: {
        serverSideEncryptionConfiguration: [
          { serverSideEncryptionByDefault: { sseAlgorithm: "AES256" }, bucketKeyEnabled: true },
        ],
      },
      publicAccessBlockConfiguration: {
        blockPublicAcls: true,
        blockPublicPolicy: true,
        ignorePublicAcls: true,
        restrictPublicBuckets: true,
      },
      ownershipControls: { rules: [{ objectOwnership: "BucketOwnerEnforced" }] },
      lifecycleConfiguration: {
        rules: [
          ...EXPIRY_DAYS.map((days) => ({
            id: `expire-${days}d`,
            status: "Enabled",
            expirationInDays: days,
            tagFilters: [{ key: "dynachord-expiry", value: `${days}d` }],
          })),
          { id: "abort-incomplete-uploads", status: "Enabled", abortIncompleteMultipartUpload: { daysAfterInitiation: 1 } },
        ],
      },
    });
    this.bucket.applyRemovalPolicy(RemovalPolicy.RETAIN);
    new s3.CfnBucketPolicy(this, "ResultsBucketPolicy", {
      bucket: this.bucket.ref,
      policyDocument: {
        Version: "2012-10-17",
        Statement: [
          {
            Sid: "DenyInsecureTransport",
            Effect: "Deny",
            Principal: "*",
            Action: "s3:*",
            Resource: [this.bucket.attrArn, `${this.bucket.attrArn}/*`],
            Condition: { Bool: { "aws:SecureTransport": "false" } },
          },
        ],
      },
    });
    const objects = `${this.bucket.attrArn}/*`;

    // One table for results, groups and chords (shared/src/store/schema.rs).
    this.table = new dynamodb.CfnTable(this, "ResultsTable", {
      tableName: str("TableName"),
      billingMode: str("BillingMode"),
      attributeDefinitions: [
        { attributeName: "pk", attributeType: "S" },
        { attributeName: "sk", attributeType: "S" },
      ],
      keySchema: [
        { attributeName: "pk", keyType: "HASH" },
        { attributeName: "sk", keyType: "RANGE" },
      ],
      provisionedThroughput: Fn.conditionIf(
        isProvisioned.logicalId,
        { ReadCapacityUnits: num("ReadCapacityUnits"), WriteCapacityUnits: num("WriteCapacityUnits") },
        Aws.NO_VALUE,
      ) as unknown as dynamodb.CfnTable.ProvisionedThroughputProperty,
      streamSpecification: { streamViewType: "NEW_AND_OLD_IMAGES" },
      timeToLiveSpecification: { attributeName: "expires_at", enabled: true },
      pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: true },
      sseSpecification: { sseEnabled: true },
      deletionProtectionEnabled: Fn.conditionIf(isDeletionProtected.logicalId, true, false) as unknown as boolean,
    });
    this.table.applyRemovalPolicy(RemovalPolicy.RETAIN);
    // The validator does not follow IsProvisioned: the capacity is set exactly when the mode is PROVISIONED.
    Validations.of(this.table).acknowledge({
      id: "CloudFormation-Validate::E3639",
      reason: "ProvisionedThroughput is set under IsProvisioned",
    });

    for (const [kind, dimension, metric] of [
      ["Read", "dynamodb:table:ReadCapacityUnits", "DynamoDBReadCapacityUtilization"],
      ["Write", "dynamodb:table:WriteCapacityUnits", "DynamoDBWriteCapacityUtilization"],
    ]) {
      const target = new autoscaling.CfnScalableTarget(this, `${kind}ScalableTarget`, {
        serviceNamespace: "dynamodb",
        resourceId: `table/${this.table.ref}`,
        scalableDimension: dimension,
        minCapacity: num("AutoScalingMinCapacity"),
        maxCapacity: num("AutoScalingMaxCapacity"),
      });
      target.cfnOptions.condition = useAutoScaling;
      const policy = new autoscaling.CfnScalingPolicy(this, `${kind}ScalingPolicy`, {
        policyName: `${this.table.ref}-${kind.toLowerCase()}`,
        policyType: "TargetTrackingScaling",
        scalingTargetId: target.ref,
        targetTrackingScalingPolicyConfiguration: {
          targetValue: num("AutoScalingTargetUtilization"),
          predefinedMetricSpecification: { predefinedMetricType: metric },
        },
      });
      policy.cfnOptions.condition = useAutoScaling;
    }

    this.deadLetterQueue = new sqs.CfnQueue(this, "ChordJoinDeadLetterQueue", {
      messageRetentionPeriod: 1209600,
      sqsManagedSseEnabled: true,
    });
    // The messages that wake chord-join at a chord's deadline (shared/src/chord/deadline.rs).
    this.deadlineQueue = new sqs.CfnQueue(this, "ChordDeadlineQueue", {
      visibilityTimeout: 720,
      messageRetentionPeriod: 1209600,
      sqsManagedSseEnabled: true,
      redrivePolicy: { deadLetterTargetArn: this.deadLetterQueue.attrArn, maxReceiveCount: 10 },
    });

    // Where callbacks (and the cache's processing messages) may be sent.
    const queues = Fn.conditionIf(
      hasQueueArns.logicalId,
      list("CallbackQueueArns"),
      `arn:${Aws.PARTITION}:sqs:${Aws.REGION}:${Aws.ACCOUNT_ID}:*`,
    );
    const sendToQueues = { Effect: "Allow", Action: ["sqs:SendMessage"], Resource: queues };
    // Queues encrypted with a customer managed KMS key need the key to send.
    const useQueueKeys = Fn.conditionIf(
      hasQueueKmsKeys.logicalId,
      { Effect: "Allow", Action: ["kms:GenerateDataKey", "kms:Decrypt"], Resource: list("CallbackQueueKmsKeyArns") },
      Aws.NO_VALUE,
    );
    const invokeCallbackLambda = Fn.conditionIf(
      isLambdaTarget.logicalId,
      { Effect: "Allow", Action: ["lambda:InvokeFunction"], Resource: str("CallbackLambdaFunctionArn") },
      Aws.NO_VALUE,
    );
    const onTable = (...actions: string[]) => ({ Effect: "Allow", Action: actions, Resource: this.table.attrArn });
    const onObjects = (...actions: string[]) => ({ Effect: "Allow", Action: actions, Resource: objects });

    const environment: Record<string, string> = {
      TABLE_NAME: this.table.ref,
      NAMESPACE: str("Namespace"),
      TENANTS: str("Tenants"),
      AUTH_MODE: str("AuthMode"),
      RESULT_TTL_SECONDS: str("ResultTtlSeconds"),
      MAX_WAIT_SECONDS: str("MaxWaitSeconds"),
      RUST_LOG: str("LogLevel"),
      CALLBACK_TARGET: str("CallbackTarget"),
      CALLBACK_QUEUES: str("CallbackQueues"),
      CALLBACK_QUEUE_URL_PREFIX: Token.asString(
        Fn.conditionIf(
          hasQueuePrefix.logicalId,
          str("CallbackQueueUrlPrefix"),
          `https://sqs.${Aws.REGION}.${Aws.URL_SUFFIX}/${Aws.ACCOUNT_ID}/`,
        ),
      ),
      CALLBACK_QUEUE_NAMES: str("CallbackQueueNames"),
      CALLBACK_QUEUE_URLS: str("CallbackQueueUrls"),
      CALLBACK_DEFAULT_QUEUE: str("CallbackDefaultQueue"),
      CALLBACK_LAMBDA_FUNCTION: str("CallbackLambdaFunctionArn"),
      CALLBACK_MAX_BYTES: str("CallbackMaxBytes"),
      RESULTS_BUCKET: this.bucket.ref,
      SPILL_ABOVE_BYTES: str("SpillAboveBytes"),
      MAX_RESULT_BYTES: str("MaxResultBytes"),
      PRESIGN_SECONDS: str("PresignSeconds"),
    };

    const specs: FunctionSpec[] = [
      {
        id: "StoreFunction",
        binary: "store",
        description:
          "PUT/DELETE task results, PUT/DELETE groups (one conditional write each); the processing cache's get-or-delegate",
        memorySize: 512,
        timeout: 29,
        statements: [
          onTable("dynamodb:PutItem", "dynamodb:DeleteItem"),
          onTable("dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem"),
          sendToQueues,
          useQueueKeys,
          invokeCallbackLambda,
          onObjects("s3:PutObject", "s3:PutObjectTagging", "s3:GetObject", "s3:DeleteObject"),
        ],
      },
      {
        id: "FetchFunction",
        binary: "fetch",
        description: "GET task results (long-poll), groups and chord status",
        memorySize: 256,
        timeout: 29,
        statements: [onTable("dynamodb:GetItem"), onObjects("s3:GetObject")],
      },
      {
        id: "BatchFetchFunction",
        binary: "batch-fetch",
        description: "POST batch-get (parallel BatchGetItem, long-poll)",
        memorySize: 512,
        timeout: 29,
        statements: [onTable("dynamodb:BatchGetItem"), onObjects("s3:GetObject")],
      },
      {
        id: "ChordJoinFunction",
        binary: "chord-join",
        description: "DynamoDB Streams consumer that joins chords and sends each callback once",
        memorySize: 1024,
        timeout: 120,
        environment: {
          CHORD_LEASE_SECONDS: "180",
          CHORD_MAX_ATTEMPTS: str("ChordMaxAttempts"),
          CHORD_DEADLINE_QUEUE_URL: this.deadlineQueue.ref,
        },
        statements: [
          onTable(
            "dynamodb:GetItem",
            "dynamodb:PutItem",
            "dynamodb:UpdateItem",
            "dynamodb:ConditionCheckItem",
            "dynamodb:Query",
            "dynamodb:BatchGetItem",
          ),
          onObjects("s3:GetObject", "s3:PutObject", "s3:PutObjectTagging", "s3:DeleteObject"),
          sendToQueues,
          useQueueKeys,
          invokeCallbackLambda,
          { Effect: "Allow", Action: ["sqs:SendMessage"], Resource: this.deadlineQueue.attrArn },
        ],
        managedPolicies: ["service-role/AWSLambdaSQSQueueExecutionRole", "service-role/AWSLambdaDynamoDBExecutionRole"],
        extraPolicies: [
          {
            name: "StreamSQSPolicy",
            statements: [{ Action: "sqs:SendMessage", Effect: "Allow", Resource: this.deadLetterQueue.attrArn }],
          },
        ],
      },
    ];

    const assetsDir = props.assetsDir ?? path.join(__dirname, "..", "..", "..", "..", "target", "lambda");
    const functions: Partial<Record<FunctionName, lambda.Function>> = {};
    for (const spec of specs) {
      const role = new iam.CfnRole(this, `${spec.id}Role`, {
        assumeRolePolicyDocument: {
          Version: "2012-10-17",
          Statement: [
            { Action: ["sts:AssumeRole"], Effect: "Allow", Principal: { Service: ["lambda.amazonaws.com"] } },
          ],
        },
        managedPolicyArns: [
          policyArn("service-role/AWSLambdaBasicExecutionRole"),
          Fn.conditionIf(isTracingOn.logicalId, policyArn("AWSXrayWriteOnlyAccess"), Aws.NO_VALUE).toString(),
          ...(spec.managedPolicies ?? []).map(policyArn),
        ],
        policies: [
          { policyName: `${spec.id}RolePolicy0`, policyDocument: { Statement: spec.statements } },
          ...(spec.extraPolicies ?? []).map((p) => ({
            policyName: `${spec.id}${p.name}`,
            policyDocument: { Statement: p.statements },
          })),
        ],
      });
      const fn = new lambda.Function(this, spec.id, {
        code: props.code?.[spec.binary] ?? defaultCode(assetsDir, spec.binary),
        handler: "bootstrap",
        runtime: lambda.Runtime.PROVIDED_AL2023,
        architecture: lambda.Architecture.custom(str("Architecture")),
        description: spec.description,
        memorySize: spec.memorySize,
        timeout: Duration.seconds(spec.timeout),
        role: iam.Role.fromRoleArn(this, `${spec.id}RoleRef`, role.attrArn, { mutable: false }),
        environment: { ...environment, ...(spec.environment ?? {}) },
        loggingFormat: lambda.LoggingFormat.JSON,
        applicationLogLevelV2: str("LogLevel") as lambda.ApplicationLogLevel,
        systemLogLevelV2: str("SystemLogLevel") as lambda.SystemLogLevel,
      });
      // Tracing is a setting (PassThrough or Active), so it is written as is; none when Disabled.
      const cfn = fn.node.defaultChild as lambda.CfnFunction;
      cfn.tracingConfig = Fn.conditionIf(isTracingOn.logicalId, { Mode: str("Tracing") }, Aws.NO_VALUE);
      if (spec.binary === "chord-join") {
        cfn.reservedConcurrentExecutions = Token.asNumber(
          Fn.conditionIf(
            hasChordJoinReservation.logicalId,
            num("ChordJoinReservedConcurrency"),
            Aws.NO_VALUE,
          ),
        );
      }
      functions[spec.binary] = fn;
    }
    this.functions = functions as Record<FunctionName, lambda.Function>;
    const fnOf: Record<string, lambda.Function> = {
      Store: this.functions.store,
      Fetch: this.functions.fetch,
      BatchFetch: this.functions["batch-fetch"],
      ChordJoin: this.functions["chord-join"],
    };

    // chord-join reads the table's stream: only ready chord parts and the
    // processing cache's tasks invoke it.
    new lambda.CfnEventSourceMapping(this, "ChordJoinFunctionStream", {
      batchSize: num("StreamBatchSize"),
      eventSourceArn: this.table.attrStreamArn,
      functionName: fnOf.ChordJoin.functionName,
      maximumBatchingWindowInSeconds: num("StreamBatchingWindowSeconds"),
      maximumRetryAttempts: num("StreamMaximumRetryAttempts"),
      bisectBatchOnFunctionError: true,
      maximumRecordAgeInSeconds: num("StreamMaximumRecordAgeSeconds"),
      destinationConfig: { onFailure: { destination: this.deadLetterQueue.attrArn } },
      startingPosition: "TRIM_HORIZON",
      functionResponseTypes: ["ReportBatchItemFailures"],
      filterCriteria: {
        filters: [
          {
            pattern:
              '{"eventName": ["INSERT", "MODIFY"], "dynamodb": {"NewImage": {"chord_size": {"N": [{"exists": true}]}, "status": {"S": ["SUCCESS", "FAILURE", "REVOKED"]}}}}',
          },
          {
            pattern:
              '{"eventName": ["INSERT", "MODIFY"], "dynamodb": {"NewImage": {"cache_key": {"S": [{"exists": true}]}}}}',
          },
          {
            pattern: '{"eventName": ["MODIFY"], "dynamodb": {"NewImage": {"sk": {"S": ["state"]}, "state": {"S": ["redriving"]}}}}',
          },
        ],
      },
    });

    // chord-join receives the messages that wake it at a chord's deadline.
    new lambda.CfnEventSourceMapping(this, "ChordJoinFunctionDeadlines", {
      batchSize: 10,
      eventSourceArn: this.deadlineQueue.attrArn,
      functionName: fnOf.ChordJoin.functionName,
      functionResponseTypes: ["ReportBatchItemFailures"],
    });

    // The HTTP API (FrontDoor HttpApi): a route per v1 endpoint,
    // IAM-authorized unless AuthMode is none.
    const onlyWithHttpApi = <T extends CfnResource>(resource: T): T => {
      resource.cfnOptions.condition = useHttpApi;
      return resource;
    };
    this.api = onlyWithHttpApi(
      new apigw.CfnApi(this, "HttpApi", {
        name: Aws.STACK_NAME,
        protocolType: "HTTP",
        description: "dynachord's v1 API",
      }),
    );
    // The function-URL front door (FrontDoor FunctionUrls): each HTTP
    // function's own URL, IAM-authorized; the functions route and check
    // every request themselves.
    const urls: Record<string, lambda.CfnUrl> = {};
    for (const name of ["Store", "Fetch", "BatchFetch"]) {
      urls[name] = new lambda.CfnUrl(this, `${name}FunctionUrl`, {
        targetFunctionArn: fnOf[name].functionArn,
        authType: "AWS_IAM",
        invokeMode: "BUFFERED",
      });
      urls[name].cfnOptions.condition = useFunctionUrls;
    }
    const accessLogs = onlyWithHttpApi(new logs.CfnLogGroup(this, "ApiAccessLogs", { retentionInDays: 30 }));
    onlyWithHttpApi(new apigw.CfnStage(this, "HttpApiStage", {
      apiId: this.api.ref,
      stageName: "$default",
      autoDeploy: true,
      defaultRouteSettings: {
        throttlingRateLimit: num("ApiThrottlingRateLimit"),
        throttlingBurstLimit: num("ApiThrottlingBurstLimit"),
      },
      accessLogSettings: {
        destinationArn: accessLogs.attrArn,
        format:
          '{"requestId":"$context.requestId","ip":"$context.identity.sourceIp", ' +
          '"caller":"$context.identity.caller","requestTime":"$context.requestTime", ' +
          '"routeKey":"$context.routeKey","status":"$context.status", ' +
          '"latencyMs":"$context.responseLatency","integrationError":"$context.integrationErrorMessage"}',
      },
    }));
    const integrations: Record<string, apigw.CfnIntegration> = {};
    for (const name of ["Store", "Fetch", "BatchFetch"]) {
      integrations[name] = onlyWithHttpApi(
        new apigw.CfnIntegration(this, `${name}Integration`, {
          apiId: this.api.ref,
          integrationType: "AWS_PROXY",
          integrationUri: fnOf[name].functionArn,
          payloadFormatVersion: "2.0",
          timeoutInMillis: 30000,
        }),
      );
      onlyWithHttpApi(
        new lambda.CfnPermission(this, `${name}ApiPermission`, {
          action: "lambda:InvokeFunction",
          functionName: fnOf[name].functionName,
          principal: "apigateway.amazonaws.com",
          sourceArn: `arn:${Aws.PARTITION}:execute-api:${Aws.REGION}:${Aws.ACCOUNT_ID}:${this.api.ref}/*`,
        }),
      );
    }
    for (const [name, method, route, fn] of ROUTES) {
      onlyWithHttpApi(
        new apigw.CfnRoute(this, `${name}Route`, {
          apiId: this.api.ref,
          routeKey: `${method} ${route}`,
          target: `integrations/${integrations[fn].ref}`,
          authorizationType: Token.asString(Fn.conditionIf(isIamAuth.logicalId, "AWS_IAM", "NONE")),
        }),
      );
    }

    this.alarms(hasAlarmTopic, str("AlarmTopicArn"), fnOf, useHttpApi, useFunctionUrls);

    new cloudwatch.CfnDashboard(this, "Dashboard", {
      dashboardName: `${Aws.STACK_NAME}-dynachord`,
      dashboardBody: Fn.sub(DASHBOARD_BODY, { ChordJoin: fnOf.ChordJoin.functionName }),
    });
    this.apiUrl = `https://${this.api.ref}.execute-api.${Aws.REGION}.${Aws.URL_SUFFIX}`;
    this.resultBackend = Token.asString(
      Fn.conditionIf(
        useHttpApi.logicalId,
        `dynachord+${this.apiUrl}`,
        Fn.sub("dynachord+${Store}?fetch=${Fetch}&batch_get=${BatchFetch}", {
          Store: urls.Store.attrFunctionUrl,
          Fetch: urls.Fetch.attrFunctionUrl,
          BatchFetch: urls.BatchFetch.attrFunctionUrl,
        }),
      ),
    );
    this.dashboardUrl = `https://${Aws.REGION}.console.aws.amazon.com/cloudwatch/home?region=${Aws.REGION}#dashboards:name=${Aws.STACK_NAME}-dynachord`;
  }

  /** The alarms: the join falling behind or failing, errors, throttling, 5xx. */
  private alarms(
    hasTopic: CfnCondition,
    topicArn: string,
    fnOf: Record<string, lambda.Function>,
    useHttpApi: CfnCondition,
    useFunctionUrls: CfnCondition,
  ): void {
    const actions = Fn.conditionIf(hasTopic.logicalId, [topicArn], Aws.NO_VALUE) as unknown as string[];
    const base = {
      treatMissingData: "notBreaching",
      comparisonOperator: "GreaterThanThreshold",
      alarmActions: actions,
    };
    const stat = (id: string, namespace: string, metricName: string, period: number, dims?: [string, string]) => ({
      id,
      returnData: false,
      metricStat: {
        stat: "Sum",
        period,
        metric: {
          namespace,
          metricName,
          ...(dims ? { dimensions: [{ name: dims[0], value: dims[1] }] } : {}),
        },
      },
    });
    const perFunction = (metricName: string) => [
      stat("store", "AWS/Lambda", metricName, 60, ["FunctionName", fnOf.Store.functionName]),
      stat("fetch", "AWS/Lambda", metricName, 60, ["FunctionName", fnOf.Fetch.functionName]),
      stat("batch", "AWS/Lambda", metricName, 60, ["FunctionName", fnOf.BatchFetch.functionName]),
      stat("join", "AWS/Lambda", metricName, 60, ["FunctionName", fnOf.ChordJoin.functionName]),
    ];
    const alarm = (id: string, props: Partial<cloudwatch.CfnAlarmProps>, only?: CfnCondition) => {
      const resource = new cloudwatch.CfnAlarm(this, id, {
        ...base,
        evaluationPeriods: 1,
        threshold: 0,
        ...props,
      } as cloudwatch.CfnAlarmProps);
      // The validator reads AlarmActions as [""] with the default AlarmTopicArn;
      // HasAlarmTopic makes it NoValue then.
      Validations.of(resource).acknowledge({
        id: "CloudFormation-Validate::W1030",
        reason: "AlarmActions is NoValue unless AlarmTopicArn is set",
      });
      if (only) resource.cfnOptions.condition = only;
    };

    alarm("ChordJoinIteratorAgeAlarm", {
      alarmDescription: "chord-join is more than 5 minutes behind the table's stream",
      namespace: "AWS/Lambda",
      metricName: "IteratorAge",
      dimensions: [{ name: "FunctionName", value: fnOf.ChordJoin.functionName }],
      statistic: "Maximum",
      period: 60,
      evaluationPeriods: 5,
      threshold: 300000,
    });
    alarm("DeadLetterQueueAlarm", {
      alarmDescription: "Chord stream records were given up on (dead-letter queue is not empty)",
      namespace: "AWS/SQS",
      metricName: "ApproximateNumberOfMessagesVisible",
      dimensions: [{ name: "QueueName", value: this.deadLetterQueue.attrQueueName }],
      statistic: "Maximum",
      period: 60,
    });
    alarm("FunctionErrorsAlarm", {
      alarmDescription: "A dynachord function failed invocations (crashes, timeouts)",
      metrics: [
        { id: "errors", expression: "SUM([store, fetch, batch, join])", returnData: true },
        ...perFunction("Errors"),
      ],
    });
    alarm("FunctionThrottlesAlarm", {
      alarmDescription: "Lambda throttled dynachord functions (account or reserved concurrency reached)",
      metrics: [
        { id: "throttles", expression: "SUM([store, fetch, batch, join])", returnData: true },
        ...perFunction("Throttles"),
      ],
    });
    alarm("TableThrottlesAlarm", {
      alarmDescription:
        "DynamoDB throttled requests on the results table for 5 minutes (clients get 503 when retries run out): raise capacity or enable auto scaling",
      metrics: [
        { id: "throttled", expression: "reads + writes", returnData: true },
        stat("reads", "AWS/DynamoDB", "ReadThrottleEvents", 60, ["TableName", this.table.ref]),
        stat("writes", "AWS/DynamoDB", "WriteThrottleEvents", 60, ["TableName", this.table.ref]),
      ],
      evaluationPeriods: 5,
    });
    alarm("Api5xxAlarm", {
      alarmDescription: "The API answered more than 1% 5xx over 5 minutes",
      metrics: [
        { id: "rate", expression: "IF(requests > 0, 100 * errors / requests, 0)", returnData: true },
        stat("errors", "AWS/ApiGateway", "5xx", 300, ["ApiId", this.api.ref]),
        stat("requests", "AWS/ApiGateway", "Count", 300, ["ApiId", this.api.ref]),
      ],
      threshold: 1,
    }, useHttpApi);
    const urlFunctions: [string, lambda.Function][] = [["1", fnOf.Store], ["2", fnOf.Fetch], ["3", fnOf.BatchFetch]];
    alarm(
      "FunctionUrl5xxAlarm",
      {
        alarmDescription: "The function URLs answered more than 1% 5xx over 5 minutes",
        metrics: [
          {
            id: "rate",
            expression: "IF((r1 + r2 + r3) > 0, 100 * (e1 + e2 + e3) / (r1 + r2 + r3), 0)",
            returnData: true,
          },
          ...urlFunctions.map(([n, fn]) => stat(`e${n}`, "AWS/Lambda", "Url5xxCount", 300, ["FunctionName", fn.functionName])),
          ...urlFunctions.map(([n, fn]) => stat(`r${n}`, "AWS/Lambda", "UrlRequestCount", 300, ["FunctionName", fn.functionName])),
        ],
        threshold: 1,
      },
      useFunctionUrls,
    );
    // On the functions' own metrics (Embedded Metric Format, namespace dynachord).
    alarm("ChordFailuresAlarm", {
      alarmDescription:
        "Chords failed (ChordError stored on their callbacks): a part failed, a queue refused the callback, or joins ran out of attempts; the reason is in GET /v1/chords/{id} and chord-join's log",
      namespace: "dynachord",
      metricName: "ChordFailed",
      statistic: "Sum",
      period: 300,
    });
    alarm("ChordJoinsStuckAlarm", {
      alarmDescription:
        "Complete chords keep failing to join (given back and retried) for 15 minutes: their callbacks are late; each fails after ChordMaxAttempts",
      namespace: "dynachord",
      metricName: "ChordJoinRetried",
      statistic: "Sum",
      period: 300,
      evaluationPeriods: 3,
    });
    alarm("ChordSentOnceAtRiskAlarm", {
      alarmDescription:
        "chord-join lost a claim or could not mark a sent callback (ChordClaimLost, ChordMarkLost, ChordMarkFailed): look at chord-join's log for the chord",
      metrics: [
        { id: "risk", expression: "lost + marklost + markfailed", returnData: true },
        stat("lost", "dynachord", "ChordClaimLost", 300),
        stat("marklost", "dynachord", "ChordMarkLost", 300),
        stat("markfailed", "dynachord", "ChordMarkFailed", 300),
      ],
    });
    alarm("MessagesMayBeLostAlarm", {
      alarmDescription:
        "A callback, errback or cache message may not have arrived: its send's outcome was unknown, or a claim taken over died mid-send, and it is never sent twice (SendOutcomeUnknown, ChordResendSkipped, CacheResendSkipped): chord-join's log names the chord or cache entry, and the task when it is known",
      metrics: [
        { id: "risk", expression: "FILL(unknown, 0) + FILL(chordskip, 0) + FILL(cacheskip, 0)", returnData: true },
        stat("unknown", "dynachord", "SendOutcomeUnknown", 300),
        stat("chordskip", "dynachord", "ChordResendSkipped", 300),
        stat("cacheskip", "dynachord", "CacheResendSkipped", 300),
      ],
    });
    alarm("RequestsThrottledAlarm", {
      alarmDescription:
        "Requests answered 503 throttled after the service's DynamoDB retries ran out, for 5 minutes: raise the table's capacity",
      metrics: [
        { id: "throttled", expression: "puts + gets + batches + uploads", returnData: true },
        stat("puts", "dynachord", "Throttled", 60, ["Route", "PutTask"]),
        stat("gets", "dynachord", "Throttled", 60, ["Route", "GetTask"]),
        stat("batches", "dynachord", "Throttled", 60, ["Route", "BatchGet"]),
        stat("uploads", "dynachord", "Throttled", 60, ["Route", "UploadTask"]),
      ],
      evaluationPeriods: 5,
    });
  }
}

