"""Test setup: 8 virtual CPU devices so multi-device meshes can be tested anywhere.

XLA reads the flags once, when JAX starts, so they are set here before any test
imports JAX. The scheduler flag is kept from before the real cause of the
8-device hangs was found (jaxlib 0.10's CPU LAPACK kernels splitting batches
over the intra-op pool and blocking; `galore_jax.linalg._per_matrix_on_cpu`
avoids it in the library): it changes timing only.
"""

import os

from xla_flags import cpu_test_xla_flags

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cpu_test_xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
