"""Process set-up that must happen before jax is imported. Imports nothing heavy."""

from __future__ import annotations

import ctypes
import os
import sys


def emulate_cpu_devices(count: int = 8) -> None:
    """Gives the CPU backend `count` devices, so meshes work on a laptop or CI box.

    Only the CPU platform reads this setting: on a GPU or TPU host jax still picks the
    accelerator, and its real devices form the mesh. A value the user already set wins.
    """
    if "jax" in sys.modules:
        import jax  # already imported (checked above); this module must not import it first

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
        import jax  # already imported (checked above); this module must not import it first
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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HOST_MALLOC_ENV = "JAXBIG_HOST_MALLOC"  # "default" leaves glibc's malloc settings alone
host_malloc_tuned: bool | None = None  # what tune_host_malloc did in this process (None: not called)


def tune_host_malloc() -> bool:
    """Keeps the memory of XLA:CPU's per-step buffers in the process instead of returning it to the OS.

    XLA:CPU allocates each execution's temporary buffer (hundreds of MB for a training step)
    with posix_memalign from its worker threads. glibc serves a request that size from a thread
    arena by mmap, and frees it by munmap, so every step page-faults its whole temporary buffer
    back in: on `small` 200,000 faults and about 20% of the step's CPU time (README, Speed;
    docs/benchmarks.md, Performance). One arena, no mmap and no trimming keep the freed buffer for the next step. The
    process keeps its peak heap, as tcmalloc and jemalloc do.

    Linux with glibc only, and it must run before XLA's threads first allocate (before jax
    creates its devices); `import jaxbig` calls it. Set JAXBIG_HOST_MALLOC=default to opt out.
    Returns whether the settings were applied.
    """
    global host_malloc_tuned
    if host_malloc_tuned is not None:
        return host_malloc_tuned
    host_malloc_tuned = False
    if os.environ.get(HOST_MALLOC_ENV, "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl has mallopt but other parameters)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # -1 is SIZE_MAX to glibc (mallopt passes it on as size_t): never trim the heap
    ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, -1)
    host_malloc_tuned = bool(ok)
    return host_malloc_tuned


def rss_bytes() -> int | None:
    """This process's resident set size in bytes (Linux /proc/self/statm; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_limit_bytes() -> int | None:
    """The memory this process may use: its cgroup's limit (v2 memory.max, v1 memory.limit_in_bytes), else the
    machine's RAM (/proc/meminfo MemTotal); None where neither can be read."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" (v2) or a huge number (v1) mean no limit
            return int(text)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
