from typing import Any

from django.apps import AppConfig


class TenancyConfig(AppConfig):
    name = "tenancy"

    def ready(self) -> None:
        from appliance.group_mapping import register_membership_sync
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

        def sync_memberships(user: Any, wanted: Any) -> dict[str, list[str]]:
            """A directory user's memberships made exactly ``wanted`` ({department name: admin|viewer})."""
            from tenancy.models import Department, Membership

            roles = {"admin": Membership.Role.ADMIN, "viewer": Membership.Role.VIEWER}
            departments = {d.name: d for d in Department.objects.active().filter(name__in=list(wanted))}
            changes: dict[str, list[str]] = {"added": [], "removed": [], "changed": [], "unknown": []}
            changes["unknown"] = sorted(set(wanted) - set(departments))
            current = {m.department_id: m for m in Membership.objects.filter(user=user).select_related("department")}
            for name, department in departments.items():
                role = roles[wanted[name]]
                membership = current.pop(department.pk, None)
                if membership is None:
                    Membership.objects.create(user=user, department=department, role=role)
                    changes["added"].append(name)
                elif membership.role != role:
                    membership.role = role
                    membership.save(update_fields=["role"])
                    changes["changed"].append(name)
            for membership in current.values():
                changes["removed"].append(membership.department.name)
                membership.delete()
            return changes

        register_department_lookup(member_departments)
        register_department_events(department_events)
        register_membership_sync(sync_memberships)
