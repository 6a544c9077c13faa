"""`export_run`: a trained run -> one TF Serving version directory, written atomically.

exports/NAME/<V>/
  saved_model.pb, variables/          TF SavedModel: signatures serving_default and generate
  assets.extra/tf_serving_warmup_requests
  jax/{forward,generate}.jax_exported, jax/params.npz
  onnx/model.onnx, onnx/decode_step.onnx   with --format onnx or all (jaxbig.interop.onnx)
  manifest.json                       lists the formats written, holds the reference profile the server's monitoring
                                      compares traffic with (jaxbig.export.profile), and names the run's tokenizer; its files lie beside it:
  tokenizer.model | tokenizer.json, tokenizer_config.json   (SentencePiece | Hugging Face; none for bytes)
Everything is written to exports/NAME/.tmp-<V>-*, then renamed: a failed export leaves no
version directory behind (TF Serving ignores non-numeric names while it is being written).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import flax
import jax
import jaxlib
import numpy as np

from jaxbig.compress.int4 import GROUPS as INT4_GROUPS
from jaxbig.compress.prune import sparsity_by_layer
from jaxbig.compress.quantize import check_method, llama_rules, quantize_params
from jaxbig.config import ConfigError
from jaxbig.data.run import run_tokenizer
from jaxbig.export.artifact import PLATFORMS, export_functions, flatten_params, leaf_manifest, to_leaves, write_artifacts
from jaxbig.export.profile import reference_profile
from jaxbig.export.targets import get_target
from jaxbig.checkpoint.run import load_params

MANIFEST = "manifest.json"
FORMATS = {"savedmodel": ("savedmodel",), "onnx": ("onnx",), "all": ("savedmodel", "onnx")}  # --format -> what is written
_WEIGHT_ONLY = "weight-only, per-output-channel absmax; dequantized (q.astype(f32) * scale) before each matmul"
_SCHEMES = {
    "none": "none",
    "int8": _WEIGHT_ONLY,
    "fp8": _WEIGHT_ONLY,
    "int8-dynamic": (
        "W8A8 dynamic-range: weights int8 per-output-channel absmax (stored as for int8); every weight matmul "
        "quantizes its activations to int8 per row (absmax over the contracted axes) at run time and runs "
        "int8 x int8 -> int32, rescaled by the activation and weight scales; the embedding lookup, attention "
        "(q.k, probs.v) and norms stay float32"
    ),
    "int4": (
        "weight-only int4, round to nearest, symmetric (scale = the group's largest-magnitude weight / -8), one float32 "
        "scale per group_size weights along the contracted axes, two codes per uint8 (first in the low nibble, code + 8); "
        "unpacked inside the function with uint8 & and >>, then (code - 8) * scale before each matmul"
    ),
}


def _jax_stablehlo_version() -> str:
    # The version JAX itself serializes at (private API; recorded for the manifest only).
    from jax._src.lib.mlir.dialects import hlo

    return hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_4)


def _warmup_requests(max_seq_len: int) -> list[tuple[str, dict[str, np.ndarray]]]:
    """One request per batch size TF Serving is likely to see first, plus one generate call."""
    reqs = [("serving_default", {"tokens": np.ones((b, min(16, max_seq_len)), np.int32)}) for b in (1, 8)]
    n = min(4, max_seq_len - 1)
    reqs.append(("generate", {"prompt": np.ones((1, 1), np.int32), "max_new_tokens": np.int32(n), "temperature": np.float32(0), "seed": np.int32(0)}))
    return reqs


def _sparsity(flat: dict[str, np.ndarray], leaves) -> dict:
    """Exact zeros per weight and layer in the exported float weights, and in the stored int8/fp8 codes.

    Pruned weights are stored as zeros (dense layout: TF Serving has no sparse weight format);
    quantization maps 0 to code 0, and may round further small weights to 0.
    """
    report = sparsity_by_layer(flat)
    codes = sparsity_by_layer({name[: -len(".q")]: np.asarray(a) for name, a in leaves if name.endswith(".q")})
    for path, entry in report.items():
        if path in codes:
            entry["stored_sparsity"] = codes[path]["sparsity"]
    return report


def export_run(
    run_dir: str | Path,
    out: str | Path,
    version: int,
    *,
    step: int | None = None,
    quantize: str = "int8",
    target: str = "tf-serving-2.21",
    overwrite: bool = False,
    format: str = "savedmodel",
    group_size: int = 64,
) -> Path:
    """Exports a run's checkpoint; returns the version directory. Raises ConfigError on bad input.

    `format`: savedmodel (the SavedModel and the jax.export artifacts), onnx (jaxbig.interop.onnx's two graphs)
    or all (both). `group_size`: int4's group along the contracted axis (ONNX).
    """
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is not supported; use one of {', '.join(FORMATS)}")
    formats = FORMATS[format]
    serving = get_target(target)
    if "onnx" in formats:
        from jaxbig.interop import onnx as onnx_export  # onnx and jax2onnx are imported only for ONNX exports

        onnx_export.check_method(quantize, group_size)
    if "savedmodel" in formats:
        try:
            check_method(quantize)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if quantize == "int4" and group_size not in INT4_GROUPS:
            raise ConfigError(f"--group_size {group_size} is not supported; use one of {', '.join(map(str, INT4_GROUPS))}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"--version {version!r} must be a positive integer (TF Serving serves numbered version directories)")
    out = Path(out)
    final = out / str(version)
    if final.exists() and not overwrite:
        raise ConfigError(f"{str(final)!r} already exists; pick another --version or pass --overwrite")
    cfg, graphdef, params, step = load_params(run_dir, step)
    tokenizer = run_tokenizer(cfg, run_dir)  # the clients (jaxbig.serve.client.load_tokenizer) tokenize with it
    profile = reference_profile(cfg, graphdef, params)  # before anything is written: a too-short validation split fails here

    flat = flatten_params(params)
    rules = llama_rules()
    try:
        leaves = to_leaves(quantize_params(flat, quantize, rules, group_size)) if "savedmodel" in formats else []
    except ValueError as e:  # int4 groups that do not fit a weight's contracted size
        raise ConfigError(str(e)) from None
    if "savedmodel" in formats:
        forward, generate = export_functions(graphdef, cfg.model, leaves, quantize)

        from jaxbig.export import savedmodel  # TensorFlow is imported only when exporting

        savedmodel.check_runtime(forward, serving)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=out))
    try:
        tokenizer.save_files(tmp)
        manifest = {
            "format": "jaxbig-export/1",
            "formats": list(formats),
            "run_dir": str(run_dir),
            "step": step,
            "model": cfg.to_dict()["model"],
            "tokenizer": tokenizer.to_dict() | {"fingerprint": tokenizer.fingerprint()},
            "sparsity": _sparsity(flat, leaves),
            "profile": profile.to_dict(),
            "quantization": {"method": quantize},  # the SavedModel's scheme below; ONNX's under "onnx"
            "signatures": {
                "serving_default": {
                    "inputs": {"tokens": "int32 [B, T]"},
                    "outputs": {"logits": "float32 [B, T, V]"},
                    "limit": f"0 <= tokens < {cfg.model.vocab_size}, 1 <= T <= {cfg.model.max_seq_len}",
                },
                "generate": {
                    "inputs": {"prompt": "int32 [B, P]", "max_new_tokens": "int32 []", "temperature": "float32 [] (0 = greedy)", "seed": "int32 []"},
                    "outputs": {"tokens": "int32 [B, max_new_tokens]"},
                    "limit": f"0 <= prompt < {cfg.model.vocab_size}, max_new_tokens >= 1, P + max_new_tokens <= {cfg.model.max_seq_len}, temperature finite and >= 0",
                },
            },
            "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__},
        }
        if "savedmodel" in formats:
            write_artifacts(tmp, forward, generate, leaves)
            savedmodel.save(tmp, leaves, forward, generate, serving, cfg.model.max_seq_len, cfg.model.vocab_size)
            savedmodel.write_warmup(tmp, out.name, _warmup_requests(cfg.model.max_seq_len))
            manifest["versions"]["tensorflow"] = savedmodel.tf.__version__
            manifest |= {
                "params": leaf_manifest(leaves),
                "quantization": {
                    "method": quantize,
                    **({"group_size": group_size} if quantize == "int4" else {}),
                    "scheme": _SCHEMES[quantize],
                    "rules": [{"pattern": r.pattern, "reduce_axes": list(r.reduce_axes)} for r in rules] if quantize != "none" else [],
                },
                "stablehlo": {
                    "jax_artifacts": _jax_stablehlo_version(),
                    "saved_model": serving.stablehlo_version,
                    "why": f"{serving.name} embeds TensorFlow {serving.tensorflow}, whose StableHLO cannot read newer portable artifacts",
                },
                "calling_convention_version": forward.calling_convention_version,
                "platforms": list(PLATFORMS),
                "target": {"name": serving.name, "tensorflow": serving.tensorflow, "max_calling_convention": serving.max_calling_convention},
                "jax_artifacts": {
                    "forward": {"file": "jax/forward.jax_exported", "in_avals": [str(a) for a in forward.in_avals[-1:]], "out_avals": [str(a) for a in forward.out_avals]},
                    "generate": {"file": "jax/generate.jax_exported", "out_avals": [str(a) for a in generate.out_avals]},
                    "params": "jax/params.npz",
                },
            }
        if "onnx" in formats:  # the ONNX graphs and how they were quantized (ONNX Runtime's tools; see jaxbig.interop.onnx)
            manifest["onnx"] = onnx_export.write(tmp / "onnx", cfg.model, params, quantize, group_size)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        old = None
        if final.exists():  # --overwrite: move the old one aside, then swap
            old = out / f".old-{version}-{tmp.name}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
