"""XLA flags of every test process and train.py child (no imports: read before JAX starts).

The scheduler flag is kept from before the real cause of the 8-device hangs was found
(see tests/conftest.py): it changes timing only. The suite's programs are small, so
compiling them dominates, and LLVM's backend optimisations cost more than they save
(about 40% of a compile-bound test).
"""


def cpu_test_xla_flags(devices: int) -> str:
    return (
        f"--xla_force_host_platform_device_count={devices} "
        "--xla_cpu_enable_concurrency_optimized_scheduler=false "
        "--xla_backend_optimization_level=0"
    )
