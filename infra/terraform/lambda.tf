# The four functions. They are one binary, `tally`, packaged as `bootstrap`
# in dist/lambda/tally.zip by scripts/package-lambdas.sh; the custom runtime
# passes the function's handler setting in _HANDLER, and the binary runs the
# part of tally that names: speed, archiver, batch or api.
#
# The zip (~60 MB) is over the 50 MB Lambda takes in a direct upload
# (`filename`), so Terraform puts it in the artifacts bucket (s3.tf) and the
# functions take their code from there (S3 allows up to 250 MB unzipped).
# All four functions run the same bytes, so there is one object, uploaded
# once per change, not four copies of it: one 60 MB upload per apply that
# changes the binary instead of four.
#
# Every apply that changes the zip publishes a new version; the `live` alias is
# what the event source mappings, the speed-view schedule, the batch state
# machine and API Gateway invoke. Terraform creates the alias on the first
# version and then leaves it alone: CodeDeploy (deploy.tf) shifts it to a new
# version gradually and rolls back on alarm. See docs/DEPLOY.md.

locals {
  dist_dir = coalesce(var.lambda_dist_dir, "${path.module}/../../dist/lambda")

  # The one package of all four functions. Its hash is taken only when it
  # exists, so that a plan without it stops at the precondition on
  # aws_s3_object.lambda_code (which says what to run) rather than at an
  # error of filebase64sha256.
  lambda_zip        = "${local.dist_dir}/tally.zip"
  lambda_zip_sha256 = fileexists(local.lambda_zip) ? filebase64sha256(local.lambda_zip) : null

  functions = {
    speed = {
      description   = "tally speed layer: Kinesis records to Redis counters, exactly-once per shard, partial batch responses"
      uses_redis    = true
      ephemeral_mb  = 512
      async_invoked = false
    }
    archiver = {
      description   = "tally archiver: Kinesis records to the Delta tables raw_events and quarantine on S3"
      uses_redis    = false
      ephemeral_mb  = 1024
      async_invoked = false
    }
    batch = {
      description   = "tally batch layer: the steps of a batch run (plan, part, publish, compact) for the batch state machine, or the every-minute {speed_rebuild} check of the Redis speed view"
      uses_redis    = true # the speed_rebuild check reads the view and rebuilds it from raw_events
      ephemeral_mb  = 4096 # DataFusion spills here when an hour does not fit in memory
      async_invoked = true
    }
    api = {
      description   = "tally serving layer: merchant metrics over API Gateway HTTP API (payload v2)"
      uses_redis    = true
      ephemeral_mb  = 512
      async_invoked = false
    }
  }

  function_names = { for k, _ in local.functions : k => "${var.name}-${k}" }

  common_env = {
    TALLY_LAKE           = local.lake_uri
    TALLY_KINESIS_STREAM = aws_kinesis_stream.events.name
    TALLY_GRACE_MINUTES  = tostring(var.grace_minutes)
    RUST_LOG             = var.rust_log
  }

  # How long after Redis lost its data a source that has not written since
  # gets the archive's mark as its rebuild boundary: longer than the
  # archiver's lag behind the speed function, which batches for
  # archiver_batching_window_seconds.
  speed_rebuild_settle_seconds = var.speed_rebuild_settle_seconds != null ? var.speed_rebuild_settle_seconds : var.archiver_batching_window_seconds + 30

  # What one {"speed_rebuild": true} invocation may take: the settle time, up
  # to 45 s of waiting for raw_events to reach the boundaries, and a margin for
  # the cold start and the last pass over raw_events.
  speed_rebuild_max_seconds = local.speed_rebuild_settle_seconds + 45 + 60

  # Every function that reaches Redis (speed, batch, api) gets the same view:
  # same URL (the primary endpoint, or with redis_cluster_mode the cluster's
  # configuration endpoint; redis.tf), same key lifetime, same settle time.
  # The AUTH token is not in the environment: the function reads the secret
  # named here at cold start and keeps the client for the container's life.
  redis_env = {
    TALLY_REDIS_URL                 = "rediss://${local.redis_endpoint_address}:6379"
    TALLY_REDIS_AUTH_SECRET_ARN     = aws_secretsmanager_secret.redis_auth.arn
    TALLY_SPEED_TTL_HOURS           = tostring(var.speed_ttl_hours)
    TALLY_SPEED_REBUILD_SETTLE_SECS = tostring(local.speed_rebuild_settle_seconds)
    # the batch function's load step keeps this many dates in the serving store
    TALLY_SERVING_WINDOW_DAYS = tostring(var.serving_window_days)
  }

  # The batch function's queries stay within this many MiB of its memory and
  # spill to /tmp (its ephemeral storage) beyond it: the function's memory less
  # what the runtime, the Delta snapshots and the result batches need besides.
  batch_query_memory_mb = floor(var.lambda_memory_mb["batch"] * var.batch_query_memory_share)

  batch_env = {
    TALLY_BATCH_MEMORY    = "${local.batch_query_memory_mb}MiB"
    TALLY_BATCH_SPILL_DIR = "/tmp/tally-spill"
  }

  function_env = {
    for k, f in local.functions : k => merge(
      local.common_env,
      f.uses_redis ? local.redis_env : {},
      k == "api" ? { TALLY_JWKS = var.jwks_url } : {},
      k == "batch" ? local.batch_env : {},
    )
  }
}

resource "aws_cloudwatch_log_group" "fn" {
  for_each = local.functions

  name              = "/aws/lambda/${local.function_names[each.key]}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.ops.arn
}

# The package in the artifacts bucket, under a fixed key: a changed zip
# changes source_hash, Terraform uploads it again as a new object version, and
# the new version_id updates the functions' code (s3_object_version) and
# publishes a version of each. Old object versions expire (s3.tf); a published
# Lambda version keeps its own copy of the code.
resource "aws_s3_object" "lambda_code" {
  bucket       = aws_s3_bucket.artifacts.id
  key          = "lambda/tally.zip"
  source       = local.lambda_zip
  source_hash  = local.lambda_zip_sha256
  content_type = "application/zip"

  server_side_encryption = "aws:kms"
  kms_key_id             = aws_kms_key.data.arn
  bucket_key_enabled     = true

  lifecycle {
    precondition {
      condition     = fileexists(local.lambda_zip)
      error_message = "${local.lambda_zip} is missing: run scripts/package-lambdas.sh first (or set lambda_dist_dir)."
    }
  }

  # version_id exists only once versioning is on; the bucket policy and the
  # default encryption are in place before the first object.
  depends_on = [
    aws_s3_bucket_versioning.artifacts,
    aws_s3_bucket_server_side_encryption_configuration.artifacts,
    aws_s3_bucket_policy.artifacts,
  ]
}

resource "aws_lambda_function" "fn" {
  #checkov:skip=CKV_AWS_272:Code signing needs an AWS Signer job and a signed copy of the artifact; the zip is built from this repository by scripts/package-lambdas.sh and staged in the artifacts bucket by this module, and the live alias only moves to a new version through CodeDeploy with alarm rollback. Add aws_lambda_code_signing_config when the release pipeline signs artifacts.
  for_each = local.functions

  function_name = local.function_names[each.key]
  description   = each.value.description
  role          = aws_iam_role.fn[each.key].arn

  runtime       = "provided.al2023"
  handler       = each.key
  architectures = [var.lambda_architecture]

  s3_bucket         = aws_s3_object.lambda_code.bucket
  s3_key            = aws_s3_object.lambda_code.key
  s3_object_version = aws_s3_object.lambda_code.version_id
  source_code_hash  = local.lambda_zip_sha256
  publish           = true

  memory_size                    = var.lambda_memory_mb[each.key]
  timeout                        = var.lambda_timeout_seconds[each.key]
  reserved_concurrent_executions = var.lambda_reserved_concurrency[each.key]

  ephemeral_storage {
    size = each.value.ephemeral_mb
  }

  environment {
    variables = local.function_env[each.key]
  }
  kms_key_arn = aws_kms_key.data.arn

  vpc_config {
    subnet_ids         = aws_subnet.private[*].id
    security_group_ids = [aws_security_group.lambda.id]
  }

  tracing_config {
    mode = var.lambda_tracing_mode[each.key]
  }

  logging_config {
    log_format = "Text" # the batch job's embedded-metric-format lines pass through as written
    log_group  = aws_cloudwatch_log_group.fn[each.key].name
  }

  # Only batch is invoked asynchronously (by the speed-view schedule), so only
  # it has a dead-letter queue. speed and archiver are invoked synchronously by
  # their event source mappings, whose failures go to on-failure queues
  # (event_sources.tf); api synchronously by API Gateway.
  dynamic "dead_letter_config" {
    for_each = each.value.async_invoked ? [aws_sqs_queue.batch_dlq.arn] : []
    content {
      target_arn = dead_letter_config.value
    }
  }

  lifecycle {
    precondition {
      condition     = each.key != "batch" || var.lambda_timeout_seconds[each.key] >= local.speed_rebuild_max_seconds
      error_message = "lambda_timeout_seconds.batch (${var.lambda_timeout_seconds[each.key]}) must be at least ${local.speed_rebuild_max_seconds}: a speed_rebuild invocation takes up to speed_rebuild_settle_seconds (${local.speed_rebuild_settle_seconds}) + 45 s, plus a 60 s margin."
    }
  }

  depends_on = [
    aws_cloudwatch_log_group.fn,
    aws_iam_role_policy.fn,
  ]
}

resource "aws_lambda_alias" "live" {
  for_each = local.functions

  name             = "live"
  description      = "What callers invoke; shifted between versions by CodeDeploy"
  function_name    = aws_lambda_function.fn[each.key].function_name
  function_version = aws_lambda_function.fn[each.key].version

  lifecycle {
    # After creation the alias belongs to CodeDeploy (deploy.tf): a new
    # version is published by apply and reaches traffic only through a
    # deployment that can roll back.
    ignore_changes = [function_version, routing_config]
  }
}

# The speed-view schedule invokes batch asynchronously (the hourly run goes
# through the state machine, which invokes synchronously and retries itself):
# retry twice (the check is idempotent), and drop an event older than an hour.
# What still fails lands in the batch dead-letter queue; a failed
# {"speed_rebuild": true} there needs no replay (the next minute's check does
# the same work). A batch payload invoked asynchronously by hand gets the same
# treatment.
resource "aws_lambda_function_event_invoke_config" "batch" {
  function_name                = aws_lambda_function.fn["batch"].function_name
  qualifier                    = aws_lambda_alias.live["batch"].name
  maximum_retry_attempts       = 2
  maximum_event_age_in_seconds = 3600
}

resource "aws_lambda_provisioned_concurrency_config" "api" {
  count = var.api_provisioned_concurrency > 0 ? 1 : 0

  function_name                     = aws_lambda_function.fn["api"].function_name
  qualifier                         = aws_lambda_alias.live["api"].name
  provisioned_concurrent_executions = var.api_provisioned_concurrency
}
