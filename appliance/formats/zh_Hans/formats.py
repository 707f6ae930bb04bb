"""Number formats for Simplified Chinese on this console: Django's own leave large numbers ungrouped
("1000000"); token counts and budgets read better grouped by thousands, as Chinese business
software commonly writes them ("1,000,000")."""

THOUSAND_SEPARATOR = ","
NUMBER_GROUPING = 3
