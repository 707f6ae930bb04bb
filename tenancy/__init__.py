"""Departments, members' roles, API keys, quotas, the Redis limiter, usage records and reports."""
