"""Shared pytest set-up. Framework-specific fixtures live in the test modules that need them.

* JAX gets 4 host CPU devices (for the cross-device tests); this must happen before JAX starts.
* Hypothesis is derandomized: every run draws the same examples, so CI is reproducible.
"""

from __future__ import annotations

import os

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("KERAS_BACKEND", "jax")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "bn_ref",
    derandomize=True,
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("BN_REF_HYPOTHESIS_PROFILE", "bn_ref"))
