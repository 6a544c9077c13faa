"""Process set-up that must happen before jax is imported. Imports nothing heavy."""

from __future__ import annotations

import os
import sys


def emulate_cpu_devices(count: int = 8) -> None:
    """Gives the CPU backend `count` devices, so meshes work on a laptop or CI box.

    Only the CPU platform reads this setting: on a GPU or TPU host jax still picks the
    accelerator, and its real devices form the mesh. A value the user already set wins.
    """
    if "jax" in sys.modules:
        import jax

        if jax.config.jax_num_cpu_devices in (-1, None) and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            try:
                jax.config.update("jax_num_cpu_devices", count)
            except RuntimeError:  # backends already initialised: keep what is there
                pass
        return
    if "JAX_NUM_CPU_DEVICES" not in os.environ and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["JAX_NUM_CPU_DEVICES"] = str(count)
