# The batch function's two schedules.
#
# The hourly batch run: EventBridge Scheduler invokes the batch function's
# live alias asynchronously a few minutes past every hour (after the grace
# period has closed the previous hour). The payload has no from/to, which is
# what tells the batch handler to run the hourly job rather than reprocess a
# range; its shape follows EventBridge's scheduled event.

resource "aws_scheduler_schedule" "batch_hourly" {
  name        = "${var.name}-batch-hourly"
  description = "Hourly tally batch run: dirty closed hours, watermark, compaction"

  schedule_expression          = var.batch_schedule_expression
  schedule_expression_timezone = "UTC"
  state                        = "ENABLED"
  kms_key_arn                  = aws_kms_key.data.arn

  flexible_time_window {
    mode = "OFF"
  }

  target {
    arn      = aws_lambda_alias.live["batch"].arn
    role_arn = aws_iam_role.scheduler.arn
    input = jsonencode({
      "source"      = "aws.scheduler"
      "detail-type" = "Scheduled Event"
      "time"        = "<aws.scheduler.scheduled-time>"
      "detail"      = {}
    })

    retry_policy {
      maximum_event_age_in_seconds = 3600
      maximum_retry_attempts       = 3
    }

    dead_letter_config {
      arn = aws_sqs_queue.batch_dlq.arn
    }
  }
}

# The speed-view check: every minute EventBridge Scheduler invokes the batch
# function's live alias with {"speed_rebuild": true}. AWS runs nothing
# long-lived that would notice a Redis that came back empty (a restart, a
# failover to an empty replica), so this does: when the view is whole the
# invocation reads it and returns; when Redis lost its data it rebuilds the
# view from raw_events (up to speed_rebuild_settle_seconds + 45 s; an overlapping
# invocation finds the rebuild lock taken and returns). Until then the API
# answers the hours before the loss as null with partial: true, never as zeros.
# Same role, key and dead-letter queue as the hourly run. A missed or failed
# tick needs no retry: the next one does the same work.

resource "aws_scheduler_schedule" "speed_rebuild" {
  name        = "${var.name}-speed-rebuild"
  description = "Every-minute check of the Redis speed view; rebuilds it from raw_events after Redis lost its data"

  schedule_expression          = var.speed_rebuild_schedule_expression
  schedule_expression_timezone = "UTC"
  state                        = "ENABLED"
  kms_key_arn                  = aws_kms_key.data.arn

  flexible_time_window {
    mode = "OFF"
  }

  target {
    arn      = aws_lambda_alias.live["batch"].arn
    role_arn = aws_iam_role.scheduler.arn
    input    = jsonencode({ speed_rebuild = true })

    retry_policy {
      maximum_event_age_in_seconds = 60 # the next tick supersedes it
      maximum_retry_attempts       = 0
    }

    dead_letter_config {
      arn = aws_sqs_queue.batch_dlq.arn
    }
  }
}
