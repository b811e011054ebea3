# The read path (and merchants' settings): API Gateway HTTP API -> api
# function (live alias), payload format 2.0. The JWT authorizer checks
# signature, issuer, audience and expiry before the function runs; the
# function checks the merchant_id/role claims against the path again
# (DESIGN.md, HTTP API).

resource "aws_apigatewayv2_api" "http" {
  name          = "${var.name}-api"
  description   = "tally serving layer: merchant metrics"
  protocol_type = "HTTP"
}

resource "aws_apigatewayv2_authorizer" "jwt" {
  api_id           = aws_apigatewayv2_api.http.id
  name             = "${var.name}-jwt"
  authorizer_type  = "JWT"
  identity_sources = ["$request.header.Authorization"]

  jwt_configuration {
    issuer   = var.jwt_issuer
    audience = var.jwt_audience
  }
}

resource "aws_apigatewayv2_integration" "api" {
  api_id                 = aws_apigatewayv2_api.http.id
  description            = "api function, live alias"
  integration_type       = "AWS_PROXY"
  integration_method     = "POST"
  integration_uri        = aws_lambda_alias.live["api"].invoke_arn
  payload_format_version = "2.0"
  timeout_milliseconds   = min(30000, var.lambda_timeout_seconds["api"] * 1000 + 1000)
}

resource "aws_apigatewayv2_route" "metrics" {
  api_id             = aws_apigatewayv2_api.http.id
  route_key          = "GET /v1/merchants/{merchant_id}/metrics"
  target             = "integrations/${aws_apigatewayv2_integration.api.id}"
  authorization_type = "JWT"
  authorizer_id      = aws_apigatewayv2_authorizer.jwt.id
}

# A merchant's settings (its time zone): the function merges them into the
# merchants table and the serving store. Same authorizer and claims check as
# the metrics route; throttled by the stage's default route settings.
resource "aws_apigatewayv2_route" "settings" {
  api_id             = aws_apigatewayv2_api.http.id
  route_key          = "PUT /v1/merchants/{merchant_id}/settings"
  target             = "integrations/${aws_apigatewayv2_integration.api.id}"
  authorization_type = "JWT"
  authorizer_id      = aws_apigatewayv2_authorizer.jwt.id
}

locals {
  public_routes = toset(["GET /health", "GET /ready", "GET /openapi.json"])
}

resource "aws_apigatewayv2_route" "public" {
  #checkov:skip=CKV_AWS_309:These are the unauthenticated routes of the contract: /health (liveness), /ready (readiness for load balancers and probes) and /openapi.json (the API's public description). They return no merchant data, and each is throttled to api_public_route_rate_limit on the stage. The merchant routes (metrics, settings) have the JWT authorizer.
  for_each = local.public_routes

  api_id             = aws_apigatewayv2_api.http.id
  route_key          = each.value
  target             = "integrations/${aws_apigatewayv2_integration.api.id}"
  authorization_type = "NONE"
}

resource "aws_cloudwatch_log_group" "api_access" {
  name              = "/tally/${var.name}/api-access"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.ops.arn
}

resource "aws_apigatewayv2_stage" "default" {
  api_id      = aws_apigatewayv2_api.http.id
  name        = "$default"
  auto_deploy = true

  default_route_settings {
    throttling_rate_limit    = var.api_throttling_rate_limit
    throttling_burst_limit   = var.api_throttling_burst_limit
    detailed_metrics_enabled = true
  }

  dynamic "route_settings" {
    for_each = local.public_routes
    content {
      route_key                = route_settings.value
      throttling_rate_limit    = var.api_public_route_rate_limit
      throttling_burst_limit   = var.api_public_route_rate_limit
      detailed_metrics_enabled = true
    }
  }

  # One JSON line per request. No Authorization header, no query string
  # values beyond the route: nothing secret lands in the logs.
  access_log_settings {
    destination_arn = aws_cloudwatch_log_group.api_access.arn
    format = jsonencode({
      requestId          = "$context.requestId"
      requestTime        = "$context.requestTime"
      ip                 = "$context.identity.sourceIp"
      userAgent          = "$context.identity.userAgent"
      routeKey           = "$context.routeKey"
      path               = "$context.path"
      status             = "$context.status"
      protocol           = "$context.protocol"
      responseLength     = "$context.responseLength"
      responseLatency    = "$context.responseLatency"
      integrationLatency = "$context.integrationLatency"
      integrationStatus  = "$context.integrationStatus"
      integrationError   = "$context.integrationErrorMessage"
      authorizerError    = "$context.authorizer.error"
      subject            = "$context.authorizer.claims.sub"
    })
  }

  depends_on = [aws_apigatewayv2_route.metrics, aws_apigatewayv2_route.settings, aws_apigatewayv2_route.public]
}

resource "aws_lambda_permission" "api_gateway" {
  statement_id  = "AllowApiGatewayInvokeLive"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.fn["api"].function_name
  qualifier     = aws_lambda_alias.live["api"].name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_apigatewayv2_api.http.execution_arn}/*/*"
}
