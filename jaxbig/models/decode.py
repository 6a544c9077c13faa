"""Autoregressive sampling with a KV cache: prefill the prompt once, then one token per step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxbig.models.llama import init_cache


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: int) -> jax.Array:
    """Greedy when temperature <= 0, else softmax(logits / temperature) over the top_k (0 = all)."""
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, jnp.finfo(logits_BV.dtype).min, logits_BV)
    greedy_B = jnp.argmax(logits_BV, axis=-1)
    sampled_B = jax.random.categorical(rng, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k"))
def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_BP: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float | jax.Array = 0.0,
    top_k: int = 0,
) -> jax.Array:
    """Returns `max_new_tokens` sampled continuation tokens, [B, max_new_tokens] int32."""
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    B, P = prompt_BP.shape
    total = P + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"prompt of {P} tokens + max_new_tokens={max_new_tokens} = {total} exceeds model.max_seq_len={cfg.max_seq_len}; "
            "shorten the prompt or ask for fewer tokens"
        )
    temperature = jnp.asarray(temperature, jnp.float32)
    cache = init_cache(cfg, B, total)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits_BPV, cache = model(prompt_BP.astype(jnp.int32), positions_BP, cache)
    rngs = jax.random.split(rng, max_new_tokens)
    first_B = sample_logits(logits_BPV[:, -1], rngs[0], temperature, top_k)

    def step(carry, xs):
        token_B, cache = carry
        i, key = xs
        positions_B1 = jnp.full((B, 1), P + i, jnp.int32)
        logits_B1V, cache = model(token_B[:, None], positions_B1, cache)
        next_B = sample_logits(logits_B1V[:, 0], key, temperature, top_k)
        return (next_B, cache), next_B

    (_, _), rest_NB = jax.lax.scan(step, (first_B, cache), (jnp.arange(max_new_tokens - 1), rngs[1:]))
    return jnp.concatenate([first_B[:, None], rest_NB.T], axis=1)
