# ---------------------------------------------------------------------------
# Naming, region, tags
# ---------------------------------------------------------------------------

variable "name" {
  description = "Name prefix of every resource of this stack (e.g. tally-prod). Lower case letters, digits and hyphens; it also goes into the lake bucket's name."
  type        = string
  default     = "tally"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,22}[a-z0-9]$", var.name))
    error_message = "name must be 3-24 characters of a-z, 0-9 and '-', starting with a letter and not ending with '-'."
  }
}

variable "region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must look like us-east-1."
  }
}

variable "tags" {
  description = "Extra tags put on every resource (merged into the provider's default_tags)."
  type        = map(string)
  default     = {}
}

# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------

variable "availability_zones" {
  description = "Availability zones (names in var.region) for the private subnets, and so for Redis and the functions' ENIs. At least 2: Redis Multi-AZ keeps its replica in another zone. An explicit list keeps subnets from moving when AWS adds a zone."
  type        = list(string)
  default     = ["us-east-1a", "us-east-1b"]

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 4 && length(distinct(var.availability_zones)) == length(var.availability_zones)
    error_message = "availability_zones must list 2 to 4 distinct zones."
  }

  validation {
    condition     = alltrue([for z in var.availability_zones : startswith(z, var.region)])
    error_message = "Every zone in availability_zones must be in var.region (e.g. us-east-1a for us-east-1)."
  }
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC. Private (and, with NAT, public) subnets are /4 slices of it, so it must be /20 or larger."
  type        = string
  default     = "10.40.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0)) && tonumber(split("/", var.vpc_cidr)[1]) <= 20
    error_message = "vpc_cidr must be a valid IPv4 CIDR block of prefix length /20 or shorter."
  }
}

variable "enable_nat_gateway" {
  description = "Add public subnets, an internet gateway and one NAT gateway per AZ so the functions can reach the internet. Every AWS service the functions use is reached through VPC endpoints, so this is only needed when jwks_url is outside AWS (a public identity provider)."
  type        = bool
  default     = false
}

variable "interface_endpoint_services" {
  description = "AWS services reached from the private subnets through interface VPC endpoints (S3 always has a gateway endpoint). secretsmanager is required: the functions read the Redis AUTH token at cold start."
  type        = list(string)
  default     = ["secretsmanager", "kinesis-streams", "logs"]

  validation {
    condition     = contains(var.interface_endpoint_services, "secretsmanager")
    error_message = "interface_endpoint_services must include secretsmanager (the Redis AUTH token is read from Secrets Manager)."
  }

  validation {
    condition     = alltrue([for s in var.interface_endpoint_services : can(regex("^[a-z0-9.-]+$", s))])
    error_message = "Each entry is a service suffix like secretsmanager or kinesis-streams (com.amazonaws.<region>.<suffix>)."
  }
}

# ---------------------------------------------------------------------------
# Kinesis
# ---------------------------------------------------------------------------

variable "kinesis_stream_mode" {
  description = "ON_DEMAND (pay per GB, scales by itself) or PROVISIONED (pay per shard-hour; cheaper at steady high volume, see docs/DEPLOY.md)."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "PROVISIONED"], var.kinesis_stream_mode)
    error_message = "kinesis_stream_mode must be ON_DEMAND or PROVISIONED."
  }
}

variable "kinesis_shard_count" {
  description = "Shards of the stream when kinesis_stream_mode is PROVISIONED (1 MB/s or 1000 records/s of writes each). Ignored for ON_DEMAND."
  type        = number
  default     = 4

  validation {
    condition     = var.kinesis_shard_count >= 1 && var.kinesis_shard_count <= 10000 && floor(var.kinesis_shard_count) == var.kinesis_shard_count
    error_message = "kinesis_shard_count must be a whole number from 1 to 10000."
  }
}

variable "kinesis_retention_hours" {
  description = "How long the stream keeps records. Longer than 24 h leaves time to replay a batch whose metadata landed in an on-failure queue (the queue gets sequence numbers, not the data)."
  type        = number
  default     = 168

  validation {
    condition     = var.kinesis_retention_hours >= 24 && var.kinesis_retention_hours <= 8760
    error_message = "kinesis_retention_hours must be from 24 to 8760."
  }
}

# ---------------------------------------------------------------------------
# Lake (S3)
# ---------------------------------------------------------------------------

variable "lake_bucket_name" {
  description = "Name of the lake bucket. Null: <name>-lake-<account id>-<region>."
  type        = string
  default     = null

  validation {
    condition     = var.lake_bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.lake_bucket_name))
    error_message = "lake_bucket_name must be a valid S3 bucket name."
  }
}

variable "lake_prefix" {
  description = "Key prefix of the lake inside the bucket: tables live at s3://<bucket>/<lake_prefix>/<table>/."
  type        = string
  default     = "lake"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9_-]{0,62}$", var.lake_prefix))
    error_message = "lake_prefix must be one path segment of a-z, 0-9, '_' and '-'."
  }
}

variable "lake_noncurrent_version_days" {
  description = "Days a noncurrent (overwritten or deleted) object version of the lake is kept before it expires. Delta time travel uses current objects; this is the safety net under VACUUM and operator mistakes."
  type        = number
  default     = 30

  validation {
    condition     = var.lake_noncurrent_version_days >= 1 && var.lake_noncurrent_version_days <= 3650
    error_message = "lake_noncurrent_version_days must be from 1 to 3650."
  }
}

variable "access_log_retention_days" {
  description = "Days S3 server access logs of the lake and artifacts buckets are kept."
  type        = number
  default     = 365

  validation {
    condition     = var.access_log_retention_days >= 1 && var.access_log_retention_days <= 3650
    error_message = "access_log_retention_days must be from 1 to 3650."
  }
}

# ---------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------

variable "log_retention_days" {
  description = "Retention of every CloudWatch log group of the stack (functions, API access logs, Step Functions, VPC flow logs, Redis slow log)."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653)."
  }
}

# ---------------------------------------------------------------------------
# Redis (ElastiCache)
# ---------------------------------------------------------------------------

# Cluster-mode sizing for 1 M merchants (docs/CAPACITY.md): the §4 row "1 M,
# 10 B" (48 h speed view) 29.3 GiB + the §8 row "1 M, 35 days" (serving
# store) 12.9 GB = 12.1 GiB: 41.4 GiB. cache.r7g.xlarge holds 26.32 GiB x 75%
# = 19.7 GiB usable; 3 shards = 59.2 GiB, 70% full (memory alarm at 80%). At
# the §4 row's all-distinct bound (39.8 + 12.1 = 51.9 GiB, 88%) add a shard.
# The application follows the cluster (issue #17: per-slot speed views,
# pipelines split by slot, WAIT for a replica), so cluster mode is the
# default; redis_cluster_mode = false gives the single-shard group, one
# primary + 1 replica of redis_node_type (19.7 GiB usable on
# cache.r7g.xlarge), which holds that load only with a shorter
# speed_ttl_hours or serving_window_days, or a larger redis_node_type.

variable "redis_cluster_mode" {
  description = "Run Redis in cluster mode (redis_shards shards of a primary + 1 replica, clients on the configuration endpoint; the application detects cluster mode and follows the cluster's slots and failovers). Off: one primary + 1 replica, clients on the primary endpoint. Switching an applied stack either way means replacing the replication group (terraform apply -replace, docs/DEPLOY.md, Redis shards)."
  type        = bool
  default     = true
}

variable "redis_node_type" {
  description = "ElastiCache node type of every Redis node (the primary and its replica, or with redis_cluster_mode each shard's); see docs/CAPACITY.md §4 for sizing."
  type        = string
  default     = "cache.r7g.xlarge"

  validation {
    condition     = can(regex("^cache\\.[a-z0-9]+\\.[a-z0-9]+$", var.redis_node_type))
    error_message = "redis_node_type must be an ElastiCache node type such as cache.r7g.large."
  }
}

variable "redis_shards" {
  description = "Shards (node groups) of the Redis cluster, each a primary and one replica of redis_node_type; used only with redis_cluster_mode. Raising it reshards online: ElastiCache moves hash slots to the new shards while serving (docs/DEPLOY.md)."
  type        = number
  default     = 3 # 41.4 GiB / (19.7 GiB usable x 80% alarm) = 2.6, so 3 of cache.r7g.xlarge (see above)

  validation {
    condition     = var.redis_shards >= 1 && var.redis_shards <= 250 && floor(var.redis_shards) == var.redis_shards
    error_message = "redis_shards must be a whole number from 1 to 250 (500 nodes with the replicas, ElastiCache's ceiling)."
  }
}

variable "redis_engine_version" {
  description = "Redis OSS engine version (7.x: TLS and AUTH token rotation)."
  type        = string
  default     = "7.1"

  validation {
    condition     = can(regex("^7\\.[0-9]+$", var.redis_engine_version))
    error_message = "redis_engine_version must be a Redis 7 version such as 7.1."
  }
}

variable "redis_snapshot_retention_days" {
  description = "Days of automatic Redis snapshots kept (the speed view is short-lived, but a snapshot shortens recovery after losing both nodes)."
  type        = number
  default     = 1

  validation {
    condition     = var.redis_snapshot_retention_days >= 1 && var.redis_snapshot_retention_days <= 35
    error_message = "redis_snapshot_retention_days must be from 1 to 35."
  }
}

# ---------------------------------------------------------------------------
# Lambda
# ---------------------------------------------------------------------------

variable "lambda_architecture" {
  description = "Instruction set of the functions; must match the target scripts/package-lambdas.sh built for (arm64 = aarch64-unknown-linux-gnu, Graviton)."
  type        = string
  default     = "arm64"

  validation {
    condition     = contains(["arm64", "x86_64"], var.lambda_architecture)
    error_message = "lambda_architecture must be arm64 or x86_64."
  }
}

variable "lambda_dist_dir" {
  description = "Directory holding tally.zip, the code package of all four functions, from scripts/package-lambdas.sh (its DIST_DIR). Terraform uploads it to the artifacts bucket. Null: <repo>/dist/lambda."
  type        = string
  default     = null
}

variable "batch_query_memory_share" {
  description = "Share of the batch function's memory its queries may hold before they spill to ephemeral storage (TALLY_BATCH_MEMORY)."
  type        = number
  default     = 0.6

  validation {
    condition     = var.batch_query_memory_share > 0 && var.batch_query_memory_share <= 0.9
    error_message = "batch_query_memory_share must be above 0 and at most 0.9 (the runtime needs the rest)."
  }
}

variable "lambda_memory_mb" {
  description = "Memory of each function in MB (CPU scales with it; 1769 MB is one full vCPU)."
  type        = map(number)
  default = {
    speed    = 1024
    archiver = 1024
    batch    = 10240
    api      = 1024
  }

  validation {
    condition     = length(setsubtract(["speed", "archiver", "batch", "api"], keys(var.lambda_memory_mb))) == 0 && alltrue([for v in values(var.lambda_memory_mb) : v >= 128 && v <= 10240])
    error_message = "lambda_memory_mb needs speed, archiver, batch and api, each from 128 to 10240."
  }
}

variable "lambda_timeout_seconds" {
  description = "Timeout of each function in seconds. api is capped at 30 (API Gateway's integration limit); batch at 900 (Lambda's limit)."
  type        = map(number)
  default = {
    speed    = 60
    archiver = 300
    batch    = 900
    api      = 15
  }

  validation {
    condition     = length(setsubtract(["speed", "archiver", "batch", "api"], keys(var.lambda_timeout_seconds))) == 0 && alltrue([for v in values(var.lambda_timeout_seconds) : v >= 1 && v <= 900])
    error_message = "lambda_timeout_seconds needs speed, archiver, batch and api, each from 1 to 900."
  }

  validation {
    condition     = lookup(var.lambda_timeout_seconds, "api", 15) <= 30
    error_message = "lambda_timeout_seconds.api must be at most 30 (API Gateway HTTP API integration timeout)."
  }
}

variable "lambda_reserved_concurrency" {
  description = "Reserved concurrency of each function: a ceiling that keeps one function from starving the others (and the account) and a floor that keeps it runnable. The Kinesis functions need at least one per shard (parallelization factor is 1)."
  type        = map(number)
  default = {
    speed    = 100
    archiver = 100
    batch    = 50 # batch_parts_max_concurrency (40) parts at once, + the speed-view check and an overlapping run
    api      = 200
  }

  validation {
    condition     = length(setsubtract(["speed", "archiver", "batch", "api"], keys(var.lambda_reserved_concurrency))) == 0 && alltrue([for v in values(var.lambda_reserved_concurrency) : v >= 1 && v <= 10000])
    error_message = "lambda_reserved_concurrency needs speed, archiver, batch and api, each from 1 to 10000."
  }
}

variable "lambda_tracing_mode" {
  description = "X-Ray tracing per function: Active (Lambda samples 1 request/s plus 5% of the rest; this cannot be tuned) or PassThrough. At the api function's read load Active is a real cost line (docs/DEPLOY.md)."
  type        = map(string)
  default = {
    speed    = "Active"
    archiver = "Active"
    batch    = "Active"
    api      = "Active"
  }

  validation {
    condition     = length(setsubtract(["speed", "archiver", "batch", "api"], keys(var.lambda_tracing_mode))) == 0 && alltrue([for v in values(var.lambda_tracing_mode) : contains(["Active", "PassThrough"], v)])
    error_message = "lambda_tracing_mode needs speed, archiver, batch and api, each Active or PassThrough."
  }
}

variable "api_provisioned_concurrency" {
  description = "Provisioned concurrency on the api function's live alias (0: none). Removes cold starts (JWKS fetch, Redis TLS handshake) from the read path at a fixed hourly cost."
  type        = number
  default     = 0

  validation {
    condition     = var.api_provisioned_concurrency >= 0 && var.api_provisioned_concurrency <= 1000
    error_message = "api_provisioned_concurrency must be from 0 to 1000."
  }
}

variable "rust_log" {
  description = "RUST_LOG of every function (tracing filter)."
  type        = string
  default     = "info"

  validation {
    condition     = can(regex("^[A-Za-z0-9_:=,.-]+$", var.rust_log))
    error_message = "rust_log must be a tracing filter such as info or info,tally=debug."
  }
}

variable "grace_minutes" {
  description = "TALLY_GRACE_MINUTES: minutes after an hour's end before the batch layer closes it. Keep the batch schedule's minute after it."
  type        = number
  default     = 5

  validation {
    condition     = var.grace_minutes >= 0 && var.grace_minutes <= 55
    error_message = "grace_minutes must be from 0 to 55."
  }
}

variable "serving_window_days" {
  description = "TALLY_SERVING_WINDOW_DAYS: UTC dates of the batch view the serving store in Redis keeps (the API reads older history from S3). About 370 bytes of Redis per merchant active all day, per date (docs/CAPACITY.md)."
  type        = number
  default     = 35

  validation {
    condition     = var.serving_window_days >= 1 && var.serving_window_days <= 400
    error_message = "serving_window_days must be from 1 to 400."
  }
}

variable "speed_ttl_hours" {
  description = "TALLY_SPEED_TTL_HOURS: lifetime of speed-view keys in Redis; must exceed the batch layer's lag."
  type        = number
  default     = 48

  validation {
    condition     = var.speed_ttl_hours >= 3 && var.speed_ttl_hours <= 720
    error_message = "speed_ttl_hours must be from 3 to 720."
  }
}

variable "speed_rebuild_settle_seconds" {
  description = "TALLY_SPEED_REBUILD_SETTLE_SECS: seconds after Redis lost its data before a source that has not written since gets the archive's mark as its rebuild boundary. Must exceed the archiver's lag behind the speed function, or records the speed function applied just before the loss are missing from the speed view until the batch layer covers their hour. Null: archiver_batching_window_seconds + 30 (90 by default). The batch function's timeout must cover it plus 45 s of rebuild plus a margin."
  type        = number
  default     = null

  validation {
    condition     = var.speed_rebuild_settle_seconds == null || try(var.speed_rebuild_settle_seconds >= 0 && var.speed_rebuild_settle_seconds <= 780 && floor(var.speed_rebuild_settle_seconds) == var.speed_rebuild_settle_seconds, false)
    error_message = "speed_rebuild_settle_seconds must be null or a whole number from 0 to 780 (the rebuild then needs up to 45 s more, within Lambda's 900 s)."
  }
}

# ---------------------------------------------------------------------------
# Kinesis event source mappings
# ---------------------------------------------------------------------------

variable "speed_batch_size" {
  description = "Records per speed-layer invocation (each record ~100 events, ~15 KB). Lambda also caps a batch at 6 MB."
  type        = number
  default     = 100

  validation {
    condition     = var.speed_batch_size >= 1 && var.speed_batch_size <= 10000
    error_message = "speed_batch_size must be from 1 to 10000."
  }
}

variable "speed_batching_window_seconds" {
  description = "Seconds the speed layer's event source mapping waits to fill a batch: the speed view's added latency."
  type        = number
  default     = 1

  validation {
    condition     = var.speed_batching_window_seconds >= 0 && var.speed_batching_window_seconds <= 300
    error_message = "speed_batching_window_seconds must be from 0 to 300."
  }
}

variable "archiver_batch_size" {
  description = "Records per archiver invocation. Larger batches mean larger Parquet files and fewer Delta commits (the commit log is one sequence per table)."
  type        = number
  default     = 1000

  validation {
    condition     = var.archiver_batch_size >= 1 && var.archiver_batch_size <= 10000
    error_message = "archiver_batch_size must be from 1 to 10000."
  }
}

variable "archiver_batching_window_seconds" {
  description = "Seconds the archiver's event source mapping waits to fill a batch (raw_events is read by the hourly batch, so minutes are fine)."
  type        = number
  default     = 60

  validation {
    condition     = var.archiver_batching_window_seconds >= 0 && var.archiver_batching_window_seconds <= 300
    error_message = "archiver_batching_window_seconds must be from 0 to 300."
  }
}

variable "esm_maximum_retry_attempts" {
  description = "Retries of a failing Kinesis batch (after bisecting) before its metadata goes to the on-failure queue. Bounded: infinite retries (-1) would block the shard."
  type        = number
  default     = 10

  validation {
    condition     = var.esm_maximum_retry_attempts >= 0 && var.esm_maximum_retry_attempts <= 10000
    error_message = "esm_maximum_retry_attempts must be from 0 to 10000."
  }
}

variable "speed_maximum_record_age_seconds" {
  description = "Records older than this are skipped by the speed layer (to its on-failure queue): once the batch layer has covered an hour, the speed view of it is no longer read."
  type        = number
  default     = 21600

  validation {
    condition     = var.speed_maximum_record_age_seconds >= 60 && var.speed_maximum_record_age_seconds <= 604800
    error_message = "speed_maximum_record_age_seconds must be from 60 to 604800."
  }
}

variable "archiver_maximum_record_age_seconds" {
  description = "Records older than this are skipped by the archiver. -1 (default): never skip by age, raw_events is the master dataset; retries are still bounded by esm_maximum_retry_attempts."
  type        = number
  default     = -1

  validation {
    condition     = var.archiver_maximum_record_age_seconds == -1 || (var.archiver_maximum_record_age_seconds >= 60 && var.archiver_maximum_record_age_seconds <= 604800)
    error_message = "archiver_maximum_record_age_seconds must be -1 or from 60 to 604800."
  }
}

# ---------------------------------------------------------------------------
# Batch schedule and the batch state machine
# ---------------------------------------------------------------------------

variable "batch_schedule_expression" {
  description = "EventBridge Scheduler expression of the hourly batch run, which starts an execution of the batch state machine with {} (UTC). Default: 7 minutes past every hour, after the 5-minute grace."
  type        = string
  default     = "cron(7 * * * ? *)"

  validation {
    condition     = can(regex("^(cron|rate)\\(.+\\)$", var.batch_schedule_expression))
    error_message = "batch_schedule_expression must be cron(...) or rate(...)."
  }
}

variable "speed_rebuild_schedule_expression" {
  description = "EventBridge Scheduler expression of the speed-view check: the batch function is invoked with {\"speed_rebuild\": true} and rebuilds the Redis speed view from raw_events when Redis lost its data. How long after a loss merchants see the current hours as partial is about this interval plus speed_rebuild_settle_seconds."
  type        = string
  default     = "rate(1 minute)"

  validation {
    condition     = can(regex("^(cron|rate)\\(.+\\)$", var.speed_rebuild_schedule_expression))
    error_message = "speed_rebuild_schedule_expression must be cron(...) or rate(...)."
  }
}

variable "batch_parts_max_concurrency" {
  description = "How many parts of a batch run (hourly or reprocess) the state machine computes at once, each a batch function invocation (a child execution of its distributed Map). At most lambda_reserved_concurrency.batch minus two: one for the every-minute speed-view check, one for the plan or publish of an overlapping run."
  type        = number
  default     = 40

  validation {
    condition     = var.batch_parts_max_concurrency >= 1 && var.batch_parts_max_concurrency <= 1000
    error_message = "batch_parts_max_concurrency must be from 1 to 1000."
  }
}

variable "batch_compact_max_concurrency" {
  description = "How many days' compactions the state machine runs at once after a publish (one for an hourly run, up to every day of a reprocessed range). Same bound as batch_parts_max_concurrency."
  type        = number
  default     = 8

  validation {
    condition     = var.batch_compact_max_concurrency >= 1 && var.batch_compact_max_concurrency <= 1000
    error_message = "batch_compact_max_concurrency must be from 1 to 1000."
  }
}

variable "batch_staging_expiry_days" {
  description = "Days after which objects under <lake_prefix>/_staging/ (a batch run's item list, staged part results and map results) expire. A finished run needs none of it; a failed one can be redriven only while its staging is there."
  type        = number
  default     = 7

  validation {
    condition     = var.batch_staging_expiry_days >= 1 && var.batch_staging_expiry_days <= 365
    error_message = "batch_staging_expiry_days must be from 1 to 365."
  }
}

# ---------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------

variable "jwt_issuer" {
  description = "Issuer (iss) the API Gateway JWT authorizer accepts; its /.well-known/openid-configuration must be public."
  type        = string

  validation {
    condition     = can(regex("^https://[^ ]+$", var.jwt_issuer))
    error_message = "jwt_issuer must be an https URL."
  }
}

variable "jwt_audience" {
  description = "Audiences (aud) the JWT authorizer accepts."
  type        = list(string)

  validation {
    condition     = length(var.jwt_audience) >= 1 && alltrue([for a in var.jwt_audience : length(a) > 0])
    error_message = "jwt_audience must list at least one non-empty audience."
  }
}

variable "jwks_url" {
  description = "TALLY_JWKS of the api function: URL of the RS256 JWKS it verifies tokens with again (normally the issuer's jwks_uri). Outside AWS it needs enable_nat_gateway = true."
  type        = string

  validation {
    condition     = can(regex("^https://[^ ]+$", var.jwks_url))
    error_message = "jwks_url must be an https URL."
  }
}

variable "api_throttling_rate_limit" {
  description = "Steady requests per second the API's default stage allows (account limits apply on top)."
  type        = number
  default     = 5000

  validation {
    condition     = var.api_throttling_rate_limit >= 1 && var.api_throttling_rate_limit <= 100000
    error_message = "api_throttling_rate_limit must be from 1 to 100000."
  }
}

variable "api_throttling_burst_limit" {
  description = "Burst of requests the API's default stage allows."
  type        = number
  default     = 5000

  validation {
    condition     = var.api_throttling_burst_limit >= 1 && var.api_throttling_burst_limit <= 100000
    error_message = "api_throttling_burst_limit must be from 1 to 100000."
  }
}

variable "api_public_route_rate_limit" {
  description = "Requests per second allowed on each unauthenticated route (/health, /ready, /openapi.json); /ready touches S3 and Redis, so it is kept small."
  type        = number
  default     = 20

  validation {
    condition     = var.api_public_route_rate_limit >= 1 && var.api_public_route_rate_limit <= 10000
    error_message = "api_public_route_rate_limit must be from 1 to 10000."
  }
}

# ---------------------------------------------------------------------------
# Deployment
# ---------------------------------------------------------------------------

variable "deployment_configs" {
  description = "CodeDeploy deployment configuration per function: how the live alias shifts to a new version. Rolled back automatically when one of the function's alarms fires."
  type        = map(string)
  default = {
    api      = "CodeDeployDefault.LambdaLinear10PercentEvery1Minute"
    speed    = "CodeDeployDefault.LambdaCanary10Percent5Minutes"
    archiver = "CodeDeployDefault.LambdaCanary10Percent5Minutes"
    batch    = "CodeDeployDefault.LambdaAllAtOnce"
  }

  validation {
    condition     = length(setsubtract(["speed", "archiver", "batch", "api"], keys(var.deployment_configs))) == 0 && alltrue([for v in values(var.deployment_configs) : can(regex("^CodeDeployDefault\\.Lambda(AllAtOnce|Canary10Percent(5|10|15|30)Minutes|Linear10PercentEvery(1|2|3|10)Minutes?)$", v))])
    error_message = "deployment_configs needs speed, archiver, batch and api, each a CodeDeployDefault.Lambda* configuration."
  }
}

# ---------------------------------------------------------------------------
# Alarms
# ---------------------------------------------------------------------------

variable "alarm_email" {
  description = "E-mail address subscribed to the alarm topic (confirm the subscription mail). Null: subscribe something else to the topic output."
  type        = string
  default     = null

  validation {
    condition     = var.alarm_email == null || can(regex("^[^@ ]+@[^@ ]+\\.[^@ ]+$", var.alarm_email))
    error_message = "alarm_email must be an e-mail address."
  }
}

variable "speed_iterator_age_alarm_seconds" {
  description = "Alarm when the speed layer's Kinesis iterator age (how far behind the stream it is) exceeds this."
  type        = number
  default     = 60

  validation {
    condition     = var.speed_iterator_age_alarm_seconds >= 1
    error_message = "speed_iterator_age_alarm_seconds must be positive."
  }
}

variable "archiver_iterator_age_alarm_seconds" {
  description = "Alarm when the archiver's Kinesis iterator age exceeds this (it batches for archiver_batching_window_seconds, so it runs further behind than the speed layer)."
  type        = number
  default     = 900

  validation {
    condition     = var.archiver_iterator_age_alarm_seconds >= 1
    error_message = "archiver_iterator_age_alarm_seconds must be positive."
  }
}

variable "watermark_lag_alarm_seconds" {
  description = "Alarm when Tally/BatchWatermarkLagSeconds exceeds this. A healthy hourly run leaves a lag of about grace + run time and at most ~65 minutes just before the next run; the default fires when an hour is missed."
  type        = number
  default     = 5400

  validation {
    condition     = var.watermark_lag_alarm_seconds >= 600
    error_message = "watermark_lag_alarm_seconds must be at least 600."
  }
}

variable "watermark_lag_metric_dimensions" {
  description = "Dimensions the batch job's embedded-metric-format record gives Tally/BatchWatermarkLagSeconds. An alarm matches only the exact dimension set, so keep this equal to what the job emits (none by default)."
  type        = map(string)
  default     = {}
}

variable "api_5xx_alarm_percent" {
  description = "Alarm when more than this percentage of API requests end in 5xx over 5 minutes (also the api function's rollback trigger during a deployment)."
  type        = number
  default     = 1

  validation {
    condition     = var.api_5xx_alarm_percent > 0 && var.api_5xx_alarm_percent <= 100
    error_message = "api_5xx_alarm_percent must be in (0, 100]."
  }
}
