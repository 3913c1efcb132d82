"""Test setup: 8 virtual CPU devices so multi-device meshes can be tested anywhere.

XLA reads the flags once, when JAX starts, so they are set here before any test
imports JAX. XLA:CPU's concurrency-optimized scheduler can deadlock 8 virtual
devices sharing 2 cores when collectives sit next to conditionals (seen with
sharded GaLore refreshes under an Explicit mesh); the default scheduler is fine.
"""

import os

CPU_TEST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false"
)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_TEST_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
