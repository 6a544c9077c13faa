"""Knowledge distillation: a student trained on next-token labels and a frozen teacher's softened logits.

    loss = (1 - w)·CE(student, targets) + w·T²·KL(softmax(teacher/T) || softmax(student/T))

per token, averaged (Hinton et al. 2015: the T² keeps the soft term's gradient scale
independent of T). The teacher is a trained jaxbig run (`distill.teacher=RUN_DIR`): its
config and latest checkpoint are loaded with `jaxbig.checkpoint.run.load_params`, its params
placed on the student's mesh by the logical rules (sharded like a model of its own size), and
kept outside the train state: the step takes them as an argument, runs the teacher forward
under `jax.lax.stop_gradient` (no gradients, no optimizer state), and the checkpoint holds the
student only. Teacher and student may differ in width and depth; they must share the vocabulary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxbig.checkpoint.run import load_params, load_run_config
from jaxbig.config import Config, ConfigError, DistillConfig
from jaxbig.models import Params
from jaxbig.models.layers import LayerRunner, scan_layers
from jaxbig.parallel.guards import check_layout


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A loaded teacher: its run's config, graph, params (on the student's mesh) and their shardings."""

    cfg: Config
    graphdef: nnx.GraphDef
    params: Params
    shardings: Params
    step: int
    run_dir: str


def check_teacher_config(student: Config, teacher: Config, run_dir: str) -> None:
    """Refuses a teacher the student cannot learn from, naming both values."""
    if teacher.model.vocab_size != student.model.vocab_size:
        raise ConfigError(
            f"distill.teacher={run_dir!r} has model.vocab_size={teacher.model.vocab_size} but the student has "
            f"model.vocab_size={student.model.vocab_size}; distillation matches logits token by token, so both need the same vocabulary"
        )
    if teacher.model.max_seq_len < student.data.seq_len:
        raise ConfigError(
            f"distill.teacher={run_dir!r} has model.max_seq_len={teacher.model.max_seq_len}, shorter than the student's "
            f"data.seq_len={student.data.seq_len}; lower data.seq_len to {teacher.model.max_seq_len} or use another teacher"
        )


def teacher_config(cfg: Config, mesh: Mesh) -> Config:
    """The config of the teacher run `cfg.distill.teacher`, checked against the student and `mesh`; no params are read."""
    run_dir = cfg.distill.teacher
    if not run_dir:
        raise ConfigError("distill.teacher is empty: set it to a trained run's directory, e.g. --set distill.teacher=runs/small")
    if Path(run_dir).resolve() == Path(cfg.train.run_dir).resolve():
        raise ConfigError(f"distill.teacher={run_dir!r} is this run's own train.run_dir; the teacher must be another, finished run")
    if not Path(run_dir).is_dir():
        raise ConfigError(f"distill.teacher={run_dir!r} does not exist; train the teacher first (scripts/train.py --run_dir {run_dir})")
    try:
        teacher_cfg = load_run_config(run_dir)
        check_teacher_config(cfg, teacher_cfg, run_dir)
        check_layout(teacher_cfg.model, mesh)
    except ConfigError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    return teacher_cfg


def load_teacher(cfg: Config, mesh: Mesh) -> Teacher:
    """The teacher of `cfg.distill`, loaded sharded onto `mesh`; call under `jax.set_mesh(mesh)` and the logical rules."""
    teacher_config(cfg, mesh)
    run_dir = cfg.distill.teacher
    try:
        teacher_cfg, graphdef, params, step = load_params(run_dir, mesh=mesh)
    except ConfigError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return Teacher(cfg=teacher_cfg, graphdef=graphdef, params=params, shardings=shardings, step=step, run_dir=str(run_dir))


def describe(cfg: DistillConfig) -> str:
    return f"loss = {1 - cfg.weight:g}·CE + {cfg.weight:g}·{cfg.temperature:g}²·KL at temperature {cfg.temperature:g}"


def mixed_loss(logits_BTV: jax.Array, teacher_logits_BTV: jax.Array, targets_BT: jax.Array, temperature: float, weight: float) -> jax.Array:
    """(1-w)·CE + w·T²·KL(teacher_T || student_T), mean over tokens, in nats."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()
    student_logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    teacher_logp_BTV = jax.nn.log_softmax(teacher_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    kl_BT = jnp.sum(jnp.exp(teacher_logp_BTV) * (teacher_logp_BTV - student_logp_BTV), axis=-1)
    return (1.0 - weight) * ce + weight * temperature**2 * kl_BT.mean()


def make_distill_loss(graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef, cfg: DistillConfig, run_layers: LayerRunner = scan_layers):
    """`loss(params, batch, teacher_params)`: the student's forward, the teacher's (no gradient), `mixed_loss`."""

    def loss(params: Params, batch, teacher_params: Params) -> jax.Array:
        packing = {"segment_ids_BT": batch.get("segment_ids")}  # packed rows: documents stay apart for both models
        logits_BTV = nnx.merge(graphdef, params)(batch["inputs"], batch.get("positions"), run_layers=run_layers, **packing)
        # The teacher scans its own layers (its depth need not fit the student's pipeline stages).
        teacher_logits_BTV = jax.lax.stop_gradient(nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))(batch["inputs"], batch.get("positions"), **packing))
        return mixed_loss(logits_BTV, teacher_logits_BTV, batch["targets"], cfg.temperature, cfg.weight)

    return loss


__all__ = ["Teacher", "check_teacher_config", "describe", "load_teacher", "make_distill_loss", "mixed_loss", "teacher_config"]
