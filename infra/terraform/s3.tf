# The lake bucket: the Delta tables raw_events, quarantine, metrics_hourly,
# metrics_quarter_hourly, metrics_daily, customer_hours and merchants under
# s3://<bucket>/<lake_prefix>/, and the batch runs' staging area
# <lake_prefix>/_staging/ (expired by a lifecycle rule). Delta commits use S3
# conditional writes (If-None-Match on the next _delta_log entry), so no lock
# table is needed. Plus a bucket that receives the server access logs of the
# lake and of the artifacts bucket, and the artifacts bucket: the functions'
# code package, which is too large for a direct upload to Lambda (lambda.tf).

locals {
  lake_bucket_name      = coalesce(var.lake_bucket_name, "${var.name}-lake-${local.account_id}-${local.region}")
  artifacts_bucket_name = "${var.name}-artifacts-${local.account_id}-${local.region}"
  lake_uri              = "s3://${aws_s3_bucket.lake.bucket}/${var.lake_prefix}"
  lake_tables           = ["raw_events", "quarantine", "metrics_hourly", "metrics_quarter_hourly", "metrics_daily", "customer_hours", "merchants"]
}

resource "aws_s3_bucket" "lake" {
  #checkov:skip=CKV_AWS_144:Cross-region replication is a disaster-recovery decision that doubles storage and adds per-GB transfer on the largest cost line; the stack is single-region by design (S3 stores across >= 3 AZs, versioning below protects against deletes). Add a replication configuration where the DR policy asks for it.
  #checkov:skip=CKV2_AWS_62:Nothing consumes object-level events: the batch layer finds changed partitions from the Delta log itself, which is the only correct source (an object may land without being committed).
  bucket = local.lake_bucket_name
}

resource "aws_s3_bucket_ownership_controls" "lake" {
  bucket = aws_s3_bucket.lake.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "lake" {
  bucket                  = aws_s3_bucket.lake.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "lake" {
  bucket = aws_s3_bucket.lake.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "lake" {
  bucket = aws_s3_bucket.lake.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.data.arn
    }
    # One data key per bucket and period instead of a KMS call per object:
    # at millions of small Parquet and _delta_log objects a day this is most
    # of the KMS bill.
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "lake" {
  bucket = aws_s3_bucket.lake.id

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}

    # VACUUM and compaction delete files that no Delta version needs any
    # more; versioning keeps them recoverable for this long.
    noncurrent_version_expiration {
      noncurrent_days = var.lake_noncurrent_version_days
    }
    expiration {
      expired_object_delete_marker = true
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  rule {
    id     = "raw-events-intelligent-tiering"
    status = "Enabled"
    filter {
      prefix = "${var.lake_prefix}/raw_events/"
    }
    # Closed, compacted raw partitions are read again only by reprocessing.
    transition {
      days          = 30
      storage_class = "INTELLIGENT_TIERING"
    }
  }

  rule {
    id     = "expire-batch-staging"
    status = "Enabled"
    filter {
      prefix = "${var.lake_prefix}/${local.lake_staging_dir}/"
    }
    # A batch run's scratch space (the plan's item list, the parts' staged
    # results, the parts map's results) under _staging/<run_id>/. A finished
    # run needs none of it; a run that died, failed or was replanned leaves it
    # behind, and a failed run can be redriven only while it is here.
    expiration {
      days = var.batch_staging_expiry_days
    }
    # Scratch is not worth keeping as noncurrent versions for
    # lake_noncurrent_version_days.
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.lake]
}

resource "aws_s3_bucket_logging" "lake" {
  bucket        = aws_s3_bucket.lake.id
  target_bucket = aws_s3_bucket.access_logs.id
  target_prefix = "s3-access/${local.lake_bucket_name}/"
}

resource "aws_s3_bucket_policy" "lake" {
  bucket = aws_s3_bucket.lake.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [aws_s3_bucket.lake.arn, "${aws_s3_bucket.lake.arn}/*"]
        Condition = { Bool = { "aws:SecureTransport" = "false" } }
      },
      {
        Sid       = "DenyOldTls"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [aws_s3_bucket.lake.arn, "${aws_s3_bucket.lake.arn}/*"]
        Condition = { NumericLessThan = { "s3:TlsVersion" = "1.2" } }
      },
      {
        # Objects get SSE-KMS by default; refuse an explicit request for
        # anything weaker.
        Sid       = "DenyNonKmsEncryptionHeader"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:PutObject"
        Resource  = "${aws_s3_bucket.lake.arn}/*"
        Condition = {
          StringNotEqualsIfExists = { "s3:x-amz-server-side-encryption" = "aws:kms" }
          Null                    = { "s3:x-amz-server-side-encryption" = "false" }
        }
      },
    ]
  })

  depends_on = [aws_s3_bucket_public_access_block.lake]
}

# --- access log bucket ------------------------------------------------------------

resource "aws_s3_bucket" "access_logs" {
  #checkov:skip=CKV_AWS_144:Access logs of a single-region stack; replicating them is a DR choice left with the lake's (see the lake bucket).
  #checkov:skip=CKV_AWS_145:S3 server access log delivery supports only SSE-S3 on the target bucket, not SSE-KMS; the bucket is encrypted with SSE-S3 (AES256) below.
  #checkov:skip=CKV2_AWS_62:Nothing consumes events of log objects.
  bucket = "${local.lake_bucket_name}-logs"
}

resource "aws_s3_bucket_ownership_controls" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "access_logs" {
  bucket                  = aws_s3_bucket.access_logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}

    expiration {
      days = var.access_log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.access_logs]
}

resource "aws_s3_bucket_policy" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "S3ServerAccessLogsFromTheLakeAndArtifacts"
        Effect    = "Allow"
        Principal = { Service = "logging.s3.amazonaws.com" }
        Action    = "s3:PutObject"
        Resource  = "${aws_s3_bucket.access_logs.arn}/s3-access/*"
        Condition = {
          ArnLike      = { "aws:SourceArn" = [aws_s3_bucket.lake.arn, aws_s3_bucket.artifacts.arn] }
          StringEquals = { "aws:SourceAccount" = local.account_id }
        }
      },
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [aws_s3_bucket.access_logs.arn, "${aws_s3_bucket.access_logs.arn}/*"]
        Condition = { Bool = { "aws:SecureTransport" = "false" } }
      },
    ]
  })

  depends_on = [aws_s3_bucket_public_access_block.access_logs]
}

# --- artifacts bucket ---------------------------------------------------------------

# The functions' code: lambda/tally.zip (lambda.tf). Lambda copies the code
# when it creates or updates a function, so a published version does not
# depend on the object staying here; noncurrent versions are kept a while
# only to look at what was deployed.

resource "aws_s3_bucket" "artifacts" {
  #checkov:skip=CKV_AWS_144:The package is rebuilt from the repository by scripts/package-lambdas.sh and Lambda keeps its own copy of every published version's code; a replica would add nothing to recovery.
  #checkov:skip=CKV2_AWS_62:Nothing consumes object-level events: Terraform uploads the package and updates the functions itself.
  bucket = local.artifacts_bucket_name
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# Versioning is what s3_object_version of the functions refers to.
resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.data.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}

    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    expiration {
      expired_object_delete_marker = true
    }
    # Terraform uploads the ~60 MB package in parts; an interrupted apply
    # leaves them behind.
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.artifacts]
}

resource "aws_s3_bucket_logging" "artifacts" {
  bucket        = aws_s3_bucket.artifacts.id
  target_bucket = aws_s3_bucket.access_logs.id
  target_prefix = "s3-access/${local.artifacts_bucket_name}/"
}

resource "aws_s3_bucket_policy" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "DenyInsecureTransport"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]
        Condition = { Bool = { "aws:SecureTransport" = "false" } }
      },
      {
        Sid       = "DenyOldTls"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:*"
        Resource  = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]
        Condition = { NumericLessThan = { "s3:TlsVersion" = "1.2" } }
      },
      {
        Sid       = "DenyNonKmsEncryptionHeader"
        Effect    = "Deny"
        Principal = "*"
        Action    = "s3:PutObject"
        Resource  = "${aws_s3_bucket.artifacts.arn}/*"
        Condition = {
          StringNotEqualsIfExists = { "s3:x-amz-server-side-encryption" = "aws:kms" }
          Null                    = { "s3:x-amz-server-side-encryption" = "false" }
        }
      },
    ]
  })

  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}
