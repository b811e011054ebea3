output "api_url" {
  description = "Base URL of the HTTP API (GET <api_url>/v1/merchants/{merchant_id}/metrics, PUT <api_url>/v1/merchants/{merchant_id}/settings)."
  value       = aws_apigatewayv2_stage.default.invoke_url
}

output "kinesis_stream_name" {
  description = "Stream producers PutRecords to (partition key = merchant_id); TALLY_KINESIS_STREAM for `tally gen --kinesis`."
  value       = aws_kinesis_stream.events.name
}

output "kinesis_stream_arn" {
  description = "ARN of the event stream."
  value       = aws_kinesis_stream.events.arn
}

output "lake_bucket" {
  description = "The lake bucket."
  value       = aws_s3_bucket.lake.bucket
}

output "lake_uri" {
  description = "TALLY_LAKE for `tally sql`, `tally batch reprocess --dry-run` and any Delta reader."
  value       = local.lake_uri
}

output "access_log_bucket" {
  description = "Bucket receiving the S3 server access logs of the lake and artifacts buckets."
  value       = aws_s3_bucket.access_logs.bucket
}

output "artifacts_bucket" {
  description = "Bucket holding the functions' code package (uploaded by Terraform from dist/lambda/tally.zip)."
  value       = aws_s3_bucket.artifacts.bucket
}

output "lambda_code" {
  description = "Where the four functions' code comes from: S3 URI and object version of the package, and its base64 SHA-256 (= each function's CodeSha256)."
  value = {
    uri     = "s3://${aws_s3_object.lambda_code.bucket}/${aws_s3_object.lambda_code.key}"
    version = aws_s3_object.lambda_code.version_id
    sha256  = local.lambda_zip_sha256
  }
}

output "redis_endpoint" {
  description = "Endpoint of Redis the functions connect to (TLS, port 6379; TALLY_REDIS_URL is rediss://<it>:6379): the primary endpoint of the replication group, which follows failover, or with redis_cluster_mode the cluster's configuration endpoint, from which clients learn the shards and follow failovers."
  value       = local.redis_endpoint_address
}

output "redis_reader_endpoint" {
  description = "Reader endpoint of the Redis replication group (null with redis_cluster_mode)."
  value       = var.redis_cluster_mode ? null : aws_elasticache_replication_group.redis.reader_endpoint_address
}

output "redis_auth_secret_arn" {
  description = "Secrets Manager secret holding the Redis AUTH token."
  value       = aws_secretsmanager_secret.redis_auth.arn
}

output "batch_state_machine_arn" {
  description = "The batch state machine: the hourly schedule starts it with {}; start it with {\"from\",\"to\"} (whole hours) to reprocess."
  value       = aws_sfn_state_machine.batch.arn
}

output "function_names" {
  description = "Function name per part (speed, archiver, batch, api)."
  value       = { for k, f in aws_lambda_function.fn : k => f.function_name }
}

output "function_versions" {
  description = "Per function: the version the live alias serves now and the newest published version. When they differ, run a CodeDeploy deployment (docs/DEPLOY.md)."
  value = {
    for k, f in aws_lambda_function.fn : k => {
      live   = aws_lambda_alias.live[k].function_version
      latest = f.version
    }
  }
}

output "codedeploy_application" {
  description = "CodeDeploy application; its deployment groups are named speed, archiver, batch and api."
  value       = aws_codedeploy_app.lambda.name
}

output "failure_queue_urls" {
  description = "On-failure queues of the Kinesis consumers and the batch dead-letter queue."
  value = merge(
    { for k, q in aws_sqs_queue.esm_failures : k => q.url },
    { batch = aws_sqs_queue.batch_dlq.url },
  )
}

output "alarm_topic_arn" {
  description = "SNS topic of every alarm and deployment event; subscribe your pager to it."
  value       = aws_sns_topic.alarms.arn
}

output "dashboard_name" {
  description = "CloudWatch dashboard of the pipeline."
  value       = aws_cloudwatch_dashboard.main.dashboard_name
}
