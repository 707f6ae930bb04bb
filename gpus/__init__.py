"""GPU health: the NVML probe (or an explicitly chosen simulated source), samples, health rules, alerts, metrics."""
