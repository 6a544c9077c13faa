"""Skipping non-finite steps (`train.skip_nonfinite`): the limit and the metrics `optax.apply_if_finite` keeps."""

from __future__ import annotations

import jax
import optax


MAX_CONSECUTIVE_SKIPS = 10  # train.skip_nonfinite: after this many non-finite steps in a row the run stops


def nonfinite_metrics(opt_state) -> dict[str, jax.Array]:
    """With `optax.apply_if_finite` in the chain: steps skipped so far and the current run of them; else {}."""
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState)) if isinstance(s, optax.ApplyIfFiniteState)]
    if not states:
        return {}
    return {"skipped_steps": states[0].total_notfinite, "nonfinite_streak": states[0].notfinite_count}


__all__ = ["MAX_CONSECUTIVE_SKIPS", "nonfinite_metrics"]
