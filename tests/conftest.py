"""Test set-up: CPU and PyNative by default, the two tiers, the hypothesis budget, the ``mode`` fixture.

Tiers: ``make test`` runs ``pytest -m "not slow"`` (the fast tier: every module, a smaller hypothesis
budget); ``make test-all`` runs everything, ``slow`` tests included. ``NSA_HYPOTHESIS_EXAMPLES``
overrides the number of random examples per hypothesis test in either tier.
"""

import os

import mindspore as ms
import pytest
from hypothesis import HealthCheck, settings

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")

_PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                print_blob=True)
settings.register_profile("full", max_examples=20, **_PROFILE)
settings.register_profile("fast", max_examples=5, **_PROFILE)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long sweeps and end-to-end runs; only in `make test-all`")
    budget = os.environ.get("NSA_HYPOTHESIS_EXAMPLES")
    if budget:
        settings.register_profile("env", max_examples=int(budget), **_PROFILE)
        settings.load_profile("env")
    else:
        settings.load_profile("fast" if "not slow" in (config.getoption("markexpr") or "") else "full")


@pytest.fixture(params=("pynative", "graph"))
def mode(request):
    """Run each test twice: eagerly (PyNative) and compiled with ``mindspore.jit`` (graph mode)."""
    return request.param
