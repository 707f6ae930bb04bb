from django.apps import AppConfig


class ProvisioningConfig(AppConfig):
    name = "provisioning"

    def ready(self) -> None:
        """What deployments tell the apps below them, which know nothing of deployments."""
        from gpus.users import register as register_gpu_users
        from models_catalog.models import USAGE_CHECKS
        from nodes.registry import on_node_lost, register_facts, register_workload
        from provisioning.scheduler import replace_lost
        from provisioning.usage import (
            deployments_using,
            gpu_users,
            node_runtimes,
            node_workload,
            replicas_lost,
        )

        USAGE_CHECKS.append(deployments_using)
        register_gpu_users(gpu_users)
        register_facts(node_runtimes)
        register_workload(node_workload)
        on_node_lost(replicas_lost)
        on_node_lost(replace_lost)  # after: the lost replicas are marked first
