"""An export's ONNX graphs on ONNX Runtime: `serving_default` and `generate`, with numpy and onnxruntime only.

    model = OnnxModel("exports/tiny/3")              # reads onnx/model.onnx, onnx/decode_step.onnx
    logits_BTV = model.forward(tokens_BT)
    tokens_BN = model.generate(prompt_BP, max_new_tokens=12, temperature=0.0, seed=0)

`generate` runs the decode loop in Python around `decode_step.onnx`, as ONNX Runtime GenAI's Generator does
around its exported step (docs/serving.md says why not an in-graph Loop): one prefill step over the prompt,
then one step per token, the KV cache a [B, max_seq_len, N, K] buffer per layer and kind that each step
returns with its new rows written. Greedy (temperature 0) takes the first argmax, as
`jaxbig.models.decode.sample_logits` does. Sampling draws from softmax(logits / temperature) with numpy's
generator seeded by `seed`: reproducible for a seed, but not the same tokens as the SavedModel's
`jax.random` draws for that seed (the same distribution).

`OnnxServable` puts a model behind the embedded server (jaxbig.serve.models.ModelManager's loader): the
same SignatureDefs as the SavedModel, so ServingCore's checks, REST/gRPC, metadata, batching, metrics and
version swaps are shared by both runtimes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

ONNX_DIR = "onnx"
FORWARD_FILE, STEP_FILE = "model.onnx", "decode_step.onnx"  # jaxbig.interop.onnx writes them


def has_onnx(version_dir: str | Path) -> bool:
    return (Path(version_dir) / ONNX_DIR / FORWARD_FILE).is_file()


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with every graph optimisation on (threads 0: ONNX Runtime's default)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """The two graphs of one export version (see the module docstring)."""

    def __init__(self, version_dir: str | Path, threads: int = 0):
        onnx_dir = Path(version_dir) / ONNX_DIR
        self.forward_session = session(onnx_dir / FORWARD_FILE, threads)
        self.step_session = session(onnx_dir / STEP_FILE, threads)
        self.past_names = [i.name for i in self.step_session.get_inputs()[2:]]
        _, self.max_seq_len, self.num_kv_heads, self.head_dim = self.step_session.get_inputs()[2].shape

    def forward(self, tokens_BT: np.ndarray) -> np.ndarray:
        """tokens [B, T] int32 -> logits [B, T, V] float32."""
        return self.forward_session.run(["logits"], {"tokens": np.asarray(tokens_BT, np.int32)})[0]

    def step(self, input_ids_BT: np.ndarray, position: int, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decode step: logits [B, T, V] for the T new tokens, and the cache with their rows written."""
        feeds = {"input_ids": np.asarray(input_ids_BT, np.int32), "position": np.asarray(position, np.int32), **dict(zip(self.past_names, past))}
        logits, *present = self.step_session.run(None, feeds)
        return logits, present

    def generate(self, prompt_BP: np.ndarray, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> np.ndarray:
        """[B, max_new_tokens] int32: greedy at temperature 0, else sampled (see the module docstring)."""
        prompt_BP = np.asarray(prompt_BP, np.int32)
        B, P = prompt_BP.shape
        if P + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt of {P} tokens + max_new_tokens={max_new_tokens} exceeds model.max_seq_len={self.max_seq_len}")
        rng = np.random.default_rng(seed)
        past = [np.zeros((B, self.max_seq_len, self.num_kv_heads, self.head_dim), np.float32) for _ in self.past_names]
        logits, past = self.step(prompt_BP, 0, past)
        out_BN = np.zeros((B, max_new_tokens), np.int32)
        out_BN[:, 0] = _choose(logits[:, -1], temperature, rng)
        for i in range(1, max_new_tokens):
            logits, past = self.step(out_BN[:, i - 1 : i], P + i - 1, past)
            out_BN[:, i] = _choose(logits[:, -1], temperature, rng)
        return out_BN


def _choose(logits_BV: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    if temperature <= 0:
        return np.argmax(logits_BV, axis=-1).astype(np.int32)
    z = logits_BV.astype(np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], np.int32)


class OnnxServable:
    """One loaded version on ONNX Runtime, with the interface of jaxbig.serve.models.Servable."""

    def __init__(self, name: str, version: int, path: Path, *, warmup: bool = True):
        from jaxbig.serve.limits import ModelLimits  # grpc comes with it: the server needs it, OnnxModel alone does not

        self.name, self.version, self.path = name, version, Path(path)
        self.model = OnnxModel(path)
        self.limits = ModelLimits.read(path)
        manifest = json.loads((self.path / "manifest.json").read_text())
        self.signature_defs = signature_defs(int(manifest["model"]["vocab_size"]))
        self.functions = {"serving_default": self._serve, "generate": self._generate}
        self.inflight = 0
        if warmup:  # ONNX Runtime optimises when the session is made; one call each touches every kernel
            self._serve({"tokens": np.ones((1, 2), np.int32)})
            self._generate({"prompt": np.ones((1, 1), np.int32), "max_new_tokens": np.int32(2), "temperature": np.float32(0), "seed": np.int32(0)})

    def _serve(self, inputs):
        return {"logits": self.model.forward(inputs["tokens"])}

    def _generate(self, inputs):
        n = int(inputs["max_new_tokens"])
        return {"tokens": self.model.generate(inputs["prompt"], n, float(inputs["temperature"]), int(inputs["seed"]))}

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.functions[signature](inputs)


def signature_defs(vocab_size: int) -> dict:
    """The SavedModel's two SignatureDefs (jaxbig.export.savedmodel), for metadata and request checks."""
    # TensorFlow's protos, imported here: the server speaks them, while OnnxModel runs without TensorFlow.
    from tensorflow.core.framework import tensor_shape_pb2, types_pb2
    from tensorflow.core.protobuf import meta_graph_pb2

    def info(name: str, dtype: int, dims: list[int]) -> meta_graph_pb2.TensorInfo:
        shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims])
        return meta_graph_pb2.TensorInfo(name=name, dtype=dtype, tensor_shape=shape)

    i32, f32 = types_pb2.DT_INT32, types_pb2.DT_FLOAT
    method = "tensorflow/serving/predict"
    serve = meta_graph_pb2.SignatureDef(method_name=method)
    serve.inputs["tokens"].CopyFrom(info("serving_default_tokens:0", i32, [-1, -1]))
    serve.outputs["logits"].CopyFrom(info("StatefulPartitionedCall:0", f32, [-1, -1, vocab_size]))
    gen = meta_graph_pb2.SignatureDef(method_name=method)
    gen.inputs["prompt"].CopyFrom(info("generate_prompt:0", i32, [-1, -1]))
    gen.inputs["max_new_tokens"].CopyFrom(info("generate_max_new_tokens:0", i32, []))
    gen.inputs["temperature"].CopyFrom(info("generate_temperature:0", f32, []))
    gen.inputs["seed"].CopyFrom(info("generate_seed:0", i32, []))
    gen.outputs["tokens"].CopyFrom(info("StatefulPartitionedCall_1:0", i32, [-1, -1]))
    return {"serving_default": serve, "generate": gen}
