# Reprocessing history: a Step Functions state machine that fans a range of
# hours out over the batch function, each branch one `{"from","to"}` run
# (the same code as `tally batch reprocess --from --to`).
#
# Input, either
#   {"from": "2026-01-01T00:00:00Z", "to": "2026-11-01T00:00:00Z", "hours_per_run": 1}
#     whole hours, to > from, hours_per_run optional (default 1), at most
#     20,000 runs per execution; the ranges are generated here, or
#   {"ranges": [{"from": "...", "to": "..."}, ...]}
#     an explicit list (at most 2,000), e.g. scattered hours.
#
# A distributed Map (not an inline one): a year of hours is 8,760 branches,
# far over an inline Map's share of a standard execution's 25,000 history
# events; each branch here is a child execution with its own history. The map
# iterates over indices and computes each branch's range in ItemSelector, so
# the state's payload stays small (~43 KB for a year of hours).
# MaxConcurrency bounds how many batch invocations run at once; each branch
# retries throttling and service errors, and failed runs (for instance a
# Delta commit conflict with a concurrent run) with backoff. Any branch that
# still fails fails the execution (ToleratedFailurePercentage 0); every
# branch's replacement is atomic, so rerunning the same input is safe.
# The expressions are JSONata (Step Functions' QueryLanguage).

locals {
  hours_per_run = "($exists($states.input.hours_per_run) ? $states.input.hours_per_run : 1)"
  rfc3339       = "'[Y0001]-[M01]-[D01]T[H01]:[m01]:[s01]Z'"

  reprocess_input_valid = join(" ", [
    "$exists($states.input.ranges)",
    "? ($type($states.input.ranges) = 'array' and $count($states.input.ranges) > 0 and $count($states.input.ranges) <= 2000)",
    ": ($exists($states.input.from) and $exists($states.input.to)",
    "and $toMillis($states.input.from) % 3600000 = 0 and $toMillis($states.input.to) % 3600000 = 0",
    "and $toMillis($states.input.to) > $toMillis($states.input.from)",
    "and ($not($exists($states.input.hours_per_run)) or ($type($states.input.hours_per_run) = 'number' and $states.input.hours_per_run >= 1 and $floor($states.input.hours_per_run) = $states.input.hours_per_run))",
    "and ($toMillis($states.input.to) - $toMillis($states.input.from)) / (${local.hours_per_run} * 3600000) <= 20000)",
  ])

  reprocess_items = join(" ", [
    "$exists($states.input.ranges) ? $states.input.ranges",
    ": [0..($ceil(($toMillis($states.input.to) - $toMillis($states.input.from)) / (${local.hours_per_run} * 3600000)) - 1)]",
  ])

  reprocess_item_from = join(" ", [
    "$exists($states.input.ranges) ? $states.context.Map.Item.Value.from",
    ": $fromMillis($toMillis($states.input.from) + $states.context.Map.Item.Value * ${local.hours_per_run} * 3600000, ${local.rfc3339})",
  ])

  reprocess_item_to = join(" ", [
    "$exists($states.input.ranges) ? $states.context.Map.Item.Value.to",
    ": $fromMillis($min([$toMillis($states.input.from) + ($states.context.Map.Item.Value + 1) * ${local.hours_per_run} * 3600000, $toMillis($states.input.to)]), ${local.rfc3339})",
  ])

  reprocess_definition = {
    Comment       = "tally: reprocess a range of history, one batch-layer run per range"
    QueryLanguage = "JSONata"
    StartAt       = "ValidateInput"
    States = {
      ValidateInput = {
        Type = "Choice"
        Choices = [{
          Condition = "{% ${local.reprocess_input_valid} %}"
          Next      = "ReprocessRanges"
        }]
        Default = "BadInput"
      }
      BadInput = {
        Type  = "Fail"
        Error = "BadInput"
        Cause = "Input must be {\"from\",\"to\"[,\"hours_per_run\"]} on whole hours with to > from and at most 20000 runs, or {\"ranges\":[{\"from\",\"to\"},...]} with 1 to 2000 entries."
      }
      ReprocessRanges = {
        Type  = "Map"
        Label = "Reprocess"
        Items = "{% ${local.reprocess_items} %}"
        ItemSelector = {
          from = "{% ${local.reprocess_item_from} %}"
          to   = "{% ${local.reprocess_item_to} %}"
        }
        MaxConcurrency             = var.reprocess_max_concurrency
        ToleratedFailurePercentage = 0
        ItemProcessor = {
          ProcessorConfig = {
            Mode          = "DISTRIBUTED"
            ExecutionType = "STANDARD" # a batch run may take up to 15 minutes; express children stop at 5
          }
          StartAt = "RunBatch"
          States = {
            RunBatch = {
              Type     = "Task"
              Resource = "arn:${local.partition}:states:::lambda:invoke"
              Arguments = {
                FunctionName = aws_lambda_alias.live["batch"].arn
                Payload = {
                  from = "{% $states.input.from %}"
                  to   = "{% $states.input.to %}"
                }
              }
              TimeoutSeconds = var.lambda_timeout_seconds["batch"] + 60
              Retry = [
                {
                  ErrorEquals = [
                    "Lambda.ServiceException",
                    "Lambda.AWSLambdaException",
                    "Lambda.SdkClientException",
                    "Lambda.TooManyRequestsException",
                    "Lambda.ClientExecutionTimeoutException",
                  ]
                  IntervalSeconds = 2
                  MaxAttempts     = 8
                  BackoffRate     = 2
                  MaxDelaySeconds = 120
                  JitterStrategy  = "FULL"
                },
                {
                  ErrorEquals     = ["States.ALL"]
                  IntervalSeconds = 30
                  MaxAttempts     = 4
                  BackoffRate     = 2
                  MaxDelaySeconds = 600
                  JitterStrategy  = "FULL"
                },
              ]
              # Keep each branch's result tiny: the map collects them all.
              Output = {}
              End    = true
            }
          }
        }
        Output = {
          reprocessed = "{% $count($states.result) %}"
        }
        End = true
      }
    }
  }
}

resource "aws_cloudwatch_log_group" "reprocess" {
  # /aws/vendedlogs/ keeps CloudWatch Logs' resource policy for vended log
  # delivery small.
  name              = "/aws/vendedlogs/states/${local.reprocess_state_machine_name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.ops.arn
}

resource "aws_sfn_state_machine" "reprocess" {
  name       = local.reprocess_state_machine_name
  type       = "STANDARD"
  role_arn   = aws_iam_role.reprocess.arn
  definition = jsonencode(local.reprocess_definition)

  logging_configuration {
    log_destination        = "${aws_cloudwatch_log_group.reprocess.arn}:*"
    include_execution_data = true
    level                  = "ALL"
  }

  tracing_configuration {
    enabled = true
  }

  depends_on = [aws_iam_role_policy.reprocess]
}
