from django.apps import AppConfig


class ProvisioningConfig(AppConfig):
    name = "provisioning"

    def ready(self) -> None:
        from models_catalog.models import USAGE_CHECKS
        from provisioning.usage import deployments_using

        USAGE_CHECKS.append(deployments_using)
