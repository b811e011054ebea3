# Root module of tally on AWS. See docs/DEPLOY.md for how to package, plan,
# apply, roll back and reprocess.

terraform {
  # 1.10 brings S3-native state locking (use_lockfile), so no DynamoDB lock
  # table is needed for the state either.
  required_version = ">= 1.10"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.x late enough for rotation_period_in_days, logging_config on
      # functions, the per-rule security group resources and cluster_mode on
      # the replication group (5.59); nothing here uses a 6.x-only argument
      # or one that 6.x removed.
      version = ">= 5.60, < 7.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.6, < 4.0"
    }
  }

  # Partial configuration: pass the bucket, key and region with
  # `terraform init -backend-config=backend.hcl` (see backend.hcl.example).
  backend "s3" {}
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, {
      Project   = "tally"
      Stack     = var.name
      ManagedBy = "terraform"
    })
  }
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

# Only to check that the configured zones exist and are available here.
data "aws_availability_zones" "configured" {
  state = "available"

  filter {
    name   = "zone-name"
    values = var.availability_zones
  }

  lifecycle {
    postcondition {
      condition     = length(self.names) == length(var.availability_zones)
      error_message = "Some of availability_zones are not available zones of ${var.region}: ${join(", ", var.availability_zones)}."
    }
  }
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  region     = var.region
  azs        = var.availability_zones
  az_count   = length(var.availability_zones)
}
