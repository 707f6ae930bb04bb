"""``{{ event.action|action_label }}``, ``{{ event.target_type|target_label }}``: audit codes in words."""

from __future__ import annotations

from django import template

from appliance.audit_labels import label, target_label

register = template.Library()


@register.filter
def action_label(action: str) -> str:
    return label(action)


@register.filter(name="target_label")
def target_label_filter(target_type: str) -> str:
    return target_label(target_type)
