"""Learning-rate schedules from config: warmup, then constant, cosine, linear or warmup-stable-decay."""

from __future__ import annotations

import optax

from jaxbig.config import ConfigError, OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then `cfg.schedule` down to `min_lr_ratio` of it at `total_steps`.

    constant: stays at the peak. cosine: cosine decay. linear: linear decay. wsd
    (warmup-stable-decay): the peak until the last `decay_fraction` of the steps, then linear.
    """
    peak, end, warmup = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio, cfg.warmup_steps
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=end
        )
    ramp = optax.linear_schedule(0.0, peak, warmup)
    if cfg.schedule == "constant":  # not optax.warmup_constant_schedule: with 0 warmup steps it stays at 0
        return optax.join_schedules([ramp, optax.constant_schedule(peak)], [warmup])
    if cfg.schedule == "linear":
        return optax.join_schedules([ramp, optax.linear_schedule(peak, end, max(total_steps - warmup, 1))], [warmup])
    if cfg.schedule == "wsd":
        decay = max(1, round(cfg.decay_fraction * total_steps))
        stable_end = max(warmup, total_steps - decay)
        return optax.join_schedules(
            [ramp, optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [warmup, stable_end]
        )
    raise ConfigError(f"optim.schedule={cfg.schedule!r}: use constant, cosine, linear or wsd")


__all__ = ["learning_rate_schedule"]
