# Least privilege, one role per function and per service:
#
#   speed    read the stream; send failed-batch metadata to its queue; read
#            the Redis AUTH secret.
#   archiver read the stream; send failed-batch metadata to its queue;
#            read/write the lake under raw_events/ and quarantine/.
#   batch    read/write raw_events/ (compaction of closed partitions),
#            metrics_hourly/, metrics_quarter_hourly/, metrics_daily/,
#            customer_hours/ and the run staging area _staging/ (the plan's
#            item list, the parts' staged results); read-only merchants/ (the
#            load step copies the settings into Redis); its dead-letter
#            queue; read the Redis AUTH secret (the every-minute speed-view
#            check and rebuild).
#   api      read-only metrics_hourly/, metrics_quarter_hourly/ and
#            metrics_daily/; read/write merchants/ (PUT .../settings is a
#            Delta MERGE); read the Redis AUTH secret.
#   all      write their own log group only, X-Ray, the ENIs of their VPC
#            subnets, decrypt their environment.
#   batch state machine (Step Functions): invoke the batch function's live
#            alias, read the plan's item list and write the parts map's
#            results under _staging/, run its own distributed Map children.
#
# S3 actions are what a Delta writer needs: Get/Put (commits are conditional
# PutObject of the next _delta_log entry), Delete (log cleanup, VACUUM,
# compaction), List (the log), and the multipart-upload actions for large
# Parquet files. No role can read another table's prefix.

locals {
  lake_bucket_arn = aws_s3_bucket.lake.arn

  # Where a batch run stages its work between its steps (plan, parts,
  # publish): <lake_prefix>/_staging/<run_id>/. Not a table; expired by a
  # lifecycle rule (s3.tf) when a run dies before cleaning up.
  lake_staging_dir = "_staging"

  # Tables (and the batch staging area) each function may write (read/write)
  # and only read.
  table_access = {
    speed    = { rw = [], ro = [] }
    archiver = { rw = ["raw_events", "quarantine"], ro = [] }
    batch    = { rw = ["raw_events", "metrics_hourly", "metrics_quarter_hourly", "metrics_daily", "customer_hours", local.lake_staging_dir], ro = ["merchants"] }
    api      = { rw = ["merchants"], ro = ["metrics_hourly", "metrics_quarter_hourly", "metrics_daily"] }
  }

  kinesis_consumers = toset(["speed", "archiver"])

  # Log group ARNs in the form the logs actions are authorised against.
  fn_log_resources = {
    for k, _ in local.functions : k => [
      aws_cloudwatch_log_group.fn[k].arn,
      "${aws_cloudwatch_log_group.fn[k].arn}:*",
    ]
  }

  ec2_arn_prefix = "arn:${local.partition}:ec2:${local.region}:${local.account_id}"
}

data "aws_iam_policy_document" "lambda_assume" {
  statement {
    sid     = "LambdaAssumesTheRole"
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "fn" {
  for_each = local.functions

  name               = "${var.name}-${each.key}-fn"
  description        = "Execution role of the ${var.name} ${each.key} function"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume.json
}

data "aws_iam_policy_document" "fn" {
  for_each = local.functions

  statement {
    sid       = "OwnLogGroupOnly"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = local.fn_log_resources[each.key]
  }

  statement {
    sid = "XRayTraces"
    # These X-Ray actions have no resource-level permissions.
    actions   = ["xray:PutTraceSegments", "xray:PutTelemetryRecords"]
    resources = ["*"]
  }

  statement {
    sid = "DescribeForVpcNetworking"
    # Describe calls have no resource-level permissions.
    actions   = ["ec2:DescribeNetworkInterfaces", "ec2:DescribeSubnets"]
    resources = ["*"]
  }

  statement {
    sid     = "CreateEnisInOwnSubnetsAndGroup"
    actions = ["ec2:CreateNetworkInterface"]
    resources = concat(
      ["${local.ec2_arn_prefix}:network-interface/*", "${local.ec2_arn_prefix}:security-group/${aws_security_group.lambda.id}"],
      [for s in aws_subnet.private : "${local.ec2_arn_prefix}:subnet/${s.id}"],
    )
  }

  statement {
    sid = "ManageOwnAccountsEnis"
    actions = [
      "ec2:DeleteNetworkInterface",
      "ec2:AssignPrivateIpAddresses",
      "ec2:UnassignPrivateIpAddresses",
    ]
    resources = ["${local.ec2_arn_prefix}:network-interface/*"]
  }

  statement {
    sid = "DataKey"
    # Environment variables, SSE-KMS objects, the stream's records, SQS
    # messages and the secret are all under the data key.
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]
  }

  dynamic "statement" {
    for_each = contains(tolist(local.kinesis_consumers), each.key) ? [1] : []
    content {
      sid = "ReadTheStream"
      actions = [
        "kinesis:DescribeStream",
        "kinesis:DescribeStreamSummary",
        "kinesis:GetRecords",
        "kinesis:GetShardIterator",
        "kinesis:ListShards",
      ]
      resources = [aws_kinesis_stream.events.arn]
    }
  }

  dynamic "statement" {
    for_each = contains(tolist(local.kinesis_consumers), each.key) ? [1] : []
    content {
      sid       = "OnFailureDestination"
      actions   = ["sqs:SendMessage"]
      resources = [aws_sqs_queue.esm_failures[each.key].arn]
    }
  }

  dynamic "statement" {
    for_each = local.functions[each.key].async_invoked ? [1] : []
    content {
      sid       = "DeadLetterQueue"
      actions   = ["sqs:SendMessage"]
      resources = [aws_sqs_queue.batch_dlq.arn]
    }
  }

  dynamic "statement" {
    for_each = local.functions[each.key].uses_redis ? [1] : []
    content {
      sid       = "RedisAuthToken"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = [aws_secretsmanager_secret.redis_auth.arn]
    }
  }

  dynamic "statement" {
    for_each = length(concat(local.table_access[each.key].rw, local.table_access[each.key].ro)) > 0 ? [1] : []
    content {
      sid       = "ListOwnTablesOnly"
      actions   = ["s3:ListBucket"]
      resources = [local.lake_bucket_arn]
      condition {
        test     = "StringLike"
        variable = "s3:prefix"
        values = flatten([
          for t in concat(local.table_access[each.key].rw, local.table_access[each.key].ro) :
          ["${var.lake_prefix}/${t}", "${var.lake_prefix}/${t}/*"]
        ])
      }
    }
  }

  dynamic "statement" {
    for_each = length(local.table_access[each.key].rw) > 0 ? [1] : []
    content {
      sid = "ReadWriteOwnTables"
      actions = [
        "s3:GetObject",
        "s3:PutObject",
        "s3:DeleteObject",
        "s3:AbortMultipartUpload",
        "s3:ListMultipartUploadParts",
      ]
      resources = [for t in local.table_access[each.key].rw : "${local.lake_bucket_arn}/${var.lake_prefix}/${t}/*"]
    }
  }

  dynamic "statement" {
    for_each = length(local.table_access[each.key].ro) > 0 ? [1] : []
    content {
      sid       = "ReadOwnTables"
      actions   = ["s3:GetObject"]
      resources = [for t in local.table_access[each.key].ro : "${local.lake_bucket_arn}/${var.lake_prefix}/${t}/*"]
    }
  }
}

resource "aws_iam_role_policy" "fn" {
  for_each = local.functions

  name   = "${var.name}-${each.key}"
  role   = aws_iam_role.fn[each.key].id
  policy = data.aws_iam_policy_document.fn[each.key].json
}

# --- VPC flow logs ------------------------------------------------------------------

resource "aws_iam_role" "flow_logs" {
  name        = "${var.name}-vpc-flow-logs"
  description = "VPC flow logs of ${var.name} into their log group"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "vpc-flow-logs.amazonaws.com" }
      Action    = "sts:AssumeRole"
      Condition = { StringEquals = { "aws:SourceAccount" = local.account_id } }
    }]
  })
}

data "aws_iam_policy_document" "flow_logs" {
  statement {
    sid = "OwnLogGroupOnly"
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogGroups",
      "logs:DescribeLogStreams",
    ]
    resources = [aws_cloudwatch_log_group.flow_logs.arn, "${aws_cloudwatch_log_group.flow_logs.arn}:*"]
  }
}

resource "aws_iam_role_policy" "flow_logs" {
  name   = "${var.name}-vpc-flow-logs"
  role   = aws_iam_role.flow_logs.id
  policy = data.aws_iam_policy_document.flow_logs.json
}

# --- EventBridge Scheduler -----------------------------------------------------------

# One role for both schedules: the hourly run starts an execution of the batch
# state machine, the every-minute speed-view check invokes the batch function's
# live alias. Scheduler calls with this role, so neither the state machine nor
# the function needs a resource-based permission (aws_lambda_permission).

resource "aws_iam_role" "scheduler" {
  name        = "${var.name}-batch-schedule"
  description = "EventBridge Scheduler starting the ${var.name} batch state machine and invoking the batch function"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "scheduler.amazonaws.com" }
      Action    = "sts:AssumeRole"
      Condition = { StringEquals = { "aws:SourceAccount" = local.account_id } }
    }]
  })
}

data "aws_iam_policy_document" "scheduler" {
  statement {
    sid       = "StartBatchRun"
    actions   = ["states:StartExecution"]
    resources = [aws_sfn_state_machine.batch.arn]
  }
  statement {
    sid       = "InvokeBatchLive"
    actions   = ["lambda:InvokeFunction"]
    resources = [aws_lambda_alias.live["batch"].arn]
  }
  statement {
    sid       = "DeadLetterQueue"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.batch_dlq.arn]
  }
  statement {
    sid       = "ScheduleAndQueueKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]
  }
}

resource "aws_iam_role_policy" "scheduler" {
  name   = "${var.name}-batch-schedule"
  role   = aws_iam_role.scheduler.id
  policy = data.aws_iam_policy_document.scheduler.json
}

# --- Step Functions (the batch run) ----------------------------------------------------

locals {
  batch_state_machine_name = "${var.name}-batch"
  batch_state_machine_arn  = "arn:${local.partition}:states:${local.region}:${local.account_id}:stateMachine:${local.batch_state_machine_name}"

  # The plan's item list (ItemReader) and the parts map's results
  # (ResultWriter): <lake_prefix>/_staging/<run_id>/...
  batch_staging_objects_arn = "${local.lake_bucket_arn}/${var.lake_prefix}/${local.lake_staging_dir}/*"
}

resource "aws_iam_role" "batch_sfn" {
  name        = "${var.name}-batch-sfn"
  description = "The ${var.name} batch state machine (hourly run and reprocessing)"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "states.amazonaws.com" }
      Action    = "sts:AssumeRole"
      Condition = {
        StringEquals = { "aws:SourceAccount" = local.account_id }
        ArnLike      = { "aws:SourceArn" = local.batch_state_machine_arn }
      }
    }]
  })
}

data "aws_iam_policy_document" "batch_sfn" {
  # plan, part, publish and compact are all the batch function's live alias.
  statement {
    sid       = "InvokeBatchLive"
    actions   = ["lambda:InvokeFunction"]
    resources = [aws_lambda_alias.live["batch"].arn]
  }

  # The parts map reads the plan's item list (ItemReader, s3:getObject) and
  # writes its run's results (ResultWriter, s3:putObject, multipart for large
  # result files) under the staging area, and nowhere else in the lake.
  statement {
    sid = "RunStagingArea"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [local.batch_staging_objects_arn]
  }
  statement {
    sid = "LakeKey"
    # The lake's objects are SSE-KMS under the data key: Decrypt to read the
    # item list, GenerateDataKey to write the map's results.
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.data.arn]
  }

  # The distributed Maps run each item as a child execution of this same
  # state machine; RedriveExecution lets a redriven execution rerun a map
  # run's failed children.
  statement {
    sid       = "DistributedMapChildren"
    actions   = ["states:StartExecution"]
    resources = [local.batch_state_machine_arn]
  }
  statement {
    sid     = "DistributedMapChildExecutions"
    actions = ["states:DescribeExecution", "states:StopExecution", "states:RedriveExecution"]
    resources = [
      "arn:${local.partition}:states:${local.region}:${local.account_id}:execution:${local.batch_state_machine_name}/*",
      "arn:${local.partition}:states:${local.region}:${local.account_id}:execution:${local.batch_state_machine_name}:*",
    ]
  }
  # Step Functions' vended log delivery: these CloudWatch Logs actions have
  # no resource-level permissions, AWS documents Resource "*" for them.
  statement {
    sid = "VendedLogDelivery"
    actions = [
      "logs:CreateLogDelivery",
      "logs:GetLogDelivery",
      "logs:UpdateLogDelivery",
      "logs:DeleteLogDelivery",
      "logs:ListLogDeliveries",
      "logs:PutResourcePolicy",
      "logs:DescribeResourcePolicies",
      "logs:DescribeLogGroups",
    ]
    resources = ["*"]
  }

  statement {
    sid = "XRayTraces"
    actions = [
      "xray:PutTraceSegments",
      "xray:PutTelemetryRecords",
      "xray:GetSamplingRules",
      "xray:GetSamplingTargets",
    ]
    resources = ["*"]
  }
}

resource "aws_iam_role_policy" "batch_sfn" {
  name   = "${var.name}-batch-sfn"
  role   = aws_iam_role.batch_sfn.id
  policy = data.aws_iam_policy_document.batch_sfn.json
}

# --- CodeDeploy ---------------------------------------------------------------------

resource "aws_iam_role" "codedeploy" {
  name        = "${var.name}-codedeploy"
  description = "CodeDeploy shifting the ${var.name} live aliases"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "codedeploy.amazonaws.com" }
      Action    = "sts:AssumeRole"
      Condition = { StringEquals = { "aws:SourceAccount" = local.account_id } }
    }]
  })
}

data "aws_iam_policy_document" "codedeploy" {
  statement {
    sid     = "ShiftLiveAliases"
    actions = ["lambda:GetAlias", "lambda:UpdateAlias", "lambda:GetProvisionedConcurrencyConfig"]
    resources = flatten([
      for k, _ in local.functions : [
        aws_lambda_function.fn[k].arn,
        "${aws_lambda_function.fn[k].arn}:*",
      ]
    ])
  }
  statement {
    sid       = "WatchRollbackAlarms"
    actions   = ["cloudwatch:DescribeAlarms"]
    resources = [for a in local.rollback_alarm_arns : a]
  }
  statement {
    sid       = "NotifyAlarmTopic"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms.arn]
  }
  statement {
    sid       = "AlarmTopicKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.ops.arn]
  }
}

resource "aws_iam_role_policy" "codedeploy" {
  name   = "${var.name}-codedeploy"
  role   = aws_iam_role.codedeploy.id
  policy = data.aws_iam_policy_document.codedeploy.json
}
