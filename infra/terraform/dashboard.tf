# One dashboard for the whole pipeline, top to bottom: what comes in, how far
# behind each consumer is, how the functions fare, the batch watermark, the
# read path, Redis, and what was given up (queues, failed batch runs).

locals {
  fn_names = { for k, f in aws_lambda_function.fn : k => f.function_name }

  dashboard_widgets = [
    {
      type = "metric", x = 0, y = 0, width = 12, height = 6
      properties = {
        title  = "Stream: incoming records and bytes"
        region = local.region
        stat   = "Sum"
        period = 60
        metrics = [
          ["AWS/Kinesis", "IncomingRecords", "StreamName", aws_kinesis_stream.events.name],
          [".", "IncomingBytes", ".", ".", { yAxis = "right" }],
        ]
      }
    },
    {
      type = "metric", x = 12, y = 0, width = 12, height = 6
      properties = {
        title  = "Iterator age (ms): how far behind the stream"
        region = local.region
        stat   = "Maximum"
        period = 60
        metrics = [
          ["AWS/Lambda", "IteratorAge", "FunctionName", local.fn_names["speed"], { label = "speed" }],
          ["...", local.fn_names["archiver"], { label = "archiver" }],
        ]
        annotations = {
          horizontal = [
            { label = "speed alarm", value = var.speed_iterator_age_alarm_seconds * 1000 },
            { label = "archiver alarm", value = var.archiver_iterator_age_alarm_seconds * 1000 },
          ]
        }
      }
    },
    {
      type = "metric", x = 0, y = 6, width = 8, height = 6
      properties = {
        title   = "Invocations"
        region  = local.region
        stat    = "Sum"
        period  = 60
        metrics = [for k, n in local.fn_names : ["AWS/Lambda", "Invocations", "FunctionName", n, { label = k }]]
      }
    },
    {
      type = "metric", x = 8, y = 6, width = 8, height = 6
      properties = {
        title  = "Errors and throttles"
        region = local.region
        stat   = "Sum"
        period = 60
        metrics = concat(
          [for k, n in local.fn_names : ["AWS/Lambda", "Errors", "FunctionName", n, { label = "${k} errors" }]],
          [for k, n in local.fn_names : ["AWS/Lambda", "Throttles", "FunctionName", n, { label = "${k} throttles" }]],
        )
      }
    },
    {
      type = "metric", x = 16, y = 6, width = 8, height = 6
      properties = {
        title   = "Duration p99 (ms)"
        region  = local.region
        stat    = "p99"
        period  = 60
        metrics = [for k, n in local.fn_names : ["AWS/Lambda", "Duration", "FunctionName", n, { label = k }]]
      }
    },
    {
      type = "metric", x = 0, y = 12, width = 12, height = 6
      properties = {
        title  = "Batch watermark lag (s)"
        region = local.region
        stat   = "Maximum"
        period = 300
        metrics = [
          concat(["Tally", "BatchWatermarkLagSeconds"], flatten([for k, v in var.watermark_lag_metric_dimensions : [k, v]])),
        ]
        annotations = {
          horizontal = [{ label = "alarm", value = var.watermark_lag_alarm_seconds }]
        }
      }
    },
    {
      type = "metric", x = 12, y = 12, width = 12, height = 6
      properties = {
        title  = "API: requests, 4xx, 5xx, latency p99"
        region = local.region
        period = 60
        metrics = [
          ["AWS/ApiGateway", "Count", "ApiId", aws_apigatewayv2_api.http.id, { stat = "Sum" }],
          [".", "4xx", ".", ".", { stat = "Sum" }],
          [".", "5xx", ".", ".", { stat = "Sum" }],
          [".", "Latency", ".", ".", { stat = "p99", yAxis = "right" }],
        ]
      }
    },
    {
      type = "metric", x = 0, y = 18, width = 12, height = 6
      properties = {
        title  = "Redis: engine CPU % and memory %"
        region = local.region
        period = 60
        metrics = concat(
          [for c in local.redis_member_clusters : ["AWS/ElastiCache", "EngineCPUUtilization", "CacheClusterId", c, { stat = "Average" }]],
          [for c in local.redis_member_clusters : ["AWS/ElastiCache", "DatabaseMemoryUsagePercentage", "CacheClusterId", c, { stat = "Maximum" }]],
        )
      }
    },
    {
      type = "metric", x = 12, y = 18, width = 12, height = 6
      properties = {
        title  = "Given up: queue depth, failed batch runs"
        region = local.region
        period = 300
        metrics = concat(
          [for q in concat([for k, q in aws_sqs_queue.esm_failures : q.name], [aws_sqs_queue.batch_dlq.name]) :
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", q, { stat = "Maximum" }]],
          [["AWS/States", "ExecutionsFailed", "StateMachineArn", aws_sfn_state_machine.batch.arn, { stat = "Sum" }]],
        )
      }
    },
  ]
}

resource "aws_cloudwatch_dashboard" "main" {
  dashboard_name = var.name
  dashboard_body = jsonencode({ widgets = local.dashboard_widgets })
}
