"""Multi-process (multi-host) start-up: which coordinator, how many processes, which one this is.

A job of N processes (one per host, each owning its local devices: a host's GPUs, or emulated
CPU devices) is joined by `jax.distributed.initialize`. Process 0 hosts a coordination service;
afterwards `jax.devices()` lists every process's devices, one mesh spans them all, and every
process runs the same jitted programs on its own shards (SPMD, multi-controller).

Each of the three numbers comes from the first source that sets it:

  1. flags   --coordinator_address HOST:PORT  --num_processes N  --process_id I
  2. env     JAXBIG_COORDINATOR               JAXBIG_NUM_PROCESSES  JAXBIG_PROCESS_ID
  3. env     JAX_COORDINATOR_ADDRESS          JAX_NUM_PROCESSES     JAX_PROCESS_ID
  4. SLURM   first host of SLURM_STEP_NODELIST + port   SLURM_NTASKS   SLURM_PROCID
             (port: JAXBIG_COORDINATOR_PORT, else JAX_COORDINATOR_PORT, else derived from
             SLURM_JOB_ID as JAX's own SLURM detection does; SLURM counts only inside `srun`)

Nothing set anywhere, or one process, means a single-process run: nothing is initialised.

On CPU the cross-process collectives are gloo over TCP. A dead process must not leave the
others hanging in a collective that never completes; what stops them (measured with jax 0.12,
2 processes on one host, tests/test_multihost.py):

- a process is killed while the others wait in a collective on it: gloo reads "Connection reset
  by peer", the step raises `JaxRuntimeError`, and `scripts/train.py` prints one line,
  "error: process 0 of 2: a cross-process operation failed (...); another process has most
  likely died", and exits with status 1, within a second of the kill;
- otherwise the service (in process 0) misses the dead process's heartbeats for up to
  `heartbeat_timeout_s` and tells every survivor, which aborts itself (SIGABRT, status -6/134)
  with JAX's "Terminating process because the JAX distributed service detected fatal errors.
  This most likely indicates that another task died ... The following tasks are unhealthy
  (stopped sending heartbeats): 1"; a frozen process 1 (SIGSTOP: sockets open, no heartbeats,
  like a host that lost power) was noticed 4.4 s after with a 5 s timeout, 7.7 s with 10 s;
- process 0 is killed: the others lose the service at once and abort with that message
  ("Failed to send RPC to coordination service"), status 1, within a second;
- a process fails with a Python error: `leave` exits it at once (skipping JAX's shutdown
  barrier, which would hold it for `shutdown_timeout_s`), so the others see one of the cases
  above. Errors every process can detect (config, run directory) are raised by all of them
  together, before any collective runs.

JAX's client takes a `missed_heartbeat_callback` that could replace the abort with a Python
error, but in jaxlib 0.12 passing a Python callable there aborts with `std::bad_cast`, so the
abort, with its own message, is the mechanism.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping

from jaxbig.config import ConfigError

# Seconds. The heartbeat timeout bounds how long a dead process goes unnoticed (JAX's default, 100 s,
# is too long for "a dead peer stops the job within a minute"); the init timeout is how long the
# processes wait for each other to connect; the shutdown timeout how long a finished process waits
# at exit for the others to finish too.
HEARTBEAT_TIMEOUT_S = 15
INIT_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 30

_ENV = (  # (field, variable) per environment source, in priority order
    {"coordinator_address": "JAXBIG_COORDINATOR", "num_processes": "JAXBIG_NUM_PROCESSES", "process_id": "JAXBIG_PROCESS_ID"},
    {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"},
)
_FIELDS = ("coordinator_address", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedSpec:
    """Where to find the coordinator and who this process is; `sources` says where each came from."""

    coordinator_address: str  # HOST:PORT of process 0's coordination service
    num_processes: int
    process_id: int  # 0 .. num_processes-1; process 0 hosts the coordinator
    sources: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def describe(self) -> str:
        src = ", ".join(f"{k} from {v}" for k, v in self.sources.items())
        return f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator_address}" + (f" ({src})" if src else "")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `node[003-005,9],gpu1` -> `node003`, `a1,a2` -> `a1`."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist)
    if not m or not (m.group(1) or m.group(2)):
        raise ConfigError(f"SLURM node list {nodelist!r} has no host name; set --coordinator_address HOST:PORT")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges, maxsplit=1)[0]
    return prefix + first


def _slurm(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    """What SLURM says, inside an `srun` step only (SLURM_STEP_NODELIST set)."""
    if "SLURM_STEP_NODELIST" not in env or "SLURM_NTASKS" not in env or "SLURM_PROCID" not in env:
        return {}
    port = env.get("JAXBIG_COORDINATOR_PORT") or env.get("JAX_COORDINATOR_PORT")
    if not port:
        if "SLURM_JOB_ID" not in env:
            raise ConfigError("SLURM step without SLURM_JOB_ID: set JAXBIG_COORDINATOR_PORT to a free port on the first node")
        port = str(int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))  # JAX's choice: the top 4096 ports
    return {
        "coordinator_address": (f"{first_slurm_host(env['SLURM_STEP_NODELIST'])}:{port}", "SLURM_STEP_NODELIST"),
        "num_processes": (env["SLURM_NTASKS"], "SLURM_NTASKS"),
        "process_id": (env["SLURM_PROCID"], "SLURM_PROCID"),
    }


def _as_int(name: str, value: object, source: str) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} (from {source}) is not an integer") from None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> DistributedSpec | None:
    """The job's layout from flags, then env, then SLURM; None for a single-process run."""
    env = os.environ if env is None else env
    flags = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    sources = [{k: (v, f"--{k}") for k, v in flags.items() if v is not None}]
    sources += [{k: (env[var], var) for k, var in names.items() if env.get(var, "")} for names in _ENV]
    sources.append(_slurm(env))
    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    for found in sources:
        for field, (value, where) in found.items():
            values.setdefault(field, value)
            origin.setdefault(field, where)
    if not values:
        return None
    if "num_processes" in values and _as_int("num_processes", values["num_processes"], origin["num_processes"]) == 1:
        return None  # one process (e.g. a one-task srun step): nothing to join
    missing = [f for f in _FIELDS if f not in values]
    if missing:
        given = ", ".join(f"{f}={values[f]!r} (from {origin[f]})" for f in values)
        raise ConfigError(
            f"multi-process run is half specified: {given}, but {' and '.join(missing)} not set; "
            "pass --coordinator_address HOST:PORT --num_processes N --process_id I (or JAXBIG_COORDINATOR, "
            "JAXBIG_NUM_PROCESSES, JAXBIG_PROCESS_ID), or none of them for a single-process run"
        )
    n = _as_int("num_processes", values["num_processes"], origin["num_processes"])
    pid = _as_int("process_id", values["process_id"], origin["process_id"])
    address = str(values["coordinator_address"])
    if n < 1:
        raise ConfigError(f"num_processes={n} (from {origin['num_processes']}) must be >= 1")
    if not 0 <= pid < n:
        raise ConfigError(f"process_id={pid} (from {origin['process_id']}) must be in 0..{n - 1} for num_processes={n}")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"coordinator_address={address!r} (from {origin['coordinator_address']}) must be HOST:PORT, e.g. 10.0.0.1:12355")
    return DistributedSpec(coordinator_address=address, num_processes=n, process_id=pid, sources=origin)


def initialize(
    spec: DistributedSpec | None,
    *,
    heartbeat_timeout_s: int | None = None,
    init_timeout_s: int = INIT_TIMEOUT_S,
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
) -> None:
    """Joins the job (a no-op for None). Call before anything touches a JAX device.

    `heartbeat_timeout_s` (default HEARTBEAT_TIMEOUT_S) is how long a silent process goes unnoticed.
    """
    if spec is None:
        return
    heartbeat_timeout_s = heartbeat_timeout_s or HEARTBEAT_TIMEOUT_S
    if heartbeat_timeout_s < 2:
        raise ConfigError(f"heartbeat timeout {heartbeat_timeout_s}s is too short to survive a busy host; use >= 2 (default {HEARTBEAT_TIMEOUT_S})")
    # JAX only to join a job: resolving the spec (env, flags, SLURM) imports nothing heavy, before the device count is set.
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ConfigError(
            "jax.distributed must be initialised before JAX creates its devices; call "
            "jaxbig.parallel.distributed.initialize before any jax.devices() or computation"
        )
    # Cross-process collectives on CPU: gloo over TCP (JAX's default since 0.5.1, made explicit here).
    # On GPU/TPU the platform's own collectives are used and this setting is not read.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX aborts the process itself when the others do not connect in time, so say first what is awaited.
    print(
        f"jaxbig: {spec.describe()}: joining (waiting up to {init_timeout_s}s for all {spec.num_processes} processes; "
        f"a process silent for {heartbeat_timeout_s}s stops the job)",
        file=sys.stderr,
        flush=True,
    )
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            cluster_detection_method="deactivate",  # resolved above; JAX_LOCAL_DEVICE_IDS is still honoured
            initialization_timeout=init_timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            shutdown_timeout_seconds=shutdown_timeout_s,
        )
    except Exception as e:  # noqa: BLE001 - the runtime raises its own error types (e.g. a port already in use)
        raise ConfigError(
            f"{spec.describe()}: could not join the job: {_first_line(e)}. Start all {spec.num_processes} processes "
            "with the same coordinator address, each with its own process id, and check that process 0 can bind that port"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def is_multiprocess() -> bool:
    """True once this process has joined a job of more than one process."""
    import jax  # see initialize: this module imports JAX only where it is used

    return jax.distributed.is_initialized() and jax.process_count() > 1


def failure_message(e: BaseException) -> str:
    """One line for an error that ends a multi-process run, naming this process."""
    import jax  # see initialize: this module imports JAX only where it is used

    where = f"process {jax.process_index()} of {jax.process_count()}"
    if isinstance(e, jax.errors.JaxRuntimeError):
        return (
            f"{where}: a cross-process operation failed ({_first_line(e)[:300]}); another process has most "
            "likely died or diverged, see its log; the job stops here"
        )
    return f"{where}: {type(e).__name__}: {_first_line(e)}"


def leave(code: int) -> int:
    """Returns `code`; in a multi-process job, exits with it at once instead.

    A normal exit waits at JAX's shutdown barrier for every process (up to `shutdown_timeout_s`),
    which a failed job never reaches. Exiting at once makes the others notice within the heartbeat
    timeout: they stop with JAX's "another task died" message.
    """
    if code and is_multiprocess():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


__all__ = ["DistributedSpec", "failure_message", "first_slurm_host", "initialize", "is_multiprocess", "leave", "resolve"]
