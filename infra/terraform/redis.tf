# The speed view and the serving store: ElastiCache for Redis OSS in cluster
# mode, redis_shards shards (node groups) of a primary and one replica in
# different AZs with automatic failover, TLS in transit, KMS at rest and an
# AUTH token. Every key of one merchant shares the hash tag {merchant_id}, so a
# merchant's commands and scripts touch one slot of one shard. The functions
# get one rediss:// URL, the configuration endpoint; the application detects
# cluster mode from the node it is given. More shards: raise redis_shards
# (online resharding, see docs/DEPLOY.md).

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
  # Named apart from the earlier non-cluster group (-redis7), which the old
  # replication group uses until a stack moving to cluster mode replaces it
  # (docs/DEPLOY.md).
  name        = "${var.name}-redis7-cluster"
  family      = "redis7"
  description = "tally speed view and serving store, cluster mode"

  parameter {
    name  = "cluster-enabled"
    value = "yes"
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
  description          = "tally speed view and serving store (cluster mode)"

  engine               = "redis"
  engine_version       = var.redis_engine_version
  node_type            = var.redis_node_type
  parameter_group_name = aws_elasticache_parameter_group.redis.name
  port                 = 6379

  # Shards of a primary + 1 replica. ElastiCache spreads the nodes over the
  # subnet group's zones, a shard's replica away from its primary (Multi-AZ).
  cluster_mode               = "enabled"
  num_node_groups            = var.redis_shards
  replicas_per_node_group    = 1
  automatic_failover_enabled = true
  multi_az_enabled           = true

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
