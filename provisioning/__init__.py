"""Engine runtimes, deployments and replicas: GPU placement, vLLM commands, process control, the reconcile loop."""
