from django.apps import AppConfig


class GpusConfig(AppConfig):
    name = "gpus"

    def ready(self) -> None:
        from nodes.registry import register_facts

        def gpu_count(node: str) -> dict[str, int]:
            from gpus.models import Gpu

            return {"gpus": Gpu.objects.filter(node=node).count()}

        register_facts(gpu_count)
