"""The /v1 OpenAI-compatible front door: key auth, admission, routing to replicas, streaming, accounting."""
