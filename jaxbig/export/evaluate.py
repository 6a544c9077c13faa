"""What quantization costs: validation perplexity and on-disk size of exported versions.

Perplexity runs the *exported* forward function (`jax.export` artifact, reloaded) on the
run's own validation split, so it measures exactly the math TF Serving executes.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxbig.data.corpus import load_corpus
from jaxbig.export.reload import load_exported
from jaxbig.checkpoint.run import load_run_config


def saved_model_bytes(version_dir: str | Path) -> int:
    """Bytes TF Serving loads: the version directory without the jax/ artifacts."""
    d = Path(version_dir)
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.relative_to(d).parts[0] != "jax")


def validation_windows(run_dir: str | Path, batches: int, batch_size: int) -> np.ndarray:
    """[batches, B, T+1] int32: the first consecutive windows of the run's validation split."""
    cfg = load_run_config(run_dir)
    val = load_corpus(cfg.data.paths, cfg.data.val_fraction, cfg.data.max_bytes).val_BYTES
    T = cfg.data.seq_len
    n = batches * batch_size
    if (len(val) - 1) // T < n:
        raise ValueError(f"the validation split holds {(len(val) - 1) // T} windows of {T + 1}; ask for fewer than {n}")
    return np.stack([val[i * T : i * T + T + 1] for i in range(n)]).astype(np.int32).reshape(batches, batch_size, T + 1)


def perplexity(version_dir: str | Path, windows_NBT: np.ndarray) -> float:
    """exp(mean next-token cross-entropy) of the exported forward over the windows."""
    forward, _, leaves = load_exported(version_dir)

    @jax.jit
    def nll(leaves, window_BT):
        logits_BTV = forward.call(leaves, window_BT[:, :-1])
        logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
        return -jnp.take_along_axis(logp_BTV, window_BT[:, 1:, None], axis=-1).mean()

    return float(np.exp(np.mean([float(nll(leaves, w)) for w in windows_NBT])))


def onnx_bytes(version_dir: str | Path) -> int:
    """Bytes ONNX Runtime loads for serving_default: onnx/model.onnx (jaxbig.interop.onnx writes no external data)."""
    return (Path(version_dir) / "onnx" / "model.onnx").stat().st_size


def onnx_perplexity(version_dir: str | Path, windows_NBT: np.ndarray) -> float:
    """`perplexity` of the export's ONNX serving_default on ONNX Runtime (every graph optimisation on)."""
    # onnxruntime is imported only to evaluate ONNX exports.
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(Path(version_dir) / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    nlls = []
    for window_BT in windows_NBT:
        logits_BTV = session.run(["logits"], {"tokens": window_BT[:, :-1]})[0].astype(np.float64)
        logp_BTV = logits_BTV - logits_BTV.max(-1, keepdims=True)
        logp_BTV -= np.log(np.exp(logp_BTV).sum(-1, keepdims=True))
        nlls.append(-np.take_along_axis(logp_BTV, window_BT[:, 1:, None], axis=-1).mean())
    return float(np.exp(np.mean(nlls)))
