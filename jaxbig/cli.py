"""Command-line flags shared by the scripts: --config, --set, --mesh and the common shortcuts."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from jaxbig.config import Config, ModelConfig, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML preset, e.g. configs/small.yaml (default: the tiny defaults)")
    parser.add_argument("--mesh", default=None, help="4x2 (data x tensor) or data=2,fsdp=2,tensor=2; -1 fills the rest (default: data=-1)")
    parser.add_argument("--steps", type=int, default=None, help="train.steps")
    parser.add_argument("--run_dir", default=None, help="train.run_dir")
    parser.add_argument("--seed", type=int, default=None, help="train.seed")
    parser.add_argument(
        "--init_from", default=None, metavar="RUN_DIR",
        help="train.init_from: start from this run's latest params (fine-tuning); the model section comes from that run",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config field, e.g. --set model.num_layers=8 (repeatable)"
    )


def config_from_args(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The config and the mesh spec as the user wrote it (for error messages)."""
    from jaxbig.parallel.mesh import parse_mesh_spec  # JAX only for the scripts that build a config; scripts/serve.py needs neither

    overrides = list(args.set)
    for flag, key in (("steps", "train.steps"), ("run_dir", "train.run_dir"), ("seed", "train.seed"), ("init_from", "train.init_from")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.mesh is not None:
        overrides += [f"mesh.{axis}={size}" for axis, size in parse_mesh_spec(args.mesh).items()]
    model = init_model_fields(args.init_from) if getattr(args, "init_from", None) else None
    return load_config(args.config, overrides, model=model), args.mesh


def init_model_fields(run_dir: str) -> dict:
    """The model section of the run a fine-tune starts from, less how it computes and stores its params
    (`ModelConfig.COMPUTE_FIELDS` and `param_dtype`: the fine-tune's own config decides those)."""
    from jaxbig.checkpoint.run import load_run_config  # JAX and orbax only for the scripts that build a config

    if run_dir.startswith("hf:"):
        return {}  # TrainConfig refuses it with the conversion command
    model = dataclasses.asdict(load_run_config(run_dir).model)
    return {k: v for k, v in model.items() if k not in (*ModelConfig.COMPUTE_FIELDS, "param_dtype")}


def fail(error: Exception | str, code: int = 2) -> int:
    print(f"error: {error}", file=sys.stderr, flush=True)
    return code


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Flags of a multi-process job (see jaxbig.parallel.distributed for the env and SLURM fallbacks)."""
    group = parser.add_argument_group("multi-process (all three, or none for one process)")
    group.add_argument("--coordinator_address", default=None, metavar="HOST:PORT", help="process 0's address and a free port")
    group.add_argument("--num_processes", type=int, default=None, help="processes in the job")
    group.add_argument("--process_id", type=int, default=None, help="this process, 0..num_processes-1 (0 hosts the coordinator)")
    group.add_argument(
        "--heartbeat_timeout", type=int, default=None, metavar="SECONDS", help="a process silent this long stops the whole job (default 15)"
    )
