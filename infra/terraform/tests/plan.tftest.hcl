# Plan-level tests with a mocked AWS provider: `terraform test` in
# infra/terraform runs them offline (no AWS account, no credentials), once the
# provider plugins are installed by `terraform init -backend=false`. They are
# not part of scripts/check-infra.sh, which must work without Terraform.

mock_provider "aws" {
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_availability_zones" {
    defaults = { names = ["us-east-1a", "us-east-1b"] }
  }
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{}" }
  }

  # Attributes the configuration builds on must look like the real thing.
  mock_resource "aws_lambda_alias" {
    defaults = { arn = "arn:aws:lambda:us-east-1:123456789012:function:tally-batch:live" }
  }
  mock_resource "aws_lambda_function" {
    defaults = { arn = "arn:aws:lambda:us-east-1:123456789012:function:tally-fn" }
  }
  mock_resource "aws_kinesis_stream" {
    defaults = { arn = "arn:aws:kinesis:us-east-1:123456789012:stream/tally-events" }
  }
  mock_resource "aws_apigatewayv2_api" {
    defaults = { id = "abc123", execution_arn = "arn:aws:execute-api:us-east-1:123456789012:abc123" }
  }
  mock_resource "aws_sns_topic" {
    defaults = { arn = "arn:aws:sns:us-east-1:123456789012:tally-alarms" }
  }
  mock_resource "aws_kms_key" {
    defaults = { arn = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-0000-0000-000000000000" }
  }
  mock_resource "aws_sqs_queue" {
    defaults = { arn = "arn:aws:sqs:us-east-1:123456789012:tally-queue" }
  }
  mock_resource "aws_iam_role" {
    defaults = { arn = "arn:aws:iam::123456789012:role/tally-role" }
  }
  mock_resource "aws_cloudwatch_log_group" {
    defaults = { arn = "arn:aws:logs:us-east-1:123456789012:log-group:tally" }
  }
  mock_resource "aws_s3_bucket" {
    defaults = { arn = "arn:aws:s3:::tally-lake" }
  }
  mock_resource "aws_secretsmanager_secret" {
    defaults = { arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:tally-redis" }
  }
  mock_resource "aws_cloudwatch_metric_alarm" {
    defaults = { arn = "arn:aws:cloudwatch:us-east-1:123456789012:alarm:tally" }
  }
  mock_resource "aws_sfn_state_machine" {
    defaults = { arn = "arn:aws:states:us-east-1:123456789012:stateMachine:tally-batch" }
  }
}

variables {
  jwt_issuer         = "https://issuer.example.com/"
  jwt_audience       = ["tally"]
  jwks_url           = "https://issuer.example.com/.well-known/jwks.json"
  enable_nat_gateway = true
  # Any tally.zip will do for a plan.
  lambda_dist_dir = "./tests/fixtures"
}

run "defaults" {
  command = apply

  assert {
    condition     = length(aws_nat_gateway.main) == 2 && length(aws_subnet.private) == 2
    error_message = "one private subnet and one NAT gateway per zone"
  }
  assert {
    condition     = alltrue([for k, f in aws_lambda_function.fn : f.handler == k && f.runtime == "provided.al2023" && f.architectures == tolist(["arm64"])])
    error_message = "each function's handler is its name, on provided.al2023 arm64"
  }
  assert {
    condition = alltrue([
      for f in aws_lambda_function.fn :
      f.filename == null && f.s3_bucket == aws_s3_object.lambda_code.bucket && f.s3_key == aws_s3_object.lambda_code.key && f.s3_object_version == aws_s3_object.lambda_code.version_id && f.source_code_hash == filebase64sha256("./tests/fixtures/tally.zip")
    ])
    error_message = "all four functions take their code from the one package object in the artifacts bucket, at its current version"
  }
  assert {
    condition     = aws_s3_object.lambda_code.bucket == aws_s3_bucket.artifacts.id && aws_s3_object.lambda_code.source == "./tests/fixtures/tally.zip" && aws_s3_object.lambda_code.source_hash == filebase64sha256("./tests/fixtures/tally.zip") && aws_s3_object.lambda_code.kms_key_id == aws_kms_key.data.arn
    error_message = "the package is uploaded from lambda_dist_dir, re-uploaded when its hash changes, under the data key"
  }
  assert {
    condition     = aws_s3_bucket_versioning.artifacts.versioning_configuration[0].status == "Enabled"
    error_message = "the artifacts bucket is versioned (s3_object_version refers to it)"
  }
  assert {
    condition     = aws_lambda_function.fn["api"].environment[0].variables["TALLY_JWKS"] == var.jwks_url && !contains(keys(aws_lambda_function.fn["archiver"].environment[0].variables), "TALLY_REDIS_URL")
    error_message = "environment per function"
  }
  assert {
    condition = alltrue([
      for k in ["speed", "batch", "api"] :
      aws_lambda_function.fn[k].environment[0].variables["TALLY_SPEED_REBUILD_SETTLE_SECS"] == "90" && aws_lambda_function.fn[k].environment[0].variables["TALLY_SPEED_TTL_HOURS"] == "48" && startswith(aws_lambda_function.fn[k].environment[0].variables["TALLY_REDIS_URL"], "rediss://")
    ])
    error_message = "speed, batch and api share one Redis configuration; the settle time defaults to the archiver's batching window + 30 s"
  }
  assert {
    condition     = aws_elasticache_replication_group.redis.cluster_mode == "enabled" && aws_elasticache_replication_group.redis.num_node_groups == 3 && aws_elasticache_replication_group.redis.replicas_per_node_group == 1 && aws_elasticache_replication_group.redis.automatic_failover_enabled && aws_elasticache_replication_group.redis.multi_az_enabled && one([for p in aws_elasticache_parameter_group.redis.parameter : p.value if p.name == "cluster-enabled"]) == "yes" && one([for p in aws_elasticache_parameter_group.redis.parameter : p.value if p.name == "maxmemory-policy"]) == "noeviction"
    error_message = "Redis by default in cluster mode (issue #17): 3 shards of a primary and a replica with failover, Multi-AZ, a cluster-enabled parameter group that never evicts"
  }
  assert {
    condition     = aws_lambda_function.fn["api"].environment[0].variables["TALLY_REDIS_URL"] == "rediss://${aws_elasticache_replication_group.redis.configuration_endpoint_address}:6379" && output.redis_endpoint == aws_elasticache_replication_group.redis.configuration_endpoint_address && length(aws_cloudwatch_metric_alarm.redis_memory) == 6 && contains(keys(aws_cloudwatch_metric_alarm.redis_memory), "tally-speed-0003-002")
    error_message = "by default the functions connect to the cluster's configuration endpoint; a memory alarm per node (<group>-<shard>-<node>)"
  }
  assert {
    condition     = aws_apigatewayv2_route.settings.route_key == "PUT /v1/merchants/{merchant_id}/settings" && aws_apigatewayv2_route.settings.authorization_type == "JWT" && aws_apigatewayv2_route.settings.authorizer_id == aws_apigatewayv2_authorizer.jwt.id && aws_apigatewayv2_route.settings.target == aws_apigatewayv2_route.metrics.target
    error_message = "the settings route goes to the api function behind the JWT authorizer, like the metrics route"
  }
  assert {
    condition     = jsondecode(aws_scheduler_schedule.speed_rebuild.target[0].input) == { speed_rebuild = true } && aws_scheduler_schedule.speed_rebuild.schedule_expression == "rate(1 minute)" && aws_scheduler_schedule.speed_rebuild.target[0].arn == aws_lambda_alias.live["batch"].arn
    error_message = "the every-minute speed-view check invokes the batch function's live alias with {\"speed_rebuild\": true}"
  }
  assert {
    condition     = alltrue([for m in aws_lambda_event_source_mapping.stream : m.function_response_types == toset(["ReportBatchItemFailures"]) && m.bisect_batch_on_function_error && m.maximum_retry_attempts == 10 && m.parallelization_factor == 1])
    error_message = "event source mappings: partial batch responses, bisect, bounded retries, one batch per shard"
  }
  assert {
    condition     = jsondecode(aws_sfn_state_machine.batch.definition).States.HourParts.MaxConcurrency == 40 && jsondecode(aws_sfn_state_machine.batch.definition).States.DayParts.MaxConcurrency == 40 && jsondecode(aws_sfn_state_machine.batch.definition).States.HourParts.ItemProcessor.ProcessorConfig.Mode == "DISTRIBUTED" && jsondecode(aws_sfn_state_machine.batch.definition).States.HourParts.ItemProcessor.ProcessorConfig.ExecutionType == "STANDARD"
    error_message = "the parts are a distributed map of standard children with the configured concurrency"
  }
  assert {
    condition     = jsondecode(aws_sfn_state_machine.batch.definition).States.HourParts.ItemReader.Resource == "arn:aws:states:::s3:getObject" && jsondecode(aws_sfn_state_machine.batch.definition).States.DayParts.ItemReader.ReaderConfig.InputType == "JSON" && jsondecode(aws_sfn_state_machine.batch.definition).States.DayParts.ToleratedFailurePercentage == 0
    error_message = "the parts map reads the plan's JSON item list from S3 and tolerates no failed part"
  }
  assert {
    condition     = jsondecode(aws_sfn_state_machine.batch.definition).States.Plan.Arguments.FunctionName == aws_lambda_alias.live["batch"].arn && jsondecode(aws_sfn_state_machine.batch.definition).States.Publish.Arguments.Payload.step == "publish" && jsondecode(aws_sfn_state_machine.batch.definition).States.Publish.Catch[0].ErrorEquals[0] == "Conflict" && jsondecode(aws_sfn_state_machine.batch.definition).States.Publish.Catch[0].Next == "Replan"
    error_message = "every step invokes the batch function's live alias; a Conflict on publish replans"
  }
  assert {
    condition     = jsondecode(aws_sfn_state_machine.batch.definition).States.Compact.MaxConcurrency == 8 && jsondecode(aws_sfn_state_machine.batch.definition).States.Compact.ToleratedFailurePercentage == 100 && jsondecode(aws_sfn_state_machine.batch.definition).States.Compact.Catch[0].Next == "Done"
    error_message = "compaction never fails a run"
  }
  assert {
    condition     = aws_scheduler_schedule.batch_hourly.target[0].arn == aws_sfn_state_machine.batch.arn && jsondecode(aws_scheduler_schedule.batch_hourly.target[0].input) == {} && aws_scheduler_schedule.batch_hourly.target[0].dead_letter_config[0].arn == aws_sqs_queue.batch_dlq.arn
    error_message = "the hourly schedule starts the batch state machine with {}, failures to start go to the dead-letter queue"
  }
  assert {
    condition     = one([for r in aws_s3_bucket_lifecycle_configuration.lake.rule : r.expiration[0].days if r.id == "expire-batch-staging"]) == 7
    error_message = "the lake's batch staging area expires after a week"
  }
  assert {
    condition     = aws_cloudwatch_metric_alarm.batch_run_failed.dimensions["StateMachineArn"] == aws_sfn_state_machine.batch.arn
    error_message = "failed batch runs alarm"
  }
  assert {
    condition     = length(aws_codedeploy_deployment_group.fn) == 4 && aws_codedeploy_deployment_group.fn["api"].deployment_config_name == "CodeDeployDefault.LambdaLinear10PercentEvery1Minute"
    error_message = "a deployment group per function, linear for api"
  }
}

run "provisioned_without_nat" {
  command = plan

  variables {
    enable_nat_gateway          = false
    kinesis_stream_mode         = "PROVISIONED"
    kinesis_shard_count         = 8
    jwks_url                    = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_example/.well-known/jwks.json"
    interface_endpoint_services = ["secretsmanager", "kinesis-streams", "logs", "cognito-idp"]
  }

  assert {
    condition     = aws_kinesis_stream.events.shard_count == 8 && length(aws_nat_gateway.main) == 0
    error_message = "provisioned shards, no NAT"
  }
}

run "unreachable_jwks_is_reported" {
  command = plan

  variables {
    enable_nat_gateway = false
  }

  expect_failures = [check.jwks_reachable]
}

run "batch_timeout_covers_the_speed_rebuild" {
  command = plan

  variables {
    speed_rebuild_settle_seconds = 300
    lambda_timeout_seconds       = { speed = 60, archiver = 300, batch = 300, api = 15 }
  }

  expect_failures = [aws_lambda_function.fn]
}

run "parts_concurrency_within_the_batch_reserved_concurrency" {
  command = plan

  variables {
    batch_parts_max_concurrency = 49
  }

  expect_failures = [aws_sfn_state_machine.batch]
}

run "missing_package_is_reported" {
  command = plan

  variables {
    lambda_dist_dir = "./tests/no-such-dir"
  }

  expect_failures = [aws_s3_object.lambda_code]
}

run "bad_zones_are_refused" {
  command = plan

  variables {
    availability_zones = ["us-east-1a"]
  }

  expect_failures = [var.availability_zones]
}

run "redis_single_shard" {
  command = apply

  variables {
    redis_cluster_mode = false
  }

  assert {
    condition     = aws_elasticache_replication_group.redis.cluster_mode == "disabled" && aws_elasticache_replication_group.redis.num_cache_clusters == 2 && aws_elasticache_replication_group.redis.automatic_failover_enabled && aws_elasticache_replication_group.redis.multi_az_enabled && aws_elasticache_parameter_group.redis.name == "tally-redis7" && length([for p in aws_elasticache_parameter_group.redis.parameter : p if p.name == "cluster-enabled"]) == 0 && one([for p in aws_elasticache_parameter_group.redis.parameter : p.value if p.name == "maxmemory-policy"]) == "noeviction"
    error_message = "Redis with cluster mode off: a primary and a replica with failover, Multi-AZ, a parameter group that never evicts"
  }
  assert {
    condition     = aws_lambda_function.fn["api"].environment[0].variables["TALLY_REDIS_URL"] == "rediss://${aws_elasticache_replication_group.redis.primary_endpoint_address}:6379" && output.redis_endpoint == aws_elasticache_replication_group.redis.primary_endpoint_address && length(aws_cloudwatch_metric_alarm.redis_memory) == 2 && contains(keys(aws_cloudwatch_metric_alarm.redis_memory), "tally-speed-002")
    error_message = "with cluster mode off the functions connect to the primary endpoint; a memory alarm per node (<group>-001, <group>-002)"
  }
}
