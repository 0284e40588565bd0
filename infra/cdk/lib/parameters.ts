// The stack's parameters: the same names, types, defaults and constraints as
// infra/template.yaml's (tests/infra/test_cdk.py compares them).

export interface ParameterSpec {
  readonly type: "String" | "Number" | "CommaDelimitedList";
  readonly default: string | number;
  readonly description: string;
  readonly allowedValues?: string[];
  readonly allowedPattern?: string;
  readonly minValue?: number;
  readonly maxValue?: number;
}

export const PARAMETERS = {
  TableName: {
    type: "String",
    default: "dynachord-results",
    allowedPattern: "[a-zA-Z0-9_.-]{3,255}",
    description: "Name of the DynamoDB table holding results, groups and chords.",
  },
  BillingMode: {
    type: "String",
    default: "PROVISIONED",
    allowedValues: ["PROVISIONED", "PAY_PER_REQUEST"],
    description: "PROVISIONED (capacity below, cheapest for steady load) or PAY_PER_REQUEST (no capacity planning, best for spiky or low load).",
  },
  ReadCapacityUnits: {
    type: "Number",
    default: 5,
    minValue: 1,
    description: "Provisioned reads per second (PROVISIONED only). A consistent read of a result up to 4 KB is 1 RCU; a batch-get of 100 results is up to 100 RCU.",
  },
  WriteCapacityUnits: {
    type: "Number",
    default: 5,
    minValue: 1,
    description: "Provisioned writes per second (PROVISIONED only). Storing a result under 1 KB is 1 WCU; a chord part costs about 2 more WCU (transactional part item).",
  },
  EnableAutoScaling: {
    type: "String",
    default: "false",
    allowedValues: ["true", "false"],
    description: "Scale read and write capacity with load (PROVISIONED only).",
  },
  AutoScalingMinCapacity: {
    type: "Number",
    default: 5,
    minValue: 1,
    description: "Lowest read and write capacity auto scaling may set.",
  },
  AutoScalingMaxCapacity: {
    type: "Number",
    default: 100,
    minValue: 1,
    description: "Highest read and write capacity auto scaling may set.",
  },
  AutoScalingTargetUtilization: {
    type: "Number",
    default: 70,
    minValue: 20,
    maxValue: 90,
    description: "Target consumed/provisioned capacity in percent.",
  },
  DeletionProtection: {
    type: "String",
    default: "false",
    allowedValues: ["true", "false"],
    description: "Refuse to delete the table (also when the stack is deleted).",
  },
  FrontDoor: {
    type: "String",
    default: "HttpApi",
    allowedValues: ["HttpApi", "FunctionUrls"],
    description: "How callers reach the functions. HttpApi (the default): one API Gateway HTTP API in front of them ($1.00 a million requests), with its throttling (ApiThrottling*), access log and 5xx alarm. FunctionUrls: the store, fetch and batch-fetch functions' own Lambda function URLs, IAM-authorized (AuthMode must be iam; no charge per request); callers need lambda:InvokeFunctionUrl and lambda:InvokeFunction on the three functions, and throttling is the functions' concurrency. Either way the ResultBackend output is the one string the Python package takes (docs/DEPLOY.md, \"Front doors\").",
  },
  AuthMode: {
    type: "String",
    default: "iam",
    allowedValues: ["iam", "none"],
    description: "iam (default): every route requires SigV4-signed requests (API Gateway IAM authorization) and the functions refuse requests without that identity. none: open API, for private test stacks only.",
  },
  Namespace: {
    type: "String",
    default: "default",
    allowedPattern: "[a-z0-9-]{1,63}",
    description: "Key prefix of every caller's results when Tenants is empty (one tenant).",
  },
  Tenants: {
    type: "String",
    default: "",
    description: "Empty (default): one tenant, Namespace. Else a JSON object from caller (IAM user or role-session ARN, assumed-role ARN without the session, account id, or \"*\") to namespace; each caller's results are kept apart by namespace, taken from its IAM identity, and a caller not in the map gets 403.",
  },
  ResultTtlSeconds: {
    type: "Number",
    default: 86400,
    minValue: 1,
    maxValue: 31536000,
    description: "How long results live (Celery's result_expires; one day).",
  },
  MaxWaitSeconds: {
    type: "Number",
    default: 20,
    minValue: 0,
    maxValue: 25,
    description: "Longest long-poll wait; kept under the API's 30 s integration timeout.",
  },
  LogLevel: {
    type: "String",
    default: "INFO",
    allowedValues: ["TRACE", "DEBUG", "INFO"],
    description: "Application log level of the functions (JSON logs). INFO writes, for a healthy request, its metrics line alone. No level above INFO: the metrics lines (Embedded Metric Format) carry no level, Lambda files them as INFO, and a WARN filter would drop every metric.",
  },
  SystemLogLevel: {
    type: "String",
    default: "WARN",
    allowedValues: ["DEBUG", "INFO", "WARN"],
    description: "Lambda's own log lines for the functions (JSON). WARN (the default) writes no START, END or REPORT line per invocation (Lambda's Duration, Errors and Throttles metrics are kept either way); INFO writes them, about 300 bytes more per invocation (docs/COST.md).",
  },
  Architecture: {
    type: "String",
    default: "arm64",
    allowedValues: ["arm64", "x86_64"],
    description: "Lambda architecture (arm64 is about 20% cheaper per GB-second).",
  },
  Tracing: {
    type: "String",
    default: "Disabled",
    allowedValues: ["Disabled", "PassThrough", "Active"],
    description: "X-Ray tracing of the functions. Disabled (the default) sets no tracing mode and grants no X-Ray permission; PassThrough and Active grant the functions X-Ray write access, and Active traces every invocation (billed per trace). Every log line carries the invocation's trace id (xrayTraceId) either way.",
  },
  ApiThrottlingRateLimit: {
    type: "Number",
    default: 1000,
    minValue: 1,
    description: "Steady requests per second the API stage admits.",
  },
  ApiThrottlingBurstLimit: {
    type: "Number",
    default: 2000,
    minValue: 1,
    description: "Burst of requests the API stage admits.",
  },
  StreamBatchSize: {
    type: "Number",
    default: 100,
    minValue: 1,
    maxValue: 1000,
    description: "Stream records per chord-join invocation.",
  },
  StreamBatchingWindowSeconds: {
    type: "Number",
    default: 0,
    minValue: 0,
    maxValue: 300,
    description: "How long to gather records before invoking chord-join (0 for lowest latency).",
  },
  StreamMaximumRetryAttempts: {
    type: "Number",
    default: 1000,
    minValue: 0,
    maxValue: 10000,
    description: "Retries of a failing batch before it goes to the dead-letter queue. High, because a chord busy with another invocation is retried until that invocation finishes or its claim's lease (180 s) runs out; a chord that keeps failing is failed after ChordMaxAttempts joins, so it never uses these up.",
  },
  StreamMaximumRecordAgeSeconds: {
    type: "Number",
    default: 86400,
    minValue: 60,
    maxValue: 604800,
    description: "Oldest record chord-join still processes before sending it to the dead-letter queue.",
  },
  CallbackTarget: {
    type: "String",
    default: "sqs",
    allowedValues: ["sqs", "lambda"],
    description: "Where chord callbacks go.",
  },
  CallbackQueues: {
    type: "String",
    default: "",
    description: "Which queues each tenant's chord callbacks may use: a JSON object from namespace to {queue name: queue URL}, where a name ending in * is a prefix whose URL the queue name (as kombu spells it) is appended to. A store whose callback names another queue is refused (400 callback_not_allowed). Required when Tenants names two or more namespaces (with the sqs target); empty: every caller uses CallbackQueueUrls and CallbackQueueUrlPrefix.",
  },
  ChordMaxAttempts: {
    type: "Number",
    default: 8,
    minValue: 1,
    maxValue: 100,
    description: "Joins of one chord that may fail with an error a retry might fix (throttling, a 5xx) before the chord is failed with ChordError.",
  },
  ChordJoinReservedConcurrency: {
    type: "Number",
    default: 5,
    minValue: 0,
    maxValue: 1000,
    description: "Concurrent executions reserved for chord-join, so that long-polls and other requests cannot take every Lambda slot of the account from the join (a stream shard runs one invocation at a time; 5 covers a table of several shards). 0 reserves none (for accounts whose concurrency limit leaves no room for a reservation).",
  },
  CallbackQueueUrlPrefix: {
    type: "String",
    default: "",
    description: "SQS URL prefix the callback's queue name is appended to, as kombu spells it, e.g. https://sqs.eu-west-1.amazonaws.com/123456789012/ (empty: this account and region).",
  },
  CallbackQueueNames: {
    type: "String",
    default: "",
    description: "Queue names the callbacks, errbacks and processings of a single-tenant stack may use with CallbackQueueUrlPrefix, comma-separated: exact names, prefixes ending in * (proj-*), or * for every queue of the prefix. Empty: CallbackDefaultQueue alone, so a fresh stack lets no caller put a task on any other queue. A stack with Tenants names its queues in CallbackQueues instead.",
  },
  CallbackQueueUrls: {
    type: "String",
    default: "",
    description: "Explicit queue map, name=url,name=url (wins over the prefix).",
  },
  CallbackDefaultQueue: {
    type: "String",
    default: "celery",
    description: "Queue of callbacks that name none (Celery's task_default_queue).",
  },
  CallbackQueueArns: {
    type: "CommaDelimitedList",
    default: "",
    description: "ARNs of the queues chord-join may send to (least privilege): list the queues of CallbackQueues here. Empty: every queue in this account and region (single-tenant stacks only; a stack with Tenants must list them).",
  },
  CallbackQueueKmsKeyArns: {
    type: "CommaDelimitedList",
    default: "",
    description: "ARNs of the customer managed KMS keys that encrypt callback queues, if any: the store and chord-join may use them to send (kms:GenerateDataKey, kms:Decrypt). Empty: the queues use SQS's own encryption or none.",
  },
  CallbackLambdaFunctionArn: {
    type: "String",
    default: "",
    description: "Function invoked with joined chords when CallbackTarget is lambda.",
  },
  AlarmTopicArn: {
    type: "String",
    default: "",
    description: "SNS topic that alarms notify (empty: alarms without actions).",
  },
  SpillAboveBytes: {
    type: "Number",
    default: 65536,
    minValue: 1024,
    maxValue: 399360,
    description: "A result whose compressed size passes this goes to the results bucket; its DynamoDB item keeps a pointer (DynamoDB bills writes per KB, S3 per request).",
  },
  MaxResultBytes: {
    type: "Number",
    default: 536870912,
    minValue: 1024,
    maxValue: 5368709120,
    description: "Largest result (its JSON, uncompressed) a worker may upload through a presigned URL (512 MiB, Redis's largest value).",
  },
  CallbackMaxBytes: {
    type: "Number",
    default: 1048576,
    minValue: 1024,
    maxValue: 1048576,
    description: "Largest chord callback message (SQS's and Lambda's asynchronous payload limit, 1 MiB); a callback whose results would pass it carries a reference to them instead.",
  },
  PresignSeconds: {
    type: "Number",
    default: 900,
    minValue: 60,
    maxValue: 43200,
    description: "How long the presigned URLs of large results are valid.",
  },
} satisfies Record<string, ParameterSpec>;

export type ParameterName = keyof typeof PARAMETERS;

/** The console's parameter groups, as the SAM template lays them out. */
export const PARAMETER_GROUPS: { label: string; parameters: ParameterName[] }[] = [
  { label: "Table", parameters: ["TableName", "BillingMode", "ReadCapacityUnits", "WriteCapacityUnits", "EnableAutoScaling", "AutoScalingMinCapacity", "AutoScalingMaxCapacity", "AutoScalingTargetUtilization", "DeletionProtection"] },
  { label: "Service", parameters: ["FrontDoor", "AuthMode", "Namespace", "Tenants", "ResultTtlSeconds", "MaxWaitSeconds", "LogLevel", "SystemLogLevel", "Architecture", "ApiThrottlingRateLimit", "ApiThrottlingBurstLimit", "Tracing"] },
  { label: "Chords", parameters: ["StreamBatchSize", "StreamBatchingWindowSeconds", "StreamMaximumRetryAttempts", "StreamMaximumRecordAgeSeconds", "CallbackTarget", "CallbackQueues", "CallbackQueueUrlPrefix", "CallbackQueueNames", "CallbackQueueUrls", "CallbackDefaultQueue", "CallbackQueueArns", "CallbackLambdaFunctionArn", "ChordMaxAttempts", "ChordJoinReservedConcurrency", "CallbackQueueKmsKeyArns"] },
  { label: "Large results", parameters: ["SpillAboveBytes", "MaxResultBytes", "CallbackMaxBytes", "PresignSeconds"] },
  { label: "Alarms", parameters: ["AlarmTopicArn"] },
];
