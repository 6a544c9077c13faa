"""One set-up for what a run compiles, shared by the train loop and the planner.

`build(cfg, mesh) -> Run` runs every check that needs the mesh (`check_run`), then builds the
optimizer, the layer runner, the train state's layout, the step (plain, distillation, or the
data-parallel step of gradient compression and DiLoCo) and its `jit` with the run's XLA options.
`jaxbig.train.loop.train` materialises the state with `run.init()` and calls the step;
`jaxbig.train.plan.plan_layout` lowers the same step on abstract inputs. Both therefore compile
one program. Nothing is allocated here: the state, the batch and a teacher's params are
ShapeDtypeStructs carrying their shardings until the loop creates or loads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxbig.checkpoint.run import IMPORTED_FILE, abstract_params, checkpoint_steps, load_run_config
from jaxbig.compress.distill import make_distill_loss, teacher_config
from jaxbig.config import Config, ConfigError, ModelConfig
from jaxbig.data.pipeline import batch_sharding, check_batch_divides
from jaxbig.data.run import run_tokenizer
from jaxbig.models import Params, logical_axes
from jaxbig.models.layers import LayerRunner
from jaxbig.optim import check_accumulation, check_mesh, optimizer_for, uses_data_parallel_step
from jaxbig.parallel.guards import check_layout, check_sequence_parallel
from jaxbig.parallel.pipeline import check_pipeline, layer_runner
from jaxbig.parallel.rules import rules_for, use_rules
from jaxbig.train.dp_step import make_dp_train_step
from jaxbig.train.state import TrainState, abstract_train_state, make_init_from_params
from jaxbig.train.step import BATCH_KEYS, jit_eval_step, jit_step, make_eval_step, make_train_step
from jaxbig.xla_options import compiler_options

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def tokenizer_of(cfg: Config):
    """The run's tokenizer (`jaxbig.data.run_tokenizer`): the prepared data's (`data.prepared`), else bytes."""
    return run_tokenizer(cfg, cfg.train.run_dir)


def xla_options_for(cfg: Config, mesh: Mesh) -> dict[str, Any] | None:
    """The XLA options both steps compile with; a profile this backend or layout cannot compile is a ConfigError."""
    try:
        sequence_parallel = cfg.parallel.sequence_parallel and mesh.shape["tensor"] > 1
        return compiler_options(cfg.compile.xla_profile, jax.default_backend(), cfg.model.compute_dtype(), sequence_parallel=sequence_parallel)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_run(cfg: Config, mesh: Mesh, tokenizer=None) -> None:
    """Every check of `cfg` against the mesh (and the data's tokenizer), before anything is allocated or written.

    The vocabulary against the tokenizer; divisibility and FSDP replication (`parallel.guards`); the
    batch over data x fsdp; the pipeline's layers, microbatches and batch; sequence parallelism;
    the XLA profile; compression/DiLoCo and gradient accumulation on this mesh (`optim`); and a
    distillation teacher's config against the student and the mesh (`compress.distill`).
    """
    tokenizer = tokenizer if tokenizer is not None else tokenizer_of(cfg)
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tokenizer.name} tokenizer's {tokenizer.vocab_size} tokens; "
            f"use model.vocab_size >= {tokenizer.vocab_size}"
        )
    sizes = dict(mesh.shape)
    check_layout(cfg.model, mesh)
    check_batch_divides(cfg.train.batch_size, mesh)
    check_pipeline(cfg, sizes)
    check_sequence_parallel(cfg.data.seq_len, cfg.parallel.sequence_parallel, sizes)
    xla_options_for(cfg, mesh)
    check_mesh(cfg.optim, sizes)
    check_accumulation(cfg, sizes)
    if cfg.distill.teacher:
        teacher_config(cfg, mesh)
    if cfg.train.init_from:
        check_init_from(cfg, tokenizer)
    if (Path(cfg.train.run_dir) / IMPORTED_FILE).is_file():
        raise ConfigError(
            f"run_dir {cfg.train.run_dir!r} holds a model imported by scripts/convert.py (params, no optimizer state); "
            f"train from it into a new run: --init_from {cfg.train.run_dir} --run_dir runs/NEW"
        )


def check_init_from(cfg: Config, tokenizer) -> None:
    """`train.init_from` names a run with a checkpoint, of this model, whose tokenizer is the data's."""
    src = cfg.train.init_from
    source = load_run_config(src)
    if not checkpoint_steps(src):
        raise ConfigError(f"train.init_from={src!r} has no checkpoints; train or import (scripts/convert.py) it first")
    changes = cfg.model.changes_from(source.model, ignore=(*ModelConfig.COMPUTE_FIELDS, "param_dtype"))
    if changes:
        raise ConfigError(
            f"train.init_from={src!r} is a different model (changed: {', '.join(changes)}); drop those --set/--config model "
            "fields (--init_from takes the model from the run)"
        )
    theirs = run_tokenizer(source, src)
    if theirs.fingerprint() != tokenizer.fingerprint():
        fix = f"scripts/prepare_data.py --tokenizer hf:{src} --out DIR, then --set data.prepared=DIR" if theirs.name == "hf" else (
            f"the data set {src} trained on (data.prepared={source.data.prepared!r})"
        )
        raise ConfigError(
            f"train.init_from={src!r} was trained with a {theirs.name} tokenizer of {theirs.vocab_size} tokens, this run's data "
            f"with another ({tokenizer.name}, {tokenizer.vocab_size} tokens), so the ids would mean other tokens; use {fix}"
        )


@dataclasses.dataclass(frozen=True)
class TeacherLayout:
    """A distillation teacher as the step compiles it: its config, graph, and params' shapes and shardings on the student's mesh."""

    cfg: Config
    graphdef: nnx.GraphDef
    abstract: Params  # ShapeDtypeStructs carrying `shardings`
    shardings: Params


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run compiles, and the abstract inputs it compiles for."""

    cfg: Config
    mesh: Mesh
    rules: Rules  # the logical -> mesh rules activations follow (`parallel.rules.rules_for`)
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    run_layers: LayerRunner
    graphdef: nnx.GraphDef
    init: Callable[[], TrainState]  # jitted: materialises the state in its shardings
    init_from_params: Callable[[Params], TrainState]  # jitted: the state around given params (train.init_from)
    shardings: TrainState
    abstract: TrainState  # ShapeDtypeStructs carrying `shardings`: the compile target and the checkpoint restore target
    batch_sharding: NamedSharding
    packed: bool  # packed rows (data.prepared): the batch also holds segment_ids and positions
    teacher: TeacherLayout | None
    compiler_options: dict[str, Any] | None
    train_step: Callable  # jitted: (state, batch) -> (state, metrics), or (state, batch, teacher_params) when distilling
    eval_step: Callable  # jitted: (params, batch) -> loss

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The mesh and the activation rules the steps are traced under; call and lower them inside."""
        with jax.set_mesh(self.mesh), use_rules(self.rules):
            yield

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """One global batch as ShapeDtypeStructs carrying the batch sharding ([B, T] int32 each)."""
        B, T = self.cfg.train.batch_size, self.cfg.data.seq_len
        return {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=self.batch_sharding) for k in BATCH_KEYS[self.packed]}

    def bind(self, teacher_params: Params | None = None) -> Callable:
        """`step(state, batch)`: the train step, with the loaded teacher's params bound when distilling."""
        if self.teacher is None:
            return self.train_step
        if teacher_params is None:
            raise ValueError("this run distills: bind the teacher's params (jaxbig.compress.distill.load_teacher)")
        step = self.train_step
        return lambda state, batch: step(state, batch, teacher_params)

    def lower(self) -> jax.stages.Lowered:
        """The train step lowered on the abstract state and batch (and teacher params), as the loop's first call traces it."""
        args = (self.abstract, self.abstract_batch()) + ((self.teacher.abstract,) if self.teacher else ())
        with self.context():
            return self.train_step.lower(*args)


def build(cfg: Config, mesh: Mesh, *, tokenizer=None) -> Run:
    """Checks `cfg` on `mesh` (`check_run`), then builds the run's optimizer, state layout and jitted steps; allocates nothing."""
    check_run(cfg, mesh, tokenizer)
    xla = xla_options_for(cfg, mesh)
    run_layers = layer_runner(mesh, cfg.parallel)
    tx, schedule = optimizer_for(cfg, dict(mesh.shape))
    B, T = cfg.train.batch_size, cfg.data.seq_len
    bsharding = batch_sharding(mesh, B, T)
    packed = bool(cfg.data.prepared)
    rules = rules_for(cfg.parallel.sequence_parallel)
    with jax.set_mesh(mesh), use_rules(rules):
        graphdef, _, _ = logical_axes(cfg.model)
        init, shardings, abstract = abstract_train_state(cfg.model, tx, mesh, cfg.train.seed)
        teacher = None
        if cfg.distill.teacher:  # frozen, outside the train state: its params are the step's third argument
            teacher_cfg = teacher_config(cfg, mesh)
            teacher_graphdef, teacher_abstract = abstract_params(teacher_cfg.model, mesh)
            teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_abstract)
            teacher = TeacherLayout(cfg=teacher_cfg, graphdef=teacher_graphdef, abstract=teacher_abstract, shardings=teacher_shardings)
        if uses_data_parallel_step(cfg.optim):  # compression or DiLoCo: local gradients under shard_map
            step_fn = make_dp_train_step(graphdef, tx, schedule, mesh, shardings, cfg.optim.accumulate_steps)
        else:
            distill_loss = make_distill_loss(graphdef, teacher.graphdef, cfg.distill, run_layers) if teacher else None
            step_fn = make_train_step(graphdef, tx, schedule, run_layers, accumulate_steps=cfg.optim.accumulate_steps, distill_loss=distill_loss)
        train_step = jit_step(
            step_fn, shardings, bsharding, teacher_shardings=teacher.shardings if teacher else None, packed=packed, compiler_options=xla
        )
        eval_step = jit_eval_step(make_eval_step(graphdef, run_layers), shardings.params, bsharding, packed=packed, compiler_options=xla)
    return Run(
        cfg=cfg,
        mesh=mesh,
        rules=rules,
        tx=tx,
        schedule=schedule,
        run_layers=run_layers,
        graphdef=graphdef,
        init=jax.jit(init, out_shardings=shardings),
        init_from_params=jax.jit(make_init_from_params(cfg.model, tx), out_shardings=shardings),
        shardings=shardings,
        abstract=abstract,
        batch_sharding=bsharding,
        packed=packed,
        teacher=teacher,
        compiler_options=xla,
        train_step=train_step,
        eval_step=eval_step,
    )


__all__ = ["Run", "TeacherLayout", "build", "check_run", "tokenizer_of", "xla_options_for"]
