"""Optimizers from config, built from optax transforms.

- `schedules`: the learning-rate schedule (warmup, then constant, cosine, linear or wsd).
- `optimizers`: `build_optimizer`, the chain a step applies: clipping, then AdamW / SGD / Lion /
  Adafactor, with gradient compression first or the DiLoCo wrapper around it when asked.
- `run_optimizer`: `optimizer_for`, the run's optimizer on a mesh (its checks, PowerSGD views from
  the model's logical axes, pruning, skipping non-finite steps).
- `compression`, `local_sgd`, `per_replica`: compression with error feedback, DiLoCo, and the
  per-data-replica optimizer state they keep; `views`: PowerSGD's matrix views; `nonfinite`.
"""

from jaxbig.optim.nonfinite import MAX_CONSECUTIVE_SKIPS, nonfinite_metrics
from jaxbig.optim.optimizers import base_optimizer, build_optimizer, decay_mask, uses_data_parallel_step
from jaxbig.optim.run_optimizer import check_accumulation, check_mesh, optimizer_for
from jaxbig.optim.schedules import learning_rate_schedule
from jaxbig.optim.views import matrix_views

__all__ = [
    "MAX_CONSECUTIVE_SKIPS",
    "base_optimizer",
    "build_optimizer",
    "check_accumulation",
    "check_mesh",
    "decay_mask",
    "learning_rate_schedule",
    "matrix_views",
    "nonfinite_metrics",
    "optimizer_for",
    "uses_data_parallel_step",
]
