"""The provisioning tests' fixtures (a tiny model, the FAKE engine runtime, a fast reconcile loop),
for the node-loss tests that deploy with them."""

from tests.provisioning.conftest import fake_runtime, tiny_model  # noqa: F401
from tests.provisioning.test_reconcile import cleanup, fast_loop, no_kick  # noqa: F401
