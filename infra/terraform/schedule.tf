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
