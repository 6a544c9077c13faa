"""Hugging Face `config.json` <-> `ModelConfig`, refusing what jaxbig cannot compute exactly.

Supported: `LlamaForCausalLM` (Llama 2, Llama 3/3.1/3.2 with `llama3` rope scaling and tied embeddings),
`MistralForCausalLM` (without a sliding window that could bind), `Qwen2ForCausalLM` (q/k/v biases, no
sliding window). Field meanings follow transformers 5.24's `LlamaConfig`/`MistralConfig`/`Qwen2Config`,
and both spellings of RoPE's settings are read: transformers 4.x's top-level `rope_theta` + `rope_scaling`,
and 5.x's `rope_parameters` (docs/interop.md). Anything that would change the computation and that jaxbig
does not implement is refused with an `InteropError` naming the file and the field: jaxbig never loads a
checkpoint it would compute differently from its reference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxbig.config import ConfigError, ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")
# Fields that would change the math when set, and the value jaxbig computes with.
_MUST_BE = {
    "hidden_act": "silu",
    "attention_bias": False,  # llama/mistral: biases on q, k, v and o (Qwen2's q/k/v biases are its own, see below)
    "mlp_bias": False,
    "attention_dropout": 0.0,  # training-time dropout; jaxbig has none
    "partial_rotary_factor": 1.0,
}
# Mixture-of-experts fields (Mixtral, Qwen2-MoE, DeepSeek...): a non-empty one means experts jaxbig does not have.
_MOE_FIELDS = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_routed_experts")


class InteropError(ConfigError):
    """A checkpoint, config or tokenizer jaxbig cannot import or export exactly; the message names the file and field."""


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InteropError(f"{path} not found; a Hugging Face model directory needs it (save one with save_pretrained)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def architecture_of(hf: dict[str, Any], where: str) -> str:
    archs = hf.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        raise InteropError(f"{where}: architectures={archs!r}; jaxbig imports one of {', '.join(ARCHITECTURES)}")
    if archs[0] not in ARCHITECTURES:
        raise InteropError(
            f"{where}: architectures={archs!r} is not supported; jaxbig imports {', '.join(ARCHITECTURES)} "
            "(dense Llama-family decoders)"
        )
    return archs[0]


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig's rope fields from either spelling."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # 5.x per-layer-type form
        params = params["full_attention"]
    scaling = dict(params) if isinstance(params, dict) else dict(hf.get("rope_scaling") or {})
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        field = "rope_parameters" if params is not None else "rope_scaling"
        raise InteropError(
            f"{where}: {field}.rope_type={rope_type!r} is not supported; jaxbig computes {', '.join(ROPE_TYPES)} "
            "(dynamic, yarn and longrope change the frequencies or scale attention with the sequence length)"
        )
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise InteropError(f"{where}: partial_rotary_factor={scaling['partial_rotary_factor']} is not supported; jaxbig rotates the whole head")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": "none" if rope_type == "default" else rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(scaling["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(scaling["low_freq_factor"])
        out["rope_high_freq_factor"] = float(scaling["high_freq_factor"])
        # transformers 5.x defaults a missing original context to max_position_embeddings (4.x required it)
        out["rope_original_max_len"] = int(scaling.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    return out


def _check_attention_window(hf: dict[str, Any], where: str, arch: str) -> None:
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        other = sorted({t for t in layer_types if t != "full_attention"})
        raise InteropError(f"{where}: layer_types has {other}; jaxbig computes full causal attention in every layer")
    if arch == "Qwen2ForCausalLM":
        if hf.get("use_sliding_window"):
            raise InteropError(f"{where}: use_sliding_window=true is not supported; jaxbig computes full causal attention")
        return  # Qwen2's `sliding_window` is read only with use_sliding_window (transformers Qwen2Config)
    window = hf.get("sliding_window")
    if window is not None and window < hf["max_position_embeddings"]:
        raise InteropError(
            f"{where}: sliding_window={window} is shorter than max_position_embeddings={hf['max_position_embeddings']}; "
            "jaxbig computes full causal attention, which differs beyond the window"
        )


def model_config_from_hf(hf: dict[str, Any], where: str, *, param_dtype: str = "float32") -> ModelConfig:
    """The jaxbig model a Hugging Face config describes; `where` (the file) goes into every error message."""
    arch = architecture_of(hf, where)
    for field in _MOE_FIELDS:
        if hf.get(field):
            raise InteropError(f"{where}: {field}={hf[field]!r} describes a mixture of experts; jaxbig imports dense decoders only")
    for field, value in _MUST_BE.items():
        if field in hf and hf[field] is not None and hf[field] != value:
            raise InteropError(f"{where}: {field}={hf[field]!r} is not supported; jaxbig computes {field}={value!r}")
    missing = [f for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings") if f not in hf]
    if missing:
        raise InteropError(f"{where}: missing {', '.join(missing)}; is this a {arch} config.json?")
    _check_attention_window(hf, where, arch)
    heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),  # transformers' default when absent
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM",
        param_dtype=param_dtype,
        **_rope(hf, where),
    )


def hf_config_for(cfg: ModelConfig, base: dict[str, Any] | None, dtype: str) -> dict[str, Any]:
    """config.json for `cfg`: `base` (the imported checkpoint's own config.json, so its architecture, token ids and
    other fields survive) with every model field set from `cfg`; without a base, a `LlamaForCausalLM` (or Qwen2 when
    the model has q/k/v biases). RoPE is written in transformers 4.x's spelling (`rope_theta` + `rope_scaling`),
    which 5.x converts on load; the 5.x `rope_parameters` is dropped so the two cannot disagree."""
    out = dict(base or {})
    arch = out.get("architectures", [None])[0] if base else ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
    if (arch == "Qwen2ForCausalLM") != cfg.qkv_bias:
        raise InteropError(f"model.qkv_bias={cfg.qkv_bias} cannot be written as {arch}; only Qwen2ForCausalLM has q/k/v biases")
    out.update(
        architectures=[arch],
        model_type=ARCHITECTURES[arch],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        rope_theta=cfg.rope_theta,
        dtype=dtype,
    )
    out.pop("rope_parameters", None)
    out.pop("torch_dtype", None)
    out.pop("transformers_version", None)
    if arch != "Qwen2ForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    out.pop("layer_types", None)  # recomputed by transformers from the (full-attention) config
    if cfg.rope_scaling == "none":
        out["rope_scaling"] = None
    elif cfg.rope_scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    else:
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    return out


__all__ = ["ARCHITECTURES", "InteropError", "architecture_of", "hf_config_for", "model_config_from_hf", "read_json"]
