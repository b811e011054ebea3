# The batch run: one Step Functions state machine for the hourly run (started
# by the hourly schedule, schedule.tf) and for reprocessing (started by hand).
# Every step is the batch function's live alias, told what to do by the
# payload's "step" field:
#
#   ValidateInput   {} (hourly) or {"from","to"} (reprocess [from, to)): whole
#                   hours, to > from, no other field; anything else fails at
#                   once with BadInput.
#   Plan            {"step":"plan"[,"from","to"]}: finds the dirty hours and
#                   the complete days due, splits each into parts, writes two
#                   item lists to s3://<lake>/<lake_prefix>/_staging/<run_id>/
#                   (hour_items.json, day_items.json) and answers {run_id,
#                   hour_items: {bucket, key}, hour_item_count, day_items: {...},
#                   day_item_count, item_count}.
#   AnythingToDo    item_count = 0: nothing to publish; go straight to
#                   LoadServingStore (CompactOnly first when the plan found
#                   days left uncompacted, compact_days, e.g. after a run died
#                   past its publish), then NothingToDo or Compact.
#   HourParts       a distributed Map over the hour items (ItemReader): each
#                   element is exactly a part step's payload,
#                   {"step":"part","run_id","item"}, invoked as is; each part
#                   writes its customer_hours files (uncommitted) and stages
#                   its share of metrics_hourly under the run's staging prefix.
#   DayParts        the same over the day items, after every hour item (a day
#                   part reads the files the hour parts wrote); skipped when
#                   day_item_count = 0.
#   Publish         {"step":"publish","run_id"}: combines the staged results,
#                   one Delta commit per metric table, moves the watermark;
#                   answers the run's summary with compact_days.
#   Replan          Publish failed with Conflict (another run published since
#                   this one was planned, so the staged parts are from a stale
#                   snapshot): plan again from the start, at most
#                   local.batch_max_replans times, then TooManyConflicts.
#   LoadServingStore {"step":"load","max_dates":40}: brings the serving store
#                   in Redis (the batch view the API reads) up to the metric
#                   tables' newest versions, at most 40 dates per invocation;
#                   answers a report {published, dates, values, bytes,
#                   complete, hourly_version, daily_version, watermark,
#                   dropped, seconds}. Also after CompactOnly and when there is
#                   nothing to compute: an hourly run with nothing to do is
#                   what refills a Redis that lost its data. A load that still
#                   fails after its retries is caught and reported in the
#                   output ($load_failed), never failing the run: the publish
#                   stands, the store keeps serving the state it had (readers
#                   take what it lacks from the lake) and the next run loads
#                   again.
#   MoreToLoad      complete = false (a refill: more dates than one load
#                   takes): load again, at most local.batch_max_loads loads
#                   per execution (the next run carries on).
#   AfterLoad       nothing to compute and nothing to compact: NothingToDo
#                   (succeed); otherwise AnyDaysToCompact.
#   Compact         a distributed Map over compact_days, {"step":"compact",
#                   "day"} each; a failed day is caught and reported in the
#                   output, never failing the run (the next run retries it).
#
# Reprocessing is one plan over all of its hours and one publish: readers see
# the whole range change in one commit per table (the design's contract), and
# a failed reprocess leaves metrics_hourly as it was (its dates are
# recomputed by the next run if customer_hours was committed). So the former input
# fields hours_per_run (runs of N hours, each published on its own) and
# ranges (explicit lists of ranges) are gone: a range is split into parts by
# the plan, not by the caller, and scattered ranges are separate executions.
#
# Two executions may overlap (an hourly run that outlasts the hour, a
# reprocess running beside the hourly schedule): both plan from the same
# snapshot, the first to publish wins and the other's publish reports
# Conflict, so it replans from the new snapshot and publishes only what is
# still to do. A publish is one commit per table made on the version it read
# (another commit in between is a Conflict, never a merge), a retried
# publish finds its own commits and commits nothing again, and a publish that
# stopped after its customer_hours commit has its dates recomputed by the
# next plan: nothing is committed twice and nothing is lost.
#
# Why distributed Maps. Parts: a reprocessed year is 8,760 hours times their
# parts, far over what an inline Map can carry in one execution's 25,000
# history events and 256 KiB of state; each part is a child execution with its
# own history (STANDARD: a part may run up to the function's 15-minute
# timeout, over an express child's 5), and the map run's results go to S3
# (ResultWriter) rather than into the state, so the item count is unbounded.
# Compact: an hourly run has one or two days, but a reprocessed year has 365
# and a longer range more; an inline Map spends ~8 history events per day (more
# with retries), so a few years of days would exhaust the history. A
# distributed Map costs a few seconds of start-up for the hourly run's one day
# and has no such limit; its results (one small object per failed day) stay
# inline.
#
# Errors. Each Lambda call retries Lambda's transient errors (throttling,
# service errors) with jittered backoff, and then any error a few times. Plan,
# Parts and Publish have no Catch on purpose: an execution that still fails
# there fails with the function's own error and cause, and
# `aws stepfunctions redrive-execution` resumes it at that state (for Parts,
# only the map run's failed children run again). Staging expires after
# batch_staging_expiry_days (s3.tf), so redrive within that. LoadServingStore
# and Compact catch theirs: they come after the publish, which stands.
#
# The expressions are JSONata (Step Functions' QueryLanguage); $plan, $run,
# $replans, $published, $hour_parts, $day_parts, $loads, $load, $load_failed
# and $compaction_failed are workflow variables.
# scripts/check_state_machine.py checks the definition's shape and these
# expressions (run by scripts/check-infra.sh).

locals {
  # Publish's Conflict sends the run back to Plan at most this many times.
  batch_max_replans = 3

  # LoadServingStore runs at most this many times per execution (40 dates
  # each: a refill of the default 35-day window takes one); a store still
  # incomplete after them is carried on by the next run.
  batch_max_loads = 20

  # Lambda's own transient errors: retried often, with backoff.
  lambda_transient_errors = [
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "Lambda.TooManyRequestsException",
    "Lambda.ClientExecutionTimeoutException",
  ]

  lambda_transient_retry = {
    ErrorEquals     = local.lambda_transient_errors
    IntervalSeconds = 2
    MaxAttempts     = 8
    BackoffRate     = 2
    MaxDelaySeconds = 120
    JitterStrategy  = "FULL"
  }

  # A step may take up to the function's timeout; the task waits a minute more
  # for the answer before it counts as States.Timeout.
  batch_task_timeout_seconds = var.lambda_timeout_seconds["batch"] + 60

  # {} or {"from","to"} on whole UTC hours with to > from, nothing else. The
  # timestamps are matched as RFC 3339 before $toMillis sees them, so a
  # malformed one is BadInput rather than an expression error.
  batch_input_valid = join(" ", [
    "($i := $states.input;",
    "$ts := /^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$/;",
    "$type($i) != 'object' ? false",
    ": $count($keys($i)) = 0 ? true",
    ": ($count($keys($i)) = 2 and $type($i.from) = 'string' and $type($i.to) = 'string'",
    "and $contains($i.from, $ts) and $contains($i.to, $ts))",
    "? ($toMillis($i.from) % 3600000 = 0 and $toMillis($i.to) % 3600000 = 0",
    "and $toMillis($i.to) > $toMillis($i.from))",
    ": false)",
  ])

  # Each part: one invocation of the batch function with the item as payload.
  batch_part_config = {
    Mode          = "DISTRIBUTED"
    ExecutionType = "STANDARD" # a part may take up to the function's timeout; express children stop at 5 minutes
  }
  batch_part_task = {
    Type     = "Task"
    Resource = "arn:${local.partition}:states:::lambda:invoke"
    Arguments = {
      FunctionName = aws_lambda_alias.live["batch"].arn
      Payload      = "{% $states.input %}" # {"step":"part","run_id","item"}, as the plan wrote it
    }
    TimeoutSeconds = local.batch_task_timeout_seconds
    Retry = [
      local.lambda_transient_retry,
      {
        # A part is idempotent (a retry overwrites its staged result).
        ErrorEquals     = ["States.ALL"]
        IntervalSeconds = 30
        MaxAttempts     = 3
        BackoffRate     = 2
        MaxDelaySeconds = 300
        JitterStrategy  = "FULL"
      },
    ]
    Output = "{% $states.result.Payload %}"
    End    = true
  }


  # The parts maps' results: <lake_prefix>/_staging/<run_id>/parts/<map run>/.
  batch_parts_results_prefix = "'${var.lake_prefix}/${local.lake_staging_dir}/' & $run.run_id & '/parts'"

  batch_definition = {
    Comment       = "tally batch run: plan, parts (distributed), publish, load the serving store, compact; {} = the hourly run, {\"from\",\"to\"} = reprocess whole hours [from, to)"
    QueryLanguage = "JSONata"
    StartAt       = "ValidateInput"
    States = {
      ValidateInput = {
        Type = "Choice"
        Choices = [{
          Condition = "{% ${local.batch_input_valid} %}"
          Next      = "Plan"
          Assign = {
            plan        = "{% $merge([{'step': 'plan'}, $states.input]) %}"
            replans     = 0
            loads       = 0    # LoadServingStore invocations so far
            load        = null # the last load's report
            load_failed = null # {error, cause} of a load that failed for good
          }
        }]
        Default = "BadInput"
      }

      BadInput = {
        Type  = "Fail"
        Error = "BadInput"
        Cause = "Input must be {} (the hourly run) or {\"from\": RFC 3339, \"to\": RFC 3339} (reprocess), both on whole UTC hours with to > from and no other field. hours_per_run and ranges are gone: a range is one plan and one publish; start an execution per range."
      }

      Plan = {
        Type     = "Task"
        Resource = "arn:${local.partition}:states:::lambda:invoke"
        Arguments = {
          FunctionName = aws_lambda_alias.live["batch"].arn
          Payload      = "{% $plan %}"
        }
        TimeoutSeconds = local.batch_task_timeout_seconds
        Retry = [
          local.lambda_transient_retry,
          {
            ErrorEquals     = ["States.ALL"]
            IntervalSeconds = 15
            MaxAttempts     = 2
            BackoffRate     = 2
            JitterStrategy  = "FULL"
          },
        ]
        Assign = {
          run       = "{% $states.result.Payload %}"
          day_parts = null # set by DayParts when the run has day items
        }
        Output = "{% $states.result.Payload %}"
        Next   = "AnythingToDo"
      }

      # Only an explicit 0 skips: an answer without item_count goes on to
      # Parts and fails there, visibly, instead of succeeding with nothing.
      AnythingToDo = {
        Type = "Choice"
        Choices = [
          {
            # nothing to compute, but days left uncompacted (a run that died
            # after its publish): compact them
            Condition = "{% $run.item_count = 0 and $count($run.compact_days) > 0 %}"
            Next      = "CompactOnly"
          },
          {
            # nothing to compute: still load, which refills a Redis that lost
            # its data, then NothingToDo
            Condition = "{% $run.item_count = 0 %}"
            Next      = "LoadServingStore"
          },
        ]
        Default = "HourParts"
      }

      CompactOnly = {
        Type = "Pass"
        Assign = {
          published         = "{% {'compact_days': $run.compact_days} %}"
          compaction_failed = []
          hour_parts        = null
        }
        Next = "LoadServingStore"
      }

      NothingToDo = {
        Type   = "Succeed"
        Output = "{% {'run_id': $run.run_id, 'item_count': 0, 'replans': $replans, 'loads': $loads, 'load': $load, 'load_failed': $load_failed} %}"
      }

      HourParts = {
        Type  = "Map"
        Label = "HourParts"
        ItemReader = {
          Resource     = "arn:${local.partition}:states:::s3:getObject"
          ReaderConfig = { InputType = "JSON" }
          Arguments = {
            Bucket = "{% $run.hour_items.bucket %}"
            Key    = "{% $run.hour_items.key %}"
          }
        }
        ItemProcessor = {
          ProcessorConfig = local.batch_part_config
          StartAt         = "HourPart"
          States          = { HourPart = local.batch_part_task }
        }
        MaxConcurrency             = var.batch_parts_max_concurrency
        ToleratedFailurePercentage = 0
        ResultWriter = {
          Resource = "arn:${local.partition}:states:::s3:putObject"
          Arguments = {
            Bucket = "{% $run.hour_items.bucket %}"
            Prefix = "{% ${local.batch_parts_results_prefix} %}"
          }
        }
        Assign = {
          hour_parts = "{% $states.result %}"
        }
        Output = "{% $states.result %}"
        Next   = "AnyDayParts"
      }

      # A run may have hours and no complete day (most hourly runs).
      AnyDayParts = {
        Type = "Choice"
        Choices = [{
          Condition = "{% $run.day_item_count = 0 %}"
          Next      = "Publish"
        }]
        Default = "DayParts"
      }

      DayParts = {
        Type  = "Map"
        Label = "DayParts"
        ItemReader = {
          Resource     = "arn:${local.partition}:states:::s3:getObject"
          ReaderConfig = { InputType = "JSON" }
          Arguments = {
            Bucket = "{% $run.day_items.bucket %}"
            Key    = "{% $run.day_items.key %}"
          }
        }
        ItemProcessor = {
          ProcessorConfig = local.batch_part_config
          StartAt         = "DayPart"
          States          = { DayPart = local.batch_part_task }
        }
        MaxConcurrency             = var.batch_parts_max_concurrency
        ToleratedFailurePercentage = 0
        ResultWriter = {
          Resource = "arn:${local.partition}:states:::s3:putObject"
          Arguments = {
            Bucket = "{% $run.day_items.bucket %}"
            Prefix = "{% ${local.batch_parts_results_prefix} %}"
          }
        }
        Assign = {
          day_parts = "{% $states.result %}"
        }
        Output = "{% $states.result %}"
        Next   = "Publish"
      }

      Publish = {
        Type     = "Task"
        Resource = "arn:${local.partition}:states:::lambda:invoke"
        Arguments = {
          FunctionName = aws_lambda_alias.live["batch"].arn
          Payload = {
            step   = "publish"
            run_id = "{% $run.run_id %}"
          }
        }
        TimeoutSeconds = local.batch_task_timeout_seconds
        Retry = [
          {
            # Publishing the same stale run again cannot succeed: no retry,
            # the Catch below replans.
            ErrorEquals = ["Conflict"]
            MaxAttempts = 0
          },
          local.lambda_transient_retry,
          {
            ErrorEquals     = ["States.ALL"]
            IntervalSeconds = 30
            MaxAttempts     = 3
            BackoffRate     = 2
            MaxDelaySeconds = 300
            JitterStrategy  = "FULL"
          },
        ]
        Catch = [{
          ErrorEquals = ["Conflict"]
          Next        = "Replan"
        }]
        Assign = {
          published         = "{% $states.result.Payload %}"
          compaction_failed = []
        }
        Output = "{% $states.result.Payload %}"
        Next   = "LoadServingStore"
      }

      Replan = {
        Type = "Choice"
        Choices = [{
          Condition = "{% $replans < ${local.batch_max_replans} %}"
          Next      = "Plan"
          Assign = {
            replans = "{% $replans + 1 %}"
          }
        }]
        Default = "TooManyConflicts"
      }

      TooManyConflicts = {
        Type  = "Fail"
        Error = "TooManyConflicts"
        Cause = "{% 'Publish reported Conflict after the first plan and after each of ' & $string($replans) & ' replans: another batch run published every time before this one could. Nothing of this run reached metrics_hourly (had its customer_hours commit landed, the next run recomputes those dates); its staging expires on its own. Start it again when the other runs are done (for a long reprocess, pause the hourly schedule while it runs). Last conflict: ' & $states.input.Cause %}"
      }

      LoadServingStore = {
        Type     = "Task"
        Resource = "arn:${local.partition}:states:::lambda:invoke"
        Arguments = {
          FunctionName = aws_lambda_alias.live["batch"].arn
          Payload = {
            step      = "load"
            max_dates = 40
          }
        }
        TimeoutSeconds = local.batch_task_timeout_seconds
        Retry = [
          local.lambda_transient_retry,
          {
            # A load is idempotent, and one that lost to another loader
            # (overlapping runs) succeeds when run again.
            ErrorEquals     = ["States.ALL"]
            IntervalSeconds = 10
            MaxAttempts     = 3
            BackoffRate     = 2
            JitterStrategy  = "FULL"
          },
        ]
        # The publish stands: a load that still fails is reported, not fatal.
        # The store keeps serving the state it had, and the next run loads
        # again.
        Catch = [{
          ErrorEquals = ["States.ALL"]
          Next        = "AfterLoad"
          Assign = {
            loads       = "{% $loads + 1 %}"
            load_failed = "{% {'error': $states.errorOutput.Error, 'cause': $states.errorOutput.Cause} %}"
          }
        }]
        Assign = {
          loads = "{% $loads + 1 %}"
          load  = "{% $states.result.Payload %}"
        }
        Output = "{% $states.result.Payload %}"
        Next   = "MoreToLoad"
      }

      # Only an explicit false loads again: a report without `complete` goes on.
      MoreToLoad = {
        Type = "Choice"
        Choices = [{
          Condition = "{% $load.complete = false and $loads < ${local.batch_max_loads} %}"
          Next      = "LoadServingStore"
        }]
        Default = "AfterLoad"
      }

      # The nothing-to-do path (AnythingToDo's item_count = 0 without
      # compact_days) ends here; the others go on to compact.
      AfterLoad = {
        Type = "Choice"
        Choices = [{
          Condition = "{% $run.item_count = 0 and $count($run.compact_days) = 0 %}"
          Next      = "NothingToDo"
        }]
        Default = "AnyDaysToCompact"
      }

      AnyDaysToCompact = {
        Type = "Choice"
        Choices = [{
          Condition = "{% $count($published.compact_days) > 0 %}"
          Next      = "Compact"
        }]
        Default = "Done"
      }

      Compact = {
        Type  = "Map"
        Label = "Compact"
        Items = "{% $published.compact_days %}"
        ItemSelector = {
          step = "compact"
          day  = "{% $states.context.Map.Item.Value %}"
        }
        ItemProcessor = {
          ProcessorConfig = {
            Mode          = "DISTRIBUTED"
            ExecutionType = "STANDARD" # a day's compaction may take up to the function's timeout
          }
          StartAt = "CompactDay"
          States = {
            CompactDay = {
              Type     = "Task"
              Resource = "arn:${local.partition}:states:::lambda:invoke"
              Arguments = {
                FunctionName = aws_lambda_alias.live["batch"].arn
                Payload      = "{% $states.input %}" # {"step":"compact","day"}
              }
              TimeoutSeconds = local.batch_task_timeout_seconds
              Retry = [
                local.lambda_transient_retry,
                {
                  ErrorEquals     = ["States.ALL"]
                  IntervalSeconds = 60
                  MaxAttempts     = 1
                  JitterStrategy  = "FULL"
                },
              ]
              # Compaction is an optimisation: a day that still fails is
              # reported, not fatal; the next run that touches it retries.
              Catch = [{
                ErrorEquals = ["States.ALL"]
                Next        = "CompactDayFailed"
                Output      = "{% {'day': $states.input.day, 'error': $states.errorOutput.Error} %}"
              }]
              Output = {}
              End    = true
            }
            CompactDayFailed = {
              Type = "Pass"
              End  = true
            }
          }
        }
        MaxConcurrency             = var.batch_compact_max_concurrency
        ToleratedFailurePercentage = 100
        Assign = {
          compaction_failed = "{% [$states.result.day] %}"
        }
        # The map itself failing (it should not: every child catches its
        # error) must not fail a run that has already published.
        Catch = [{
          ErrorEquals = ["States.ALL"]
          Next        = "Done"
          Assign = {
            compaction_failed = "{% $published.compact_days %}"
          }
        }]
        Next = "Done"
      }

      Done = {
        Type   = "Succeed"
        Output = "{% {'run_id': $run.run_id, 'item_count': $run.item_count, 'replans': $replans, 'hour_parts_map_run': $hour_parts ? $hour_parts.MapRunArn : null, 'day_parts_map_run': $day_parts ? $day_parts.MapRunArn : null, 'published': $published, 'loads': $loads, 'load': $load, 'load_failed': $load_failed, 'compaction_failed': $compaction_failed} %}"
      }
    }
  }
}

resource "aws_cloudwatch_log_group" "batch_sfn" {
  # /aws/vendedlogs/ keeps CloudWatch Logs' resource policy for vended log
  # delivery small.
  name              = "/aws/vendedlogs/states/${local.batch_state_machine_name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.ops.arn
}

resource "aws_sfn_state_machine" "batch" {
  name       = local.batch_state_machine_name
  type       = "STANDARD"
  role_arn   = aws_iam_role.batch_sfn.arn
  definition = jsonencode(local.batch_definition)

  logging_configuration {
    log_destination        = "${aws_cloudwatch_log_group.batch_sfn.arn}:*"
    include_execution_data = true
    level                  = "ALL"
  }

  tracing_configuration {
    enabled = true
  }

  lifecycle {
    precondition {
      condition     = var.batch_parts_max_concurrency <= var.lambda_reserved_concurrency["batch"] - 2 && var.batch_compact_max_concurrency <= var.lambda_reserved_concurrency["batch"] - 2
      error_message = "batch_parts_max_concurrency (${var.batch_parts_max_concurrency}) and batch_compact_max_concurrency (${var.batch_compact_max_concurrency}) must each be at most lambda_reserved_concurrency.batch (${var.lambda_reserved_concurrency["batch"]}) minus two: one for the every-minute speed-view check, one for the plan, publish or load of an overlapping run."
    }
  }

  depends_on = [aws_iam_role_policy.batch_sfn]
}
