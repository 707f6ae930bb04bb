from typing import Any

from django.apps import AppConfig


class TenancyConfig(AppConfig):
    name = "tenancy"

    def ready(self) -> None:
        from appliance.roles import register_department_events, register_department_lookup

        def member_departments(user: object) -> dict[int, str]:
            """Every department the user is a member of, with the membership's role."""
            from tenancy.models import Membership

            return dict(Membership.objects.filter(user=user).values_list("department_id", "role"))

        def department_events(ids: set[int]) -> Any:
            """Audit events about these departments or their keys."""
            from django.db.models import CharField, Q
            from django.db.models.functions import Cast

            from tenancy.models import ApiKey

            key_ids = ApiKey.objects.filter(department_id__in=ids).annotate(text_id=Cast("pk", CharField()))
            return Q(target_type="tenancy.department", target_id__in=[str(pk) for pk in ids]) | Q(
                target_type="tenancy.apikey", target_id__in=key_ids.values("text_id")
            )

        register_department_lookup(member_departments)
        register_department_events(department_events)
