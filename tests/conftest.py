"""Test configuration: 8 simulated CPU devices, hypothesis profiles, shared paths."""

import os
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

settings.register_profile(
    "ci", deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PIPESCHED_SHARED", REPO.parent / "shared"))
INSTANCES = SHARED / "instances"


@pytest.fixture(scope="session")
def instances_dir() -> Path:
    if not INSTANCES.is_dir():
        pytest.fail(f"public instances not found at {INSTANCES}: set PIPESCHED_SHARED to the shared/ folder")
    return INSTANCES
