"""Text in, text out, from a trained run: tokenize, decode with the KV cache, detokenize (with the run's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxbig.config import ConfigError
from jaxbig.data.run import run_tokenizer
from jaxbig.models.decode import generate
from jaxbig.checkpoint.run import load_params


def sample_text(
    run_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    step: int | None = None,
) -> str:
    """The continuation of `prompt` (without the prompt), up to the tokenizer's eos.

    The run's tokenizer (`jaxbig.data.run_tokenizer`) encodes the prompt as transformers would (a Llama-family
    tokenizer puts its BOS first) and decodes the continuation, skipping special tokens.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    cfg, graphdef, params, _ = load_params(run_dir, step)
    tokenizer = run_tokenizer(cfg, run_dir)
    try:
        prompt_P = tokenizer.encode(prompt)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if len(prompt_P) == 0:
        raise ConfigError("the prompt is empty; give at least one character, e.g. --prompt 'def '")
    if top_k < 0 or top_k > cfg.model.vocab_size:
        raise ConfigError(f"top_k={top_k} must be in [0, vocab_size={cfg.model.vocab_size}]")
    total = len(prompt_P) + max_new_tokens
    if total > cfg.model.max_seq_len:
        raise ConfigError(
            f"prompt of {len(prompt_P)} tokens + max_new_tokens={max_new_tokens} = {total} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
            "shorten the prompt or ask for fewer tokens"
        )
    out_BN = generate(graphdef, params, prompt_P[None], jax.random.key(seed), max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    ids = np.asarray(out_BN)[0]
    eos = np.flatnonzero(ids == tokenizer.eos_id) if tokenizer.eos_id is not None else []
    return tokenizer.decode(ids[: eos[0]] if len(eos) else ids)
