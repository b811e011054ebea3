# The batch function's two schedules.
#
# The hourly batch run: EventBridge Scheduler starts an execution of the batch
# state machine (stepfunctions.tf) with {} a few minutes past every hour (after
# the grace period has closed the previous hour). {} is what makes it the
# hourly run rather than a reprocess; the machine plans it, computes its parts
# side by side, publishes and compacts. The target is the state machine's ARN
# (Scheduler's templated target for StartExecution; executions get generated
# names). Scheduler retries a StartExecution that failed (throttling, a
# service error) and sends what it gave up on to the batch dead-letter queue;
# a run that started and then failed is the state machine's business (its
# ExecutionsFailed alarm, alarms.tf).
#
# Executions may overlap (a run longer than the hour, a retried start, a
# reprocess started by hand): that is safe, the later publish reports Conflict
# and that execution replans from the new snapshot (stepfunctions.tf).

resource "aws_scheduler_schedule" "batch_hourly" {
  name        = "${var.name}-batch-hourly"
  description = "Hourly tally batch run: an execution of the batch state machine (dirty closed hours in parts, publish, watermark, compaction)"

  schedule_expression          = var.batch_schedule_expression
  schedule_expression_timezone = "UTC"
  state                        = "ENABLED"
  kms_key_arn                  = aws_kms_key.data.arn

  flexible_time_window {
    mode = "OFF"
  }

  target {
    arn      = aws_sfn_state_machine.batch.arn
    role_arn = aws_iam_role.scheduler.arn
    input    = jsonencode({})

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
# Same role, key and dead-letter queue as the hourly schedule. A missed or failed
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
