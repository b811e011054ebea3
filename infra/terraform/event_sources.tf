# Kinesis -> speed layer and Kinesis -> archiver: two independent event
# source mappings on the same stream, each invoking its function's live
# alias. Both:
#   - report partial batch failures (ReportBatchItemFailures): a record that
#     fails is retried from its sequence number, the ones before it are not;
#   - bisect a batch whose invocation errors, to isolate a poison record;
#   - retry a bounded number of times, then send the batch's metadata (shard,
#     sequence range) to an encrypted SQS queue and move on, so one bad
#     batch cannot stop a shard. Records stay in the stream for
#     kinesis_retention_hours, long enough to replay them (docs/DEPLOY.md).
#   - run one batch per shard at a time (parallelization factor 1): the speed
#     layer's exactly-once mark and the archiver's idempotency key are per
#     shard and sequence number, so batches of one shard must not overlap.

locals {
  stream_consumers = {
    speed = {
      batch_size        = var.speed_batch_size
      batching_window_s = var.speed_batching_window_seconds
      max_record_age_s  = var.speed_maximum_record_age_seconds
    }
    archiver = {
      batch_size        = var.archiver_batch_size
      batching_window_s = var.archiver_batching_window_seconds
      max_record_age_s  = var.archiver_maximum_record_age_seconds
    }
  }
}

resource "aws_sqs_queue" "esm_failures" {
  for_each = local.stream_consumers

  name                              = "${var.name}-${each.key}-failed-batches"
  message_retention_seconds         = 1209600 # 14 days, the SQS maximum
  kms_master_key_id                 = aws_kms_key.data.arn
  kms_data_key_reuse_period_seconds = 300
}

# Dead-letter queue of the batch function's asynchronous invocations and of
# the schedule's target.
resource "aws_sqs_queue" "batch_dlq" {
  name                              = "${var.name}-batch-dlq"
  message_retention_seconds         = 1209600
  kms_master_key_id                 = aws_kms_key.data.arn
  kms_data_key_reuse_period_seconds = 300
}

resource "aws_lambda_event_source_mapping" "stream" {
  for_each = local.stream_consumers

  event_source_arn = aws_kinesis_stream.events.arn
  function_name    = aws_lambda_alias.live[each.key].arn
  enabled          = true

  # From the oldest record: the archiver must see every record (raw_events is
  # the master dataset), and the speed view of the hours after the batch
  # watermark must count them all.
  starting_position = "TRIM_HORIZON"

  batch_size                         = each.value.batch_size
  maximum_batching_window_in_seconds = each.value.batching_window_s
  parallelization_factor             = 1

  function_response_types        = ["ReportBatchItemFailures"]
  bisect_batch_on_function_error = true
  maximum_retry_attempts         = var.esm_maximum_retry_attempts
  maximum_record_age_in_seconds  = each.value.max_record_age_s

  destination_config {
    on_failure {
      destination_arn = aws_sqs_queue.esm_failures[each.key].arn
    }
  }

  depends_on = [aws_iam_role_policy.fn]
}
