"""A TF SavedModel for TF Serving, built from `jax.export` artifacts with one XlaCallModule op each.

Why not `jax2tf.convert`: it always embeds the module serialized at JAX's *own* StableHLO
target (`_module_to_bytecode`, "a version >= 4 weeks old": 1.18.0 on JAX 0.12), which TF 2.21
cannot read once shapes are symbolic. Here we re-serialize the same module at the version the
target runtime reads (`jax.extend.mlir.serialize_portable_artifact`) and emit the op ourselves,
mirroring `jax2tf._run_exported_as_tf` (minus the sharding annotations: a single device).

Params become non-trainable `tf.Variable`s named by param path (int8/fp8 leaves stay int8/fp8
in `variables/`), passed to the op as arguments.

Each signature asserts what the model can answer before the op runs (`tf.debugging.assert_*`, a
control dependency of the op): token ids in [0, vocab_size), lengths within model.max_seq_len, and
generate's max_new_tokens >= 1 and temperature finite and >= 0 (seed is int32 by its dtype).
TF's Assert kernel fails the call with InvalidArgument, which TF Serving answers with HTTP 400 /
INVALID_ARGUMENT. Why here and not inside the StableHLO: XLA's gather clamps out-of-range indices
and has no data-dependent error (jax.export's `shape_assertion` checks dimension sizes only, and
`checkify` would need an extra output for the caller to read), while the wrapper's ops run on any
TF runtime that loads the SavedModel. The logits of valid requests are untouched: the checks only
read the inputs. The same rules, with messages naming the input, run in the embedded server and
the clients before a request gets here (jaxbig.serve.limits).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.extend.mlir
import numpy as np
import tensorflow as tf
from jax import export
from tensorflow.compiler.tf2xla.python import xla as tfxla

from jaxbig.config import ConfigError
from jaxbig.export.artifact import Leaves
from jaxbig.export.targets import ServingTarget

WARMUP_FILE = "tf_serving_warmup_requests"


def module_bytes_for(exported: export.Exported, target: ServingTarget) -> bytes:
    """The exported StableHLO re-serialized as a portable artifact the target runtime can read."""
    return jax.extend.mlir.serialize_portable_artifact(exported.mlir_module(), target.stablehlo_version)


def check_runtime(exported: export.Exported, target: ServingTarget) -> None:
    cc = exported.calling_convention_version
    if cc > target.max_calling_convention:
        raise ConfigError(
            f"the export uses jax.export calling convention {cc} but {target.name} supports at most "
            f"{target.max_calling_convention}; set JAX_EXPORT_CALLING_CONVENTION_VERSION={target.max_calling_convention}"
        )
    local_max = tfxla.call_module_maximum_supported_version()
    if cc > local_max:
        raise ConfigError(f"the installed TensorFlow {tf.__version__} supports calling convention <= {local_max}, the export needs {cc}; install tensorflow-cpu=={target.tensorflow}.*")


def _static(d) -> int | None:
    return int(d) if isinstance(d, (int, np.integer)) else None


def call_exported(args: list[tf.Tensor], exported: export.Exported, module: bytes) -> list[tf.Tensor]:
    """Runs `exported` (re-serialized as `module`) on TF tensors: one XlaCallModule op."""
    kept = [a for i, a in enumerate(args) if i in exported.module_kept_var_idx]
    return tfxla.call_module(
        kept,
        version=exported.calling_convention_version,
        module=module,
        Tout=[tf.as_dtype(a.dtype) for a in exported.out_avals],
        Sout=[[_static(d) for d in a.shape] for a in exported.out_avals],
        platforms=[p.upper() for p in exported.platforms],
        disabled_checks=[str(c) for c in exported.disabled_safety_checks],
        has_token_input_output=False,
        function_list=[],
        use_shardy_partitioner=jax.config.jax_use_shardy_partitioner,
    )


class Params(tf.Module):
    def __init__(self, leaves: Leaves):
        super().__init__(name="jaxbig")
        self.params = [tf.Variable(a, trainable=False, name=n) for n, a in leaves]


def _token_checks(name: str, tokens_BT: tf.Tensor, vocab_size: int, max_len: int) -> list:
    """Assertions that tokens_BT [B, T] holds ids in [0, vocab_size) and 1 <= T <= max_len."""
    length = tf.shape(tokens_BT)[1]
    return [
        tf.debugging.assert_non_negative(tokens_BT, message=f"{name}: token ids must be in [0, {vocab_size}) (model.vocab_size)"),
        tf.debugging.assert_less(tokens_BT, vocab_size, message=f"{name}: token ids must be in [0, {vocab_size}) (model.vocab_size)"),
        tf.debugging.assert_greater(length, 0, message=f"{name}: the length must be at least 1"),
        tf.debugging.assert_less_equal(length, max_len, message=f"{name}: the length must be at most {max_len} (model.max_seq_len)"),
    ]


def save(
    path: Path, leaves: Leaves, forward: export.Exported, generate: export.Exported, target: ServingTarget, max_seq_len: int, vocab_size: int
) -> None:
    """Writes the SavedModel. The tf.functions are signatures only, not module attributes, so each is
    traced and stored once (as attributes they were stored twice: 2x the module bytes in saved_model.pb)."""
    module = Params(leaves)
    forward_module, generate_module = module_bytes_for(forward, target), module_bytes_for(generate, target)

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, None], tf.int32, name="tokens")])
    def serve(tokens):
        """tokens [B, T] int32 -> logits [B, T, V] float32: next-token logits at every position."""
        with tf.control_dependencies(_token_checks("tokens", tokens, vocab_size, max_seq_len)):
            (logits,) = call_exported([*module.params, tokens], forward, forward_module)
        return {"logits": logits}

    @tf.function(
        autograph=False,
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="prompt"),
            tf.TensorSpec([], tf.int32, name="max_new_tokens"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int32, name="seed"),
        ],
    )
    def generate_fn(prompt, max_new_tokens, temperature, seed):
        """prompt [B, P] int32 -> tokens [B, max_new_tokens] int32 (greedy at temperature 0)."""
        total = tf.shape(prompt)[1] + max_new_tokens
        checks = [
            *_token_checks("prompt", prompt, vocab_size, max_seq_len - 1),
            tf.debugging.assert_greater(max_new_tokens, 0, message="max_new_tokens must be at least 1"),
            tf.debugging.assert_less_equal(total, max_seq_len, message=f"prompt length + max_new_tokens exceeds model.max_seq_len={max_seq_len}"),
            tf.debugging.Assert(tf.math.is_finite(temperature) & (temperature >= 0), ["temperature must be finite and >= 0 (0 = greedy); got", temperature]),
        ]
        with tf.control_dependencies(checks):
            (tokens,) = call_exported([*module.params, prompt, max_new_tokens, temperature, seed], generate, generate_module)
        return {"tokens": tokens[:, :max_new_tokens]}

    signatures = {"serving_default": serve.get_concrete_function(), "generate": generate_fn.get_concrete_function()}
    tf.saved_model.save(module, str(path), signatures=signatures)


def write_warmup(path: Path, model_name: str, requests: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    """`assets.extra/tf_serving_warmup_requests`: a TFRecord of PredictionLog protos TF Serving replays on load."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    (path / "assets.extra").mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path / "assets.extra" / WARMUP_FILE)) as writer:
        for signature, inputs in requests:
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
