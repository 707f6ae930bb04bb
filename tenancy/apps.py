from django.apps import AppConfig


class TenancyConfig(AppConfig):
    name = "tenancy"

    def ready(self) -> None:
        from appliance.roles import register_department_lookup

        def member_departments(user: object) -> set[int]:
            from tenancy.models import Membership

            return set(
                Membership.objects.filter(user=user, role=Membership.Role.ADMIN).values_list("department_id", flat=True)
            )

        register_department_lookup(member_departments)
