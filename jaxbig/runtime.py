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


def use_cpu_devices(count: int) -> None:
    """Runs JAX on the CPU with exactly `count` emulated devices (for planning a mesh of that size).

    Unlike `emulate_cpu_devices` this overrides the user's setting and any accelerator: a plan
    emulates the mesh it is asked about. It must run before JAX creates its devices.
    """
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_NUM_CPU_DEVICES"] = str(count)
    if "jax" in sys.modules:
        import jax
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            if jax.default_backend() == "cpu" and jax.device_count() >= count:
                return  # already enough (e.g. inside the test suite): a smaller mesh uses the first devices
            raise RuntimeError(f"JAX already started with {jax.device_count()} {jax.default_backend()} devices; {count} CPU devices are needed")
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux /proc; None elsewhere): the time-to-first-step clock.

    Measured from the kernel's start time, so it includes the interpreter's start-up and every
    import before jaxbig's own code runs.
    """
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")
