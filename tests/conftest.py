"""Test setup: 8 virtual CPU devices so multi-device meshes can be tested anywhere.

XLA reads the flag once, when JAX starts, so it is set here before any test imports JAX.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
