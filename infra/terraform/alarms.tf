# Alarms, all to one KMS-encrypted SNS topic:
#   - iterator age of each Kinesis consumer (speed, archiver): how far behind
#     the stream it is;
#   - errors and throttles of every function;
#   - the batch layer's watermark lag (Tally/BatchWatermarkLagSeconds, from the
#     batch job's embedded-metric-format log lines), which also fires when the
#     job stops reporting;
#   - the API's 5xx rate;
#   - messages in the on-failure and dead-letter queues;
#   - failed executions of the batch state machine (hourly runs and
#     reprocessing), producer throttling on the stream, Redis CPU and memory.
# The per-function error/throttle alarms (and the 5xx alarm for api) are also
# CodeDeploy's rollback triggers.

resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = aws_kms_key.ops.arn
}

resource "aws_sns_topic_subscription" "alarm_email" {
  count = var.alarm_email == null ? 0 : 1

  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

locals {
  alarm_actions = [aws_sns_topic.alarms.arn]

  # Errors: sustained failures, not one retried batch. Invocations of the
  # Kinesis consumers fail only when a whole batch fails (a bad record is a
  # partial batch response, a bad line goes to quarantine).
  error_alarm = {
    speed    = { threshold = 1, period = 60, evaluation_periods = 3, datapoints = 3 }
    archiver = { threshold = 1, period = 60, evaluation_periods = 3, datapoints = 3 }
    batch    = { threshold = 1, period = 300, evaluation_periods = 1, datapoints = 1 }
    api      = { threshold = 5, period = 60, evaluation_periods = 3, datapoints = 2 }
  }

  iterator_age_alarm_seconds = {
    speed    = var.speed_iterator_age_alarm_seconds
    archiver = var.archiver_iterator_age_alarm_seconds
  }

  # With cluster mode off the two nodes are <group>-001 and <group>-002. Cluster
  # mode names a node <group>-<shard 0001..>-<node 001..>: per shard its
  # primary and replica.
  redis_member_clusters = var.redis_cluster_mode ? flatten([
    for s in range(1, aws_elasticache_replication_group.redis.num_node_groups + 1) : [
      for n in range(1, aws_elasticache_replication_group.redis.replicas_per_node_group + 2) :
      format("%s-%04d-%03d", aws_elasticache_replication_group.redis.replication_group_id, s, n)
    ]
  ]) : [for i in range(1, 3) : format("%s-%03d", aws_elasticache_replication_group.redis.replication_group_id, i)]

  rollback_alarm_names = {
    for k, _ in local.functions : k => concat(
      [aws_cloudwatch_metric_alarm.errors[k].alarm_name, aws_cloudwatch_metric_alarm.throttles[k].alarm_name],
      k == "api" ? [aws_cloudwatch_metric_alarm.api_5xx.alarm_name] : [],
    )
  }

  rollback_alarm_arns = concat(
    [for a in aws_cloudwatch_metric_alarm.errors : a.arn],
    [for a in aws_cloudwatch_metric_alarm.throttles : a.arn],
    [aws_cloudwatch_metric_alarm.api_5xx.arn],
  )
}

resource "aws_cloudwatch_metric_alarm" "iterator_age" {
  for_each = local.iterator_age_alarm_seconds

  alarm_name        = "${var.name}-${each.key}-iterator-age"
  alarm_description = "The ${each.key} function is more than ${each.value} s behind the Kinesis stream."
  namespace         = "AWS/Lambda"
  metric_name       = "IteratorAge"
  dimensions        = { FunctionName = aws_lambda_function.fn[each.key].function_name }
  statistic         = "Maximum"
  period            = 60

  comparison_operator = "GreaterThanThreshold"
  threshold           = each.value * 1000
  evaluation_periods  = 5
  datapoints_to_alarm = 5
  treat_missing_data  = "notBreaching"

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "errors" {
  for_each = local.functions

  alarm_name        = "${var.name}-${each.key}-errors"
  alarm_description = "Invocations of the ${each.key} function are failing (also rolls a deployment back)."
  namespace         = "AWS/Lambda"
  metric_name       = "Errors"
  dimensions        = { FunctionName = aws_lambda_function.fn[each.key].function_name }
  statistic         = "Sum"
  period            = local.error_alarm[each.key].period

  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = local.error_alarm[each.key].threshold
  evaluation_periods  = local.error_alarm[each.key].evaluation_periods
  datapoints_to_alarm = local.error_alarm[each.key].datapoints
  treat_missing_data  = "notBreaching"

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "throttles" {
  for_each = local.functions

  alarm_name        = "${var.name}-${each.key}-throttles"
  alarm_description = "The ${each.key} function hits its reserved concurrency (lambda_reserved_concurrency)."
  namespace         = "AWS/Lambda"
  metric_name       = "Throttles"
  dimensions        = { FunctionName = aws_lambda_function.fn[each.key].function_name }
  statistic         = "Sum"
  period            = 60

  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  treat_missing_data  = "notBreaching"

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "watermark_lag" {
  alarm_name        = "${var.name}-batch-watermark-lag"
  alarm_description = "The batch watermark is more than ${var.watermark_lag_alarm_seconds} s behind now, or the batch job has not reported its lag for an hour: merchants' metrics are not becoming authoritative on time."
  namespace         = "Tally"
  metric_name       = "BatchWatermarkLagSeconds"
  dimensions        = var.watermark_lag_metric_dimensions
  statistic         = "Maximum"
  period            = 3600

  comparison_operator = "GreaterThanThreshold"
  threshold           = var.watermark_lag_alarm_seconds
  evaluation_periods  = 1
  datapoints_to_alarm = 1
  treat_missing_data  = "breaching" # no report in an hour means no batch run

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "api_5xx" {
  alarm_name          = "${var.name}-api-5xx-rate"
  alarm_description   = "More than ${var.api_5xx_alarm_percent}% of API requests end in 5xx (also rolls an api deployment back)."
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.api_5xx_alarm_percent
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  treat_missing_data  = "notBreaching"

  metric_query {
    id          = "rate"
    expression  = "IF(requests > 0, 100 * errors / requests, 0)"
    label       = "5xx %"
    return_data = true
  }
  metric_query {
    id = "errors"
    metric {
      namespace   = "AWS/ApiGateway"
      metric_name = "5xx"
      dimensions  = { ApiId = aws_apigatewayv2_api.http.id }
      stat        = "Sum"
      period      = 60
    }
  }
  metric_query {
    id = "requests"
    metric {
      namespace   = "AWS/ApiGateway"
      metric_name = "Count"
      dimensions  = { ApiId = aws_apigatewayv2_api.http.id }
      stat        = "Sum"
      period      = 60
    }
  }

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "queue_not_empty" {
  for_each = merge(
    { for k, q in aws_sqs_queue.esm_failures : "${k}-failed-batches" => q.name },
    { "batch-dlq" = aws_sqs_queue.batch_dlq.name },
  )

  alarm_name        = "${var.name}-${each.key}-not-empty"
  alarm_description = "${each.value} has messages: a Kinesis batch, the start of an hourly batch run or a speed-view check was given up after its retries (see docs/DEPLOY.md, replaying; a {\"speed_rebuild\": true} message needs no replay)."
  namespace         = "AWS/SQS"
  metric_name       = "ApproximateNumberOfMessagesVisible"
  dimensions        = { QueueName = each.value }
  statistic         = "Maximum"
  period            = 300

  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "batch_run_failed" {
  alarm_name        = "${var.name}-batch-run-failed"
  alarm_description = "An execution of the batch state machine (an hourly run or a reprocess) failed before its publish finished (a compaction failure never fails a run). Redrive it or start it again (docs/DEPLOY.md, The batch run)."
  namespace         = "AWS/States"
  metric_name       = "ExecutionsFailed"
  dimensions        = { StateMachineArn = aws_sfn_state_machine.batch.arn }
  statistic         = "Sum"
  period            = 300

  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "stream_write_throttled" {
  alarm_name        = "${var.name}-stream-write-throttled"
  alarm_description = "Producers are being throttled by the stream (add shards, or switch to ON_DEMAND)."
  namespace         = "AWS/Kinesis"
  metric_name       = "WriteProvisionedThroughputExceeded"
  dimensions        = { StreamName = aws_kinesis_stream.events.name }
  statistic         = "Sum"
  period            = 60

  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  treat_missing_data  = "notBreaching"

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "redis_cpu" {
  for_each = toset(local.redis_member_clusters)

  alarm_name        = "${var.name}-redis-${each.key}-engine-cpu"
  alarm_description = "Redis engine thread of ${each.key} above 80% (Redis executes commands on one core)."
  namespace         = "AWS/ElastiCache"
  metric_name       = "EngineCPUUtilization"
  dimensions        = { CacheClusterId = each.key }
  statistic         = "Average"
  period            = 60

  comparison_operator = "GreaterThanThreshold"
  threshold           = 80
  evaluation_periods  = 5
  datapoints_to_alarm = 5
  treat_missing_data  = "notBreaching"

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "redis_memory" {
  for_each = toset(local.redis_member_clusters)

  alarm_name        = "${var.name}-redis-${each.key}-memory"
  alarm_description = "Redis memory of ${each.key} above 80% of maxmemory: at 100% the server refuses speed-view writes (noeviction), the speed layer falls behind and, after its retries, gives batches up to its failed-batches queue, and a speed-view rebuild cannot write. Grow redis_node_type, add shards (redis_shards, with redis_cluster_mode) or shorten speed_ttl_hours (docs/DEPLOY.md)."
  namespace         = "AWS/ElastiCache"
  metric_name       = "DatabaseMemoryUsagePercentage"
  dimensions        = { CacheClusterId = each.key }
  statistic         = "Maximum"
  period            = 300

  comparison_operator = "GreaterThanThreshold"
  threshold           = 80
  evaluation_periods  = 2
  datapoints_to_alarm = 2
  treat_missing_data  = "notBreaching"

  alarm_actions = local.alarm_actions
  ok_actions    = local.alarm_actions
}
