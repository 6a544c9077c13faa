"""The Ray cluster a parameter-server run uses, and its actors.

By default the run starts a local cluster inside itself (`ray.init` with a private temp dir, no
dashboard, as many logical CPUs as actors) and shuts it down at the end; `--ray_address HOST:PORT`
joins an existing one (`ray start --head` there), checked with a TCP connect before anything starts.
When Ray is already initialised in this process (a notebook, the tests) the run uses that cluster and
leaves it running. Ray starts every actor in a process of its own; a worker's process sees only its own
devices (`worker_env`), and Ray restarts a worker whose process dies (`ps.max_restarts`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator

import jax
import ray

from jaxbig.config import Config, ConfigError
from jaxbig.models.paths import Flat
from jaxbig.ps.server import ServerShard
from jaxbig.ps.worker import Worker


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """A one-line ConfigError unless a Ray head (its GCS port) answers at `address` (HOST:PORT)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"--ray_address {address!r} must be HOST:PORT, the head's GCS address (`ray start --head` prints it)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(
            f"--ray_address {address} is not reachable ({e.strerror or type(e).__name__}); start a head there (`ray start --head "
            f"--port {port}`) or drop --ray_address to run a local Ray cluster inside the run"
        ) from None


@contextlib.contextmanager
def ray_cluster(cfg: Config, address: str | None = None) -> Iterator[None]:
    """Ray for the run: the one already initialised, the cluster at `address`, or a local one (shut down after)."""
    if ray.is_initialized():
        yield
        return
    temp_dir = None
    with warnings.catch_warnings():
        # Ray starts its processes with fork + exec (subprocess), which runs no Python in the child; JAX's
        # at-fork hook warns about any fork once JAX is up.
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # A private temp dir: other Ray users on the machine keep theirs (the default is the shared /tmp/ray).
            temp_dir = tempfile.mkdtemp(prefix="jaxbig-ray-")
            ray.init(num_cpus=cfg.ps.workers + cfg.ps.num_server_shards, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        yield
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def worker_env(num_devices: int) -> dict[str, str]:
    """Environment of an actor's process: on CPU, `num_devices` emulated devices (whatever the driver emulates)."""
    if jax.default_backend() != "cpu":
        return {}  # GPUs: Ray sets CUDA_VISIBLE_DEVICES from the actor's num_gpus
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    return {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(num_devices), "XLA_FLAGS": flags}


def start_servers(cfg: Config, parts: list[Flat], opt_states: list | None, version: int) -> list:
    """One `ServerShard` actor per param group, holding `parts[i]` (and `opt_states[i]` when resuming)."""
    actor = ray.remote(ServerShard).options(num_cpus=1, runtime_env={"env_vars": worker_env(1)})
    return [
        actor.remote(cfg, part, opt_state=None if opt_states is None else opt_states[i], version=version)
        for i, part in enumerate(parts)
    ]


def start_workers(cfg: Config, shards: list, groups: list[list[str]]) -> list:
    """`ps.workers` `Worker` actors; Ray restarts each up to `ps.max_restarts` times (it re-runs __init__: a fresh step, no state)."""
    gpus = cfg.ps.devices_per_worker if jax.default_backend() == "gpu" else 0
    actor = ray.remote(Worker).options(
        num_cpus=1, num_gpus=gpus, max_restarts=cfg.ps.max_restarts, runtime_env={"env_vars": worker_env(cfg.ps.devices_per_worker)}
    )
    return [actor.remote(cfg, i, shards, groups) for i in range(cfg.ps.workers)]


__all__ = ["check_address", "ray_cluster", "start_servers", "start_workers", "worker_env"]
