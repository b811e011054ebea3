# The network: a VPC with one private subnet per AZ for the functions and
# Redis, and VPC endpoints for every AWS service the functions call, so no
# traffic to AWS needs a NAT.
#
# Why endpoints rather than a NAT gateway: the bulk of the stack's bytes are
# the archiver's and batch job's S3 reads and writes (hundreds of GB a day at
# 10 billion events a day). Through the S3 gateway endpoint that traffic is
# free; through a NAT it would pay $0.045/GB processing on top of the NAT's
# hourly charge, and it would leave the VPC's private address space. The few
# interface endpoints cost ~$7.30 per AZ per month each. A NAT is still
# available (enable_nat_gateway) for the one call that may leave AWS: the api
# function fetching the identity provider's JWKS.

resource "aws_vpc" "main" {
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true # private DNS of the interface endpoints

  tags = { Name = "${var.name}-vpc" }
}

# The default security group allows nothing; every resource gets its own.
resource "aws_default_security_group" "default" {
  vpc_id = aws_vpc.main.id
  tags   = { Name = "${var.name}-default-deny" }
}

resource "aws_subnet" "private" {
  count = local.az_count

  vpc_id                  = aws_vpc.main.id
  availability_zone       = local.azs[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, 4, count.index)
  map_public_ip_on_launch = false

  tags = { Name = "${var.name}-private-${local.azs[count.index]}", Tier = "private" }
}

resource "aws_route_table" "private" {
  count  = local.az_count
  vpc_id = aws_vpc.main.id
  tags   = { Name = "${var.name}-private-${local.azs[count.index]}" }
}

resource "aws_route_table_association" "private" {
  count          = local.az_count
  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private[count.index].id
}

# --- optional egress to the internet (only for a JWKS outside AWS) ----------

resource "aws_subnet" "public" {
  count = var.enable_nat_gateway ? local.az_count : 0

  vpc_id                  = aws_vpc.main.id
  availability_zone       = local.azs[count.index]
  cidr_block              = cidrsubnet(var.vpc_cidr, 4, 8 + count.index)
  map_public_ip_on_launch = false # only the NAT gateways live here, on Elastic IPs

  tags = { Name = "${var.name}-public-${local.azs[count.index]}", Tier = "public" }
}

resource "aws_internet_gateway" "main" {
  count  = var.enable_nat_gateway ? 1 : 0
  vpc_id = aws_vpc.main.id
  tags   = { Name = "${var.name}-igw" }
}

resource "aws_route_table" "public" {
  count  = var.enable_nat_gateway ? 1 : 0
  vpc_id = aws_vpc.main.id
  tags   = { Name = "${var.name}-public" }
}

resource "aws_route" "public_internet" {
  count                  = var.enable_nat_gateway ? 1 : 0
  route_table_id         = aws_route_table.public[0].id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.main[0].id
}

resource "aws_route_table_association" "public" {
  count          = var.enable_nat_gateway ? local.az_count : 0
  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public[0].id
}

resource "aws_eip" "nat" {
  count  = var.enable_nat_gateway ? local.az_count : 0
  domain = "vpc"
  tags   = { Name = "${var.name}-nat-${local.azs[count.index]}" }
}

# One NAT per AZ so losing an AZ does not cut the others off.
resource "aws_nat_gateway" "main" {
  count         = var.enable_nat_gateway ? local.az_count : 0
  allocation_id = aws_eip.nat[count.index].id
  subnet_id     = aws_subnet.public[count.index].id
  tags          = { Name = "${var.name}-nat-${local.azs[count.index]}" }

  depends_on = [aws_internet_gateway.main]
}

resource "aws_route" "private_nat" {
  count                  = var.enable_nat_gateway ? local.az_count : 0
  route_table_id         = aws_route_table.private[count.index].id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.main[count.index].id
}

# The api function fetches jwks_url at cold start. Without a NAT it can only
# reach AWS services that have an interface endpoint here (for instance
# cognito-idp, if added to interface_endpoint_services).
check "jwks_reachable" {
  assert {
    condition = var.enable_nat_gateway || try(contains(
      var.interface_endpoint_services,
      regex("^https://([a-z0-9-]+)\\.[a-z0-9-]+\\.amazonaws\\.com/", var.jwks_url)[0],
    ), false)
    error_message = "jwks_url (${var.jwks_url}) is not reachable from the private subnets: enable_nat_gateway is false and its host is not an AWS service with an interface endpoint in interface_endpoint_services. The api function would fail to verify tokens. Set enable_nat_gateway = true."
  }
}

# --- VPC endpoints -------------------------------------------------------------

# Endpoint policy: an identity perimeter. Only principals of this account may
# use the endpoints, so credentials from another account cannot be used from
# inside the VPC to copy data out through them.
locals {
  endpoint_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "OnlyThisAccountsPrincipals"
      Effect    = "Allow"
      Principal = "*"
      Action    = "*"
      Resource  = "*"
      Condition = { StringEquals = { "aws:PrincipalAccount" = local.account_id } }
    }]
  })
}

resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.main.id
  service_name      = "com.amazonaws.${local.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = aws_route_table.private[*].id
  policy            = local.endpoint_policy

  tags = { Name = "${var.name}-s3" }
}

resource "aws_vpc_endpoint" "interface" {
  for_each = toset(var.interface_endpoint_services)

  vpc_id              = aws_vpc.main.id
  service_name        = "com.amazonaws.${local.region}.${each.value}"
  vpc_endpoint_type   = "Interface"
  private_dns_enabled = true
  subnet_ids          = aws_subnet.private[*].id
  security_group_ids  = [aws_security_group.endpoints.id]
  policy              = local.endpoint_policy

  tags = { Name = "${var.name}-${each.value}" }
}

# --- security groups -------------------------------------------------------------

resource "aws_security_group" "lambda" {
  name        = "${var.name}-lambda"
  description = "tally functions: egress to Redis, the VPC endpoints and S3 only"
  vpc_id      = aws_vpc.main.id
  tags        = { Name = "${var.name}-lambda" }
}

resource "aws_security_group" "redis" {
  name        = "${var.name}-redis"
  description = "tally Redis: TLS port from the functions only"
  vpc_id      = aws_vpc.main.id
  tags        = { Name = "${var.name}-redis" }
}

resource "aws_security_group" "endpoints" {
  name        = "${var.name}-endpoints"
  description = "tally interface VPC endpoints: HTTPS from the functions only"
  vpc_id      = aws_vpc.main.id
  tags        = { Name = "${var.name}-endpoints" }
}

resource "aws_vpc_security_group_egress_rule" "lambda_to_redis" {
  security_group_id            = aws_security_group.lambda.id
  description                  = "Redis (TLS) on the ElastiCache replication group"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = aws_security_group.redis.id
}

resource "aws_vpc_security_group_egress_rule" "lambda_to_endpoints" {
  security_group_id            = aws_security_group.lambda.id
  description                  = "HTTPS to the interface VPC endpoints"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.endpoints.id
}

resource "aws_vpc_security_group_egress_rule" "lambda_to_s3" {
  security_group_id = aws_security_group.lambda.id
  description       = "HTTPS to S3 through the gateway endpoint"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  prefix_list_id    = aws_vpc_endpoint.s3.prefix_list_id
}

resource "aws_vpc_security_group_egress_rule" "lambda_to_internet" {
  count = var.enable_nat_gateway ? 1 : 0

  security_group_id = aws_security_group.lambda.id
  description       = "HTTPS through the NAT gateways (the identity provider's JWKS)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_lambda" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis (TLS) from the tally functions"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = aws_security_group.lambda.id
}

resource "aws_vpc_security_group_ingress_rule" "endpoints_from_lambda" {
  security_group_id            = aws_security_group.endpoints.id
  description                  = "HTTPS from the tally functions"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = aws_security_group.lambda.id
}

# --- flow logs ---------------------------------------------------------------------

resource "aws_cloudwatch_log_group" "flow_logs" {
  name              = "/tally/${var.name}/vpc-flow-logs"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.ops.arn
}

resource "aws_flow_log" "main" {
  vpc_id                   = aws_vpc.main.id
  traffic_type             = "ALL"
  log_destination_type     = "cloud-watch-logs"
  log_destination          = aws_cloudwatch_log_group.flow_logs.arn
  iam_role_arn             = aws_iam_role.flow_logs.arn
  max_aggregation_interval = 600
}
