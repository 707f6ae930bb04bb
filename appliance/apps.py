from django.apps import AppConfig


class ApplianceConfig(AppConfig):
    name = "appliance"
    verbose_name = "Appliance"

    def ready(self) -> None:
        from appliance import audit  # noqa: F401 - connects the login/logout signal receivers
