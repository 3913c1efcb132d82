"""Test setup: 8 virtual CPU devices so multi-device meshes can be tested anywhere.

XLA reads the flags once, when JAX starts, so they are set here before any test
imports JAX. The scheduler flag is kept from before the real cause of the
8-device hangs was found (jaxlib 0.10's CPU LAPACK kernels splitting batches
over the intra-op pool and blocking; `galore_jax.linalg._per_matrix_on_cpu`
avoids it in the library): it changes timing only.
"""

import os

CPU_TEST_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 "
    "--xla_cpu_enable_concurrency_optimized_scheduler=false "
    # The suite's programs are small: compiling them dominates, and LLVM's backend
    # optimisations cost more than they save (about 40% of a compile-bound test).
    "--xla_backend_optimization_level=0"
)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_TEST_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
