# The event stream. Producers PutRecords NDJSON records (about 100 events,
# ~15 KB each) with partition key = merchant_id, so one merchant's events stay
# ordered on one shard. Two consumers read it through their own event source
# mappings (event_sources.tf): the speed layer and the archiver.

resource "aws_kinesis_stream" "events" {
  name             = "${var.name}-events"
  shard_count      = var.kinesis_stream_mode == "PROVISIONED" ? var.kinesis_shard_count : null
  retention_period = var.kinesis_retention_hours

  encryption_type = "KMS"
  kms_key_id      = aws_kms_key.data.arn

  stream_mode_details {
    stream_mode = var.kinesis_stream_mode
  }
}
