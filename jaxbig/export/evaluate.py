"""What quantization costs: validation perplexity and on-disk size of exported versions.

Perplexity runs the *exported* forward function (`jax.export` artifact, reloaded) on the
run's own validation split, so it measures exactly the math TF Serving executes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


def serving_call(version_dir: str | Path, runtime: str = "tf") -> Callable[[np.ndarray], np.ndarray]:
    """tokens [B, T] int32 -> logits [B, T, V] float32 through the version's `serving_default`, in this process.

    "tf": the SavedModel on the TF runtime (`tf.saved_model.load`: the graph TF Serving executes);
    "onnx": onnx/model.onnx on ONNX Runtime's CPU provider, every graph optimisation on.
    """
    if runtime == "onnx":
        # onnxruntime is imported only to evaluate ONNX exports.
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(Path(version_dir) / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"])
        return lambda tokens_BT: session.run(["logits"], {"tokens": tokens_BT})[0]
    if runtime != "tf":
        raise ValueError(f"runtime {runtime!r} is not one of 'tf', 'onnx'")
    # TensorFlow is imported only to time the SavedModel itself.
    import tensorflow as tf

    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    return lambda tokens_BT: fn(tokens=tf.constant(tokens_BT))["logits"].numpy()


def onnx_perplexity(version_dir: str | Path, windows_NBT: np.ndarray) -> float:
    """`perplexity` of the export's ONNX serving_default on ONNX Runtime (every graph optimisation on)."""
    forward = serving_call(version_dir, "onnx")
    nlls = []
    for window_BT in windows_NBT:
        logits_BTV = forward(window_BT[:, :-1]).astype(np.float64)
        logp_BTV = logits_BTV - logits_BTV.max(-1, keepdims=True)
        logp_BTV -= np.log(np.exp(logp_BTV).sum(-1, keepdims=True))
        nlls.append(-np.take_along_axis(logp_BTV, window_BT[:, 1:, None], axis=-1).mean())
    return float(np.exp(np.mean(nlls)))


def serving_latency(
    version_dirs: dict[str, Path], tokens_BT: np.ndarray, runtime: str = "tf", rounds: int = 7, calls: int = 10
) -> dict[str, float]:
    """Median seconds of one `serving_default` call per version, one thread in this process, in alternating rounds.

    All versions are loaded and called once first (tracing, kernel set-up); then each round times `calls`
    consecutive calls of every version, the order rotated by one from round to round, so a slow spell of a
    shared machine falls on all versions alike. Returns the median over all timed calls.
    """
    calls_by_name = {name: serving_call(path, runtime) for name, path in version_dirs.items()}
    for call in calls_by_name.values():
        call(tokens_BT)
    names = list(calls_by_name)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            call = calls_by_name[name]
            for _ in range(calls):
                start = time.perf_counter()
                call(tokens_BT)
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}
