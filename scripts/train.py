"""Train a model: `python scripts/train.py --mesh 4x2 [--config configs/small.yaml] [--set model.num_layers=8]`.

Runs on 8 emulated CPU devices when no accelerator is present. Re-running with the same
--run_dir resumes from its latest checkpoint; --fresh starts over.

Several processes (hosts) form one job with --coordinator_address HOST:PORT --num_processes N
--process_id I on each (or JAXBIG_COORDINATOR / JAXBIG_NUM_PROCESSES / JAXBIG_PROCESS_ID, or
SLURM's srun variables). On CPU the 8 emulated devices are split over the processes unless
JAX_NUM_CPU_DEVICES sets a per-process count.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import jax  # noqa: E402  (importing creates no devices; emulate_cpu_devices below still takes effect)

from jaxbig.cli import add_config_args, add_distributed_args, config_from_args, fail  # noqa: E402
from jaxbig.checkpoint import CheckpointError  # noqa: E402
from jaxbig.config import ConfigError  # noqa: E402
from jaxbig.parallel import distributed  # noqa: E402
from jaxbig.runtime import emulate_cpu_devices  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    add_distributed_args(parser)
    parser.add_argument("--fresh", action="store_true", help="delete the run_dir's checkpoints and metrics and start over")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    parser.add_argument(
        "--ray_address", default=None, metavar="HOST:PORT",
        help="optim.outer=async_ps: join the Ray cluster there (`ray start --head`) instead of starting a local one in the run",
    )
    args = parser.parse_args(argv)
    try:
        spec = distributed.resolve(args.coordinator_address, args.num_processes, args.process_id)
        processes = spec.num_processes if spec else 1
        emulate_cpu_devices(8 // processes if 8 % processes == 0 else 1)  # before JAX creates its devices
        distributed.initialize(spec, heartbeat_timeout_s=args.heartbeat_timeout)
        cfg, mesh_spec = config_from_args(args)
        if cfg.optim.outer == "async_ps":  # the parameter server on Ray actors (needs the .[ps] extra)
            if spec is not None:
                raise ConfigError("optim.outer=async_ps runs one driver process; its workers are Ray actors (drop the multi-process flags)")
            try:
                from jaxbig.ps.driver import train_ps
            except ModuleNotFoundError as e:
                if e.name != "ray":
                    raise
                raise ConfigError("optim.outer=async_ps needs Ray: pip install -e '.[ps]' (make setup installs it)") from None
            train_ps(cfg, ray_address=args.ray_address, fresh=args.fresh, progress=not args.no_progress)
            return 0
        if args.ray_address:
            raise ConfigError(f"--ray_address {args.ray_address} is for optim.outer=async_ps (the parameter server); this run is optim.outer={cfg.optim.outer}")
        from jaxbig.train.loop import train

        train(cfg, mesh_spec=mesh_spec, fresh=args.fresh, progress=not args.no_progress and spec is None)
    except ConfigError as e:
        return distributed.leave(fail(e))
    except (FloatingPointError, CheckpointError) as e:  # a diverged run or a failed save: the message says what survives
        return distributed.leave(fail(e, code=1))
    except Exception as e:  # in a multi-process job: say which process failed, then stop the job at once
        if not distributed.is_multiprocess():
            raise
        if not isinstance(e, jax.errors.JaxRuntimeError):  # a lost peer needs no traceback; a bug does
            traceback.print_exc()
        return distributed.leave(fail(distributed.failure_message(e), code=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
