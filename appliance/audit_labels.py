"""What each audit action code means, in words (and in the active language); the code stays the
record's key and is what filters and the API use."""

from __future__ import annotations

from django.utils.translation import gettext_lazy as _

LABELS = {
    "auth.login": _("Signed in"),
    "auth.logout": _("Signed out"),
    "auth.login_failed": _("Sign-in failed"),
    "auth.directory_login": _("Directory sign-in"),
    "auth.directory_mapping": _("Directory groups applied"),
    "directory.test": _("Directory connection tested"),
    "directory.oidc_test": _("OpenID Connect provider tested"),
    "user.create_first_admin": _("First admin created"),
    "user.create": _("User created"),
    "user.set_role": _("User's role changed"),
    "user.activate": _("User activated"),
    "user.deactivate": _("User deactivated"),
    "user.change_password": _("Password changed"),
    "api_token.create": _("API token created"),
    "api_token.revoke": _("API token revoked"),
    "department.create": _("Department created"),
    "department.update": _("Department changed"),
    "department.delete": _("Department deleted"),
    "department.member_set": _("Member added or changed"),
    "department.member_remove": _("Member removed"),
    "api_key.issue": _("API key issued"),
    "api_key.revoke": _("API key revoked"),
    "api_key.rotate": _("API key rotated"),
    "api_key.delete": _("API key deleted"),
    "model_price.set": _("Prices set"),
    "model_price.delete": _("Prices removed"),
    "model.download": _("Model download started"),
    "model.import": _("Model import started"),
    "model.resume": _("Model download resumed"),
    "model.update": _("Model update started"),
    "model.verify": _("Model verification started"),
    "model.check": _("Model checked for updates"),
    "model.delete": _("Model deleted"),
    "model.job_cancel": _("Model job cancelled"),
    "model.allow_remote_code": _("Remote code allowed for a model"),
    "hub_endpoint.create": _("Model source added"),
    "hub_endpoint.update": _("Model source changed"),
    "hub_endpoint.delete": _("Model source removed"),
    "engine.install": _("Engine install started"),
    "deployment.create": _("Deployment created"),
    "deployment.start": _("Deployment started"),
    "deployment.stop": _("Deployment stopped"),
    "deployment.restart": _("Deployment restarted"),
    "deployment.scale": _("Deployment scaled"),
    "deployment.delete": _("Deployment deleted"),
    "deployment.targets": _("Deployment targets set"),
    "deployment.acknowledge": _("Deployment target alerts acknowledged"),
    "playground.chat": _("Playground chat"),
    "gpu_alert.acknowledge": _("GPU alert acknowledged"),
    "webhook.create": _("Webhook added"),
    "webhook.delete": _("Webhook removed"),
    "security.csrf_refused": _("Form refused (expired or forged)"),
    "node.join_token": _("Join token made"),
    "node.join": _("Box joined"),
    "node.drain": _("Node drained"),
    "node.resume": _("Node takes new replicas again"),
    "node.forget": _("Node forgotten"),
}


# What kind of object an event is about (``AuditEvent.target_type``, a model's ``app_label.model``).
TARGETS = {
    "auth.user": _("user"),
    "appliance.apitoken": _("API token"),
    "tenancy.department": _("department"),
    "tenancy.apikey": _("API key"),
    "tenancy.modelprice": _("price"),
    "models_catalog.localmodel": _("model"),
    "models_catalog.modeljob": _("model job"),
    "models_catalog.hubendpoint": _("model source"),
    "provisioning.deployment": _("deployment"),
    "provisioning.engineruntime": _("engine"),
    "gpus.gpu": _("GPU"),
    "gpus.alert": _("GPU alert"),
    "gpus.webhook": _("webhook"),
    "nodes.node": _("node"),
    "nodes.jointoken": _("join token"),
}


def target_label(target_type: str) -> str:
    """The kind of object in words; an unknown one as it is."""
    return str(TARGETS.get(target_type, target_type))


def label(action: str) -> str:
    """The action in words; an unknown code as it is."""
    return str(LABELS.get(action, action))
