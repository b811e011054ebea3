# Gradual deployment: one CodeDeploy application, one deployment group per
# function. A deployment moves the function's `live` alias from its current
# version to a newly published one by the group's configuration (api: 10% more
# traffic every minute; speed and archiver: 10% canary for 5 minutes; batch:
# all at once: its hourly run is too rare for a canary to see, and its
# every-minute speed-view check reaches the new version at once) and rolls
# back to the old version by itself when a deployment fails or one of the
# function's alarms goes into ALARM.
# docs/DEPLOY.md shows the create-deployment call with its AppSpec.

resource "aws_codedeploy_app" "lambda" {
  name             = var.name
  compute_platform = "Lambda"
}

resource "aws_codedeploy_deployment_group" "fn" {
  for_each = local.functions

  app_name               = aws_codedeploy_app.lambda.name
  deployment_group_name  = each.key
  service_role_arn       = aws_iam_role.codedeploy.arn
  deployment_config_name = var.deployment_configs[each.key]

  deployment_style {
    deployment_type   = "BLUE_GREEN"
    deployment_option = "WITH_TRAFFIC_CONTROL"
  }

  auto_rollback_configuration {
    enabled = true
    events  = ["DEPLOYMENT_FAILURE", "DEPLOYMENT_STOP_ON_ALARM"]
  }

  alarm_configuration {
    enabled = true
    alarms  = local.rollback_alarm_names[each.key]
  }

  trigger_configuration {
    trigger_name       = "${var.name}-${each.key}-deployment"
    trigger_target_arn = aws_sns_topic.alarms.arn
    trigger_events     = ["DeploymentFailure", "DeploymentRollback", "DeploymentStop"]
  }
}
