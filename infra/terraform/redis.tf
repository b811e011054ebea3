# The speed view and the serving store: ElastiCache for Redis OSS, TLS in
# transit, KMS at rest and an AUTH token, in one of two shapes:
#
#   - redis_cluster_mode = false: cluster mode off, a primary
#     and one replica in different AZs with automatic failover. The functions
#     get one rediss:// URL, the primary endpoint (it follows a failover).
#   - redis_cluster_mode = true (the default): cluster mode, redis_shards shards (node
#     groups) of a primary and one replica in different AZs with automatic
#     failover. A merchant's keys share one hash tag (its speed-view
#     bucket's, or {merchant_id} in the serving store), so a merchant's
#     commands and scripts touch one slot of one shard. The
#     functions get the configuration endpoint. More shards: raise
#     redis_shards (online resharding, see docs/DEPLOY.md).
#
# The application detects cluster mode on the endpoint it is given (INFO
# cluster) and uses a cluster client: every script touches one slot (the
# speed view keeps a view key per bucket of merchants, in the bucket's slot),
# pipelines are split by slot, and each
# speed batch waits for a replica (WAIT 1) before it counts as applied
# (speed-layer/src/redis_conn.rs, redis_store.rs; issue #17).

locals {
  # What the functions connect to (TALLY_REDIS_URL) and the redis_endpoint
  # output: the primary endpoint (follows a failover), or the configuration
  # endpoint from which a cluster client learns the shards.
  redis_endpoint_address = var.redis_cluster_mode ? aws_elasticache_replication_group.redis.configuration_endpoint_address : aws_elasticache_replication_group.redis.primary_endpoint_address
}

resource "random_password" "redis_auth" {
  length  = 64
  special = true
  # ElastiCache AUTH tokens: printable ASCII without space, ", / or @.
  override_special = "!&#$^<>-"
  min_special      = 2
  min_numeric      = 2
  min_upper        = 2
  min_lower        = 2

  # Change this value (any string) to rotate the token: Terraform sets the new
  # token with auth_token_update_strategy = ROTATE (old and new both accepted)
  # and the secret's new version; functions pick it up at their next cold
  # start. See docs/DEPLOY.md.
  keepers = {
    rotation = "1"
  }
}

resource "aws_secretsmanager_secret" "redis_auth" {
  #checkov:skip=CKV2_AWS_57:The token is rotated by Terraform (random_password keepers + ElastiCache ROTATE strategy, see docs/DEPLOY.md), not by a Secrets Manager rotation Lambda: ElastiCache offers no managed rotation function for a replication-group AUTH token, and a custom one would have to coordinate with the ROTATE/SET steps Terraform already performs.
  name                    = "${var.name}/redis-auth-token"
  description             = "AUTH token of the ${var.name} Redis replication group; read by the speed, batch and api functions at cold start (TALLY_REDIS_AUTH_SECRET_ARN)."
  kms_key_id              = aws_kms_key.data.arn
  recovery_window_in_days = 7
}

resource "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id     = aws_secretsmanager_secret.redis_auth.id
  secret_string = random_password.redis_auth.result
}

resource "aws_elasticache_subnet_group" "redis" {
  name        = "${var.name}-redis"
  description = "Private subnets of ${var.name}"
  subnet_ids  = aws_subnet.private[*].id
}

resource "aws_elasticache_parameter_group" "redis" {
  # The cluster-mode group is named apart from the non-cluster one (-redis7),
  # which a stack's replication group uses until a move to cluster mode
  # replaces both (docs/DEPLOY.md).
  name        = var.redis_cluster_mode ? "${var.name}-redis7-cluster" : "${var.name}-redis7"
  family      = "redis7"
  description = var.redis_cluster_mode ? "tally speed view and serving store, cluster mode" : "tally speed view and serving store"

  dynamic "parameter" {
    for_each = var.redis_cluster_mode ? [1] : []
    content {
      name  = "cluster-enabled"
      value = "yes"
    }
  }

  # Never evict: an evicted counter is a silent loss that readers cannot tell
  # from "no events" (the view key only reveals a server that lost everything),
  # and an evicted serving-store value would read as "no rows" (the loader
  # refuses any other policy). A full server refuses writes instead; the speed
  # consumers retry and lag, a load fails (the API keeps the last one), the
  # memory alarm fires. Speed-view keys expire by their TTL; the serving
  # store's are removed by the loads as dates leave serving_window_days.
  parameter {
    name  = "maxmemory-policy"
    value = "noeviction"
  }
}

resource "aws_cloudwatch_log_group" "redis_slow" {
  name              = "/tally/${var.name}/redis/slow-log"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.ops.arn
}

resource "aws_elasticache_replication_group" "redis" {
  replication_group_id = "${var.name}-speed"
  description          = var.redis_cluster_mode ? "tally speed view and serving store (cluster mode)" : "tally speed view (current hours' counters)"

  engine               = "redis"
  engine_version       = var.redis_engine_version
  node_type            = var.redis_node_type
  parameter_group_name = aws_elasticache_parameter_group.redis.name
  port                 = 6379

  # Cluster mode off: primary + 1 replica in the first two zones. Cluster
  # mode: shards of a primary + 1 replica; ElastiCache spreads the nodes over
  # the subnet group's zones, a shard's replica away from its primary
  # (Multi-AZ). The arguments of the other shape are null (unset): the
  # provider refuses num_cache_clusters beside num_node_groups or
  # replicas_per_node_group.
  cluster_mode                = var.redis_cluster_mode ? "enabled" : "disabled"
  num_cache_clusters          = var.redis_cluster_mode ? null : 2 # primary + 1 replica
  preferred_cache_cluster_azs = var.redis_cluster_mode ? null : slice(local.azs, 0, 2)
  num_node_groups             = var.redis_cluster_mode ? var.redis_shards : null
  replicas_per_node_group     = var.redis_cluster_mode ? 1 : null
  automatic_failover_enabled  = true
  multi_az_enabled            = true

  subnet_group_name  = aws_elasticache_subnet_group.redis.name
  security_group_ids = [aws_security_group.redis.id]

  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.data.arn
  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  auth_token                 = random_password.redis_auth.result
  auth_token_update_strategy = "ROTATE"

  snapshot_retention_limit   = var.redis_snapshot_retention_days
  snapshot_window            = "03:00-04:00"
  maintenance_window         = "sun:04:30-sun:05:30"
  auto_minor_version_upgrade = true
  apply_immediately          = false

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.redis_slow.name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "slow-log"
  }
}
