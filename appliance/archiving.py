"""Bills are history: what past usage refers to is archived, not deleted.

Usage rows, roll-ups and GPU-hour rows point at departments, keys and deployments with
``on_delete=PROTECT`` (and deployments at their models), so a delete that would change a past bill
cannot happen. ``delete_or_archive`` tries the real delete and, when something protects the row,
archives it instead: the row stays (reports read it as before), with ``archived_at`` set, out of the
lists, pickers and the gateway. What happens to an archived object's name is each model's choice,
written in its docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import models, transaction

DELETED = "deleted"
ARCHIVED = "archived"


def delete_or_archive(obj: models.Model, archive: Callable[[], Any]) -> str:
    """Delete ``obj`` when nothing protects it, else call ``archive()``; says which it did. A deleted
    ``obj`` keeps its primary key, so that the audit event can still name what went."""
    pk = obj.pk
    try:
        with transaction.atomic():
            obj.delete()
    except (models.ProtectedError, models.RestrictedError):
        with transaction.atomic():
            archive()
        return ARCHIVED
    obj.pk = pk
    return DELETED


def unlink_many_to_many(obj: models.Model) -> None:
    """Take ``obj`` out of every many-to-many list naming it (a department's or a key's
    deployments), without the owning app having to know those lists."""
    for field in obj._meta.get_fields(include_hidden=True):
        if field.many_to_many and field.auto_created and not field.concrete:
            through = field.through
            through._base_manager.filter(**{field.field.m2m_reverse_field_name(): obj.pk}).delete()
