"""Serving: TF Serving's REST and gRPC APIs answer like the model does, refuse bad input, and survive a version switch.

The server runs as `scripts/serve.py` in its own process on free loopback ports: the embedded
server always, a real `tensorflow_model_server` too when one is on PATH (those cases are skipped,
with a message, otherwise). Clients are plain HTTP (requests) and TF Serving's own gRPC stubs.
One tiny run is trained once and exported as float32 (version 1) and int8 (version 2), each as a
SavedModel and as ONNX (`--format all`). The same suite runs against the embedded server on the TF
runtime (`embedded`), on ONNX Runtime (`onnx`: `--runtime onnx`) and against a real TF Serving.
"""

import json
import os
import re
import shutil
import threading

import grpc
import numpy as np
import pytest
import requests

from benchmarks.serving import ServerProcess, checked_calls, run_load
from jaxbig.config import load_config
from jaxbig.export.bundle import export_run
from jaxbig.export.reload import load_exported
from jaxbig.models.decode import generate as jax_generate
from jaxbig.serve import tf_serving
from jaxbig.checkpoint.run import load_params

tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from test_export import SMALL  # noqa: E402 - the same tiny model as the export tests
from tests.numerics import assert_close, assert_near_argmax, forward_chain, tolerance  # noqa: E402

KINDS = ["embedded", "onnx", "tf-serving"]  # embedded on TF, embedded on ONNX Runtime, tensorflow_model_server
HAS_ORT = __import__("importlib.util").util.find_spec("onnxruntime") is not None and __import__("importlib.util").util.find_spec("jax2onnx") is not None
LOAD_SECONDS = float(os.environ.get("JAXBIG_SERVE_LOAD_SECONDS", "10"))  # benchmarks/serving.py runs 30
MAX_REQUEST_BYTES = 256 << 10  # room for the fuzz test's 100,000 '[' body
VOCAB, MAX_LEN = 256, 64  # SMALL's model (tests/conftest.py TINY_MODEL)
PROMPT = np.array([[100, 101, 102, 40, 41], [10, 32, 32, 32, 32]], np.int32)


MODEL = load_config(None, SMALL).model


def _close(got, want):
    """The server's TF runtime compiles the exported StableHLO its own way: JAX's logits up to float32 rounding (tests/numerics.py)."""
    assert_close(np.asarray(got, np.float32), want, forward_chain(MODEL, *want.shape[:2]))


def _greedy(tokens, graphdef, params):
    """Each generated token is a greedy choice of JAX's logits for the served sequence (ties within rounding may go either way)."""
    full = np.concatenate([PROMPT, tokens], axis=1)
    logits = np.asarray(__import__("flax").nnx.merge(graphdef, params)(full))[:, PROMPT.shape[1] - 1 : -1]
    assert_near_argmax(tokens, logits, tolerance(forward_chain(MODEL, *full.shape), float(np.abs(logits).max())), "served greedy decoding")


def _tokens(b, t):
    return np.random.default_rng(b * 100 + t).integers(1, 256, (b, t)).astype(np.int32)


@pytest.fixture(scope="module")
def exported(served_run):
    run_dir, staging = served_run
    _, graphdef, params, _ = load_params(run_dir)
    model = __import__("flax").nnx.merge(graphdef, params)
    int8_forward, _, int8_leaves = load_exported(staging / "2")
    references = {  # what JAX computes, per version
        1: lambda tokens: np.asarray(model(tokens)),
        2: lambda tokens: np.asarray(int8_forward.call(int8_leaves, tokens)),
    }
    if HAS_ORT:  # ONNX's int8 is ONNX Runtime's dynamic quantization: its reference is ONNX Runtime on the same graph
        from jaxbig.serve.onnx_runtime import OnnxModel

        int8_onnx = OnnxModel(staging / "2")
        references["onnx"] = {1: references[1], 2: lambda tokens: int8_onnx.forward(tokens)}
    return run_dir, staging, references, (graphdef, params)


def _references(exported, kind):
    """version -> tokens -> the logits the server must answer (up to rounding) when `kind` serves."""
    return exported[2]["onnx"] if kind == "onnx" else exported[2]


def _server_args(kind):
    """(ServerProcess's server=, extra flags) for a kind."""
    return ("embedded", ["--runtime", "onnx"]) if kind == "onnx" else (kind, [])


def _skip_unless_available(kind):
    if kind == "onnx" and not HAS_ORT:
        pytest.skip("onnxruntime and jax2onnx are not installed: the ONNX Runtime cases need the `onnx` extra")
    if kind == "tf-serving" and tf_serving.find_binary() is None:
        pytest.skip(f"{tf_serving.BINARY} is not on PATH: the real TF Serving cases need it (docs/serving.md has the docker command)")


@pytest.fixture(scope="module", params=KINDS)
def server(request, exported, tmp_path_factory):
    """Both versions served (num_versions 0 = TF Serving's `all` policy); Latest(tiny) is version 2."""
    _skip_unless_available(request.param)
    _, staging, _, _ = exported
    base = tmp_path_factory.mktemp("base") / "tiny"
    shutil.copytree(staging, base)
    kind, extra = _server_args(request.param)
    with ServerProcess(base, "tiny", "--num_versions", "0", "--version_label", "stable=1", "--max_request_bytes", str(MAX_REQUEST_BYTES), *extra, server=kind) as s:
        s.kind, s.base, s.runtime = kind, base, request.param
        yield s


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.grpc)
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel), model_service_pb2_grpc.ModelServiceStub(channel)
    channel.close()


def _post(server, path, body):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(server.rest + path, data=data, timeout=120)


def _predict_request(inputs, name="tiny", signature="", version=None, label=None):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    for k, v in inputs.items():
        request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    return request


# ---- status and metadata ---------------------------------------------------------------------------
def test_model_status_over_rest_and_grpc(server, stubs):
    r = requests.get(server.rest + "/v1/models/tiny", timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"model_version_status": [{"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} for v in ("2", "1")]}
    assert [s["version"] for s in requests.get(server.rest + "/v1/models/tiny/versions/1", timeout=30).json()["model_version_status"]] == ["1"]
    assert [s["version"] for s in requests.get(server.rest + "/v1/models/tiny/labels/stable", timeout=30).json()["model_version_status"]] == ["1"]
    _, models = stubs
    response = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "tiny"}))
    assert [(s.version, get_model_status_pb2.ModelVersionStatus.State.Name(s.state)) for s in response.model_version_status] == [(2, "AVAILABLE"), (1, "AVAILABLE")]


def test_metadata_over_rest_and_grpc(server, stubs):
    r = requests.get(server.rest + "/v1/models/tiny/versions/1/metadata", timeout=30)
    assert r.status_code == 200, r.text
    meta = r.json()
    assert meta["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    tokens = sigs["serving_default"]["inputs"]["tokens"]
    assert tokens["dtype"] == "DT_INT32" and [d["size"] for d in tokens["tensor_shape"]["dim"]] == ["-1", "-1"]
    assert sigs["serving_default"]["outputs"]["logits"]["dtype"] == "DT_FLOAT"
    assert set(sigs["generate"]["inputs"]) == {"prompt", "max_new_tokens", "temperature", "seed"}
    assert sigs["generate"]["method_name"] == "tensorflow/serving/predict"
    prediction, _ = stubs
    response = prediction.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "tiny"}, metadata_field=["signature_def"]))
    assert response.model_spec.version.value == 2
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    assert {"serving_default", "generate"} <= set(sig_map.signature_def)


# ---- predictions equal JAX -------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2, None])
def test_rest_row_and_columnar_match_jax(server, exported, version):
    references = _references(exported, server.runtime)
    tokens = _tokens(3, 17)
    want = references[version or 2](tokens)
    path = "/v1/models/tiny" + (f"/versions/{version}" if version else "") + ":predict"
    row = _post(server, path, {"instances": tokens.tolist()})
    assert row.status_code == 200, row.text
    _close(np.asarray(row.json()["predictions"], np.float32), want)
    col = _post(server, path, {"signature_name": "serving_default", "inputs": {"tokens": tokens.tolist()}})
    assert col.status_code == 200, col.text
    _close(np.asarray(col.json()["outputs"], np.float32), want)
    rows_of_objects = _post(server, path, {"instances": [{"tokens": t} for t in tokens[:2].tolist()]})
    _close(np.asarray(rows_of_objects.json()["predictions"], np.float32), want[:2])


@pytest.mark.parametrize("version, label", [(1, None), (2, None), (None, None), (None, "stable")])
def test_grpc_predict_matches_jax(server, stubs, exported, version, label):
    references = _references(exported, server.runtime)
    prediction, _ = stubs
    tokens = _tokens(2, 9)
    response = prediction.Predict(_predict_request({"tokens": tokens}, version=version, label=label), timeout=120)
    served = version or (1 if label == "stable" else 2)
    assert response.model_spec.version.value == served and response.model_spec.name == "tiny"
    _close(tf.make_ndarray(response.outputs["logits"]), references[served](tokens))


def test_generate_equals_jax_greedy_over_rest_and_grpc(server, stubs, exported):
    import jax

    _, _, _, (graphdef, params) = exported
    want = np.asarray(jax_generate(graphdef, params, PROMPT, jax.random.key(0), max_new_tokens=10, temperature=0.0))
    body = {"signature_name": "generate", "inputs": {"prompt": PROMPT.tolist(), "max_new_tokens": 10, "temperature": 0.0, "seed": 0}}
    r = _post(server, "/v1/models/tiny/versions/1:predict", body)
    assert r.status_code == 200, r.text
    rest = np.asarray(r.json()["outputs"])
    assert rest.shape == want.shape
    _greedy(rest, graphdef, params)
    prediction, _ = stubs
    inputs = {"prompt": PROMPT, "max_new_tokens": np.int32(10), "temperature": np.float32(0), "seed": np.int32(0)}
    response = prediction.Predict(_predict_request(inputs, signature="generate", version=1), timeout=120)
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["tokens"]), rest)  # one server program, run twice


def test_generate_script_against_the_server(server, exported, repo):
    """scripts/generate.py --server: tokenizer from the manifest, `generate` on the server, text out (REST and gRPC)."""
    import subprocess
    import sys

    from jaxbig.data.tokenizer import ByteTokenizer

    _, staging, _, _ = exported
    prompt = "def f"
    prompt_1P = ByteTokenizer().encode(prompt)[None]
    if server.runtime == "onnx":  # the server's latest version, int8, on the runtime that serves it
        from jaxbig.serve.onnx_runtime import OnnxModel

        ids = OnnxModel(staging / "2").generate(prompt_1P, 12)[0]
    else:
        _, generate, leaves = load_exported(staging / "2")
        ids = np.asarray(generate.call(leaves, prompt_1P, np.int32(12), np.float32(0), np.int32(0)))[0, :12]
    want = prompt + ByteTokenizer().decode(ids[: np.flatnonzero(ids == 0)[0]] if (ids == 0).any() else ids)
    for address, extra in ((server.rest.removeprefix("http://"), []), (server.grpc, ["--grpc"])):
        proc = subprocess.run(
            [sys.executable, "scripts/generate.py", "--server", address, *extra, "--model_name", "tiny", "--model_base_path", str(server.base), "--prompt", prompt, "--max_new_tokens", "12"],
            cwd=repo, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == want + "\n", (proc.stdout, want)


# ---- bad input: TF Serving's error shape, and the server keeps answering -----------------------
BAD_REST = [
    ("malformed JSON", "/v1/models/tiny:predict", '{"instances": [[1, 2}', 400, "JSON Parse error"),
    ("empty body", "/v1/models/tiny:predict", "", 400, "JSON Parse error"),
    ("wrong dtype", "/v1/models/tiny:predict", {"inputs": {"tokens": [[1.5, 2.0]]}}, 400, "is not of expected type: int32"),
    ("string for int", "/v1/models/tiny:predict", {"instances": [["a", "b"]]}, 400, "is not of expected type: int32"),
    ("wrong rank", "/v1/models/tiny:predict", {"inputs": {"tokens": [1, 2, 3]}}, 400, None),
    ("ragged rows", "/v1/models/tiny:predict", {"inputs": {"tokens": [[1, 2], [3]]}}, 400, "Encountered list at unexpected size"),
    ("missing input", "/v1/models/tiny:predict", {"inputs": {"token": [[1, 2]]}}, 400, "tokens"),
    ("missing generate input", "/v1/models/tiny:predict", {"signature_name": "generate", "inputs": {"prompt": [[1]], "seed": 0, "temperature": 0.0}}, 400, "max_new_tokens"),
    ("no inputs key", "/v1/models/tiny:predict", {"examples": []}, 400, "Missing 'inputs' or 'instances' key"),
    ("both keys", "/v1/models/tiny:predict", {"inputs": {"tokens": [[1]]}, "instances": [[1]]}, 400, "expecting only one of 'inputs' or 'instances'"),
    ("batch of 0", "/v1/models/tiny:predict", {"instances": []}, 400, "No values in 'instances' array"),
    ("unknown signature", "/v1/models/tiny:predict", {"signature_name": "nope", "instances": [[1]]}, 400, '"nope" not found'),
    ("unknown model", "/v1/models/nope:predict", {"instances": [[1, 2]]}, 404, "Servable not found for request: Latest(nope)"),
    ("unknown version", "/v1/models/tiny/versions/7:predict", {"instances": [[1, 2]]}, 404, "Servable not found for request: Specific(tiny, 7)"),
    ("prompt too long", "/v1/models/tiny:predict", {"signature_name": "generate", "inputs": {"prompt": [[1] * 60], "max_new_tokens": 10, "temperature": 0.0, "seed": 0}}, 400, "max_seq_len"),
    # the model's limits (jaxbig.serve.limits here; the SavedModel's own assertions in a real TF Serving)
    ("token id = vocab", "/v1/models/tiny:predict", {"instances": [[256, 5, 6]]}, 400, "holds token id 256 at [0, 0] (1 id(s) out of range); token ids must be in [0, 256)"),
    ("token id int32 max", "/v1/models/tiny:predict", {"instances": [[2147483647, 5]]}, 400, "holds token id 2147483647 at [0, 0]"),
    ("negative token id", "/v1/models/tiny/versions/1:predict", {"inputs": {"tokens": [[5, 6], [7, -1]]}}, 400, "holds token id -1 at [1, 1]"),
    ("sequence too long", "/v1/models/tiny:predict", {"instances": [[1] * 65]}, 400, "has length 65; it must be in [1, 64]"),
    ("prompt id out of range", "/v1/models/tiny:predict", {"signature_name": "generate", "inputs": {"prompt": [[1, 300]], "max_new_tokens": 2, "temperature": 0.0, "seed": 0}}, 400, "input 'prompt' of signature 'generate' holds token id 300"),
    ("negative temperature", "/v1/models/tiny:predict", {"signature_name": "generate", "inputs": {"prompt": [[1]], "max_new_tokens": 2, "temperature": -1.0, "seed": 0}}, 400, "input 'temperature' of signature 'generate' is -1.0; it must be a finite number >= 0"),
    ("NaN temperature", "/v1/models/tiny:predict", {"signature_name": "generate", "inputs": {"prompt": [[1]], "max_new_tokens": 2, "temperature": float("nan"), "seed": 0}}, 400, "is nan; it must be a finite number >= 0"),
    ("max_new_tokens 0", "/v1/models/tiny:predict", {"signature_name": "generate", "inputs": {"prompt": [[1]], "max_new_tokens": 0, "temperature": 0.0, "seed": 0}}, 400, "input 'max_new_tokens' of signature 'generate' is 0; it must be in [1, 63]"),
    ("seed beyond int32", "/v1/models/tiny:predict", {"signature_name": "generate", "inputs": {"prompt": [[1]], "max_new_tokens": 2, "temperature": 0.0, "seed": 2**31}}, 400, "is not of expected type: int32"),
    ("100,000 '['", "/v1/models/tiny:predict", "[" * 100_000, 400, "nest 100000 levels deep; this model's signatures need at most 5"),
    ("nested 50,000 deep", "/v1/models/tiny:predict", '{"instances": ' + "[" * 50_000 + "1" + "]" * 50_000 + "}", 400, "nest 50001 levels deep"),
]


def _check_still_serving(server, references):
    tokens = _tokens(1, 5)
    r = _post(server, "/v1/models/tiny/versions/1:predict", {"instances": tokens.tolist()})
    assert r.status_code == 200, r.text
    _close(np.asarray(r.json()["predictions"], np.float32), references[1](tokens))


# rapidjson, which the real binary parses with, recurses once per level: not something to aim at a shared server
EMBEDDED_ONLY = {"100,000 '['", "nested 50,000 deep"}


@pytest.mark.parametrize("case, path, body, status, message", BAD_REST, ids=[c[0] for c in BAD_REST])
def test_rest_bad_input_gets_tf_serving_error(server, exported, case, path, body, status, message):
    if case in EMBEDDED_ONLY and server.kind != "embedded":
        pytest.skip("the JSON nesting limit is the embedded server's")
    r = _post(server, path, body)
    assert r.status_code == status, (r.status_code, r.text)
    payload = r.json()
    assert list(payload) == ["error"] and isinstance(payload["error"], str) and payload["error"]
    if message and (server.kind == "embedded" or "Servable not found" in message or "JSON" in message):
        assert message in payload["error"], payload
    _check_still_serving(server, exported[2])


def test_rest_unknown_model_status_and_label(server):
    r = requests.get(server.rest + "/v1/models/nope", timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "Could not find any versions of model nope"}
    r = requests.get(server.rest + "/v1/models/tiny/versions/9", timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "Could not find version 9 of model tiny"}
    r = requests.get(server.rest + "/v1/models/tiny/labels/canary/metadata", timeout=30)
    assert r.status_code == 400 and "Unrecognized servable version label: canary" in r.json()["error"]


def test_rest_oversized_body_gets_413(server, exported):
    if server.kind != "embedded":
        pytest.skip("the request size limit is the embedded server's --max_request_bytes")
    tokens = np.ones((256, 400), np.int32)  # ~300 KB of JSON > 256 KiB
    r = _post(server, "/v1/models/tiny:predict", {"instances": tokens.tolist()})
    assert r.status_code == 413 and "exceeds the server's limit of 262144 bytes" in r.json()["error"]
    _check_still_serving(server, exported[2])


BAD_GRPC = [
    ("wrong dtype", {"tokens": np.ones((1, 3), np.float32)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("wrong rank", {"tokens": np.ones((3,), np.int32)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("missing input", {}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("extra input", {"tokens": np.ones((1, 3), np.int32), "mask": np.ones((1, 3), np.int32)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("batch of 0", {"tokens": np.ones((0, 3), np.int32)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown model", {"tokens": np.ones((1, 3), np.int32)}, {"name": "nope"}, grpc.StatusCode.NOT_FOUND),
    ("unknown version", {"tokens": np.ones((1, 3), np.int32)}, {"version": 7}, grpc.StatusCode.NOT_FOUND),
    ("oversized", {"tokens": np.ones((128, 1024), np.int32)}, {}, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("token id out of range", {"tokens": np.array([[256, 5, 6]], np.int32)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("negative temperature", {"prompt": np.ones((1, 2), np.int32), "max_new_tokens": np.int32(2), "temperature": np.float32(-1), "seed": np.int32(0)}, {"signature": "generate"}, grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("case, inputs, spec, code", BAD_GRPC, ids=[c[0] for c in BAD_GRPC])
def test_grpc_bad_input_gets_status(server, stubs, exported, case, inputs, spec, code):
    if case == "oversized" and server.kind != "embedded":
        pytest.skip("the request size limit is the embedded server's --max_request_bytes")
    prediction, _ = stubs
    with pytest.raises(grpc.RpcError) as info:
        prediction.Predict(_predict_request(inputs, **spec), timeout=120)
    assert info.value.code() == code, (info.value.code(), info.value.details())
    assert info.value.details()
    tokens = _tokens(1, 4)
    response = prediction.Predict(_predict_request({"tokens": tokens}, version=1), timeout=120)
    _close(tf.make_ndarray(response.outputs["logits"]), exported[2][1](tokens))


# ---- fuzz: hundreds of malformed requests, each refused with a 4xx / INVALID_ARGUMENT -----------------------
def _generate_doc(**inputs):
    return {"signature_name": "generate", "inputs": {"prompt": [[1, 2, 3]], "max_new_tokens": 4, "temperature": 0.0, "seed": 0} | inputs}


def _fuzz_rest_bodies(rng) -> list[tuple[str, bytes]]:
    """(kind, body) for POST :predict; the model can answer none of them."""
    cases = []
    for i in range(60):  # one token id out of range, in a row or columnar tokens tensor or a generate prompt
        b, t = int(rng.integers(1, 4)), int(rng.integers(1, 20))
        tokens = rng.integers(0, VOCAB, (b, t))
        tokens[rng.integers(b), rng.integers(t)] = rng.choice([VOCAB, VOCAB + int(rng.integers(1, 10**6)), 2**31 - 1, -1, -int(rng.integers(2, 2**31))])
        doc = [{"instances": tokens.tolist()}, {"inputs": {"tokens": tokens.tolist()}}, _generate_doc(prompt=tokens.tolist(), max_new_tokens=1)][i % 3]
        cases.append(("token id", doc))
    cases += [("length", {"instances": [[1] * t]}) for t in (MAX_LEN + 1, MAX_LEN + 2, 100, 500)]
    cases += [("length", _generate_doc(prompt=[[1] * p], max_new_tokens=1)) for p in (MAX_LEN, MAX_LEN + 1)]
    bad_args = {
        "max_new_tokens": [0, -1, -(2**31), MAX_LEN - 2, 100, 2**31 - 1, 2**31, 1.5, "4", None, True, [4]],
        "temperature": [-1.0, -1e-30, float("nan"), float("inf"), float("-inf"), 1e39, "0", None, [0.0], {"b64": "AA=="}],
        "seed": [2**31, -(2**31) - 1, 2**63, 1.5, "0", None, [[0]]],
    }
    cases += [("generate argument", _generate_doc(**{name: v})) for name, values in bad_args.items() for v in values]
    cases += [("generate argument", {"signature_name": "generate", "instances": [{"prompt": [1], "max_new_tokens": -1, "temperature": 0.0, "seed": 0}]})]
    cases = [(kind, json.dumps(doc).encode()) for kind, doc in cases]  # NaN and Infinity written bare, as TF Serving reads them
    cases += [  # nesting: far past Python's recursion limit (1000), just past the signatures' rank, and mixed
        ("nesting", b"[" * 100_000),
        ("nesting", b'{"instances": ' + b"[" * 50_000 + b"1" + b"]" * 50_000 + b"}"),
        ("nesting", b'{"a": ' * 30_000 + b"1" + b"}" * 30_000),
        ("nesting", b'{"inputs": {"tokens": [[[[1]]]]}}'),
        ("nesting", b'{"instances": [[[[1]]]]}'),
        *[("nesting", "".join(rng.choice(["[", '{"k":'], size=int(rng.integers(5, 3000)))).encode()) for _ in range(10)],
    ]
    good = json.dumps({"inputs": {"tokens": [[1, 2, 3, 4], [5, 6, 7, 8]]}}).encode()
    cases += [("truncated", good[: int(rng.integers(0, len(good)))]) for _ in range(30)]
    cases += [("random bytes", rng.bytes(int(rng.integers(1, 4096)))) for _ in range(80)]
    alphabet = list('[]{}",:0123456789.-+eE tfrueanlsINfiy\\')
    cases += [("random JSON-ish", "".join(rng.choice(alphabet, size=int(rng.integers(1, 300)))).encode()) for _ in range(60)]
    cases += [
        ("unparsable", b'{"instances": [[' + b"9" * 5000 + b"]]}"),  # int() refuses more than 4300 digits
        ("unparsable", b'{"instances": [["\xff\xfe"]]}'),
        ("unparsable", b'{"instances": [[1, 2]]}' + b"\x00"),
        ("unparsable", b""),
    ]
    return cases


def _raw_http(server, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """A POST whose framing `requests` would not send (bad Content-Length, chunked)."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(server.rest)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/models/tiny:predict", skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def _raw_socket(server, data: bytes) -> bytes:
    """Bytes that are not HTTP at all, and the whole answer (the server closes the connection after it)."""
    import socket
    import urllib.parse

    url = urllib.parse.urlsplit(server.rest)
    with socket.create_connection((url.hostname, url.port), timeout=60) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _tensor(dims, dtype=None, **fields):
    """A TensorProto as a client may send it, consistent or not."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]) if dims is not None else tensor_shape_pb2.TensorShapeProto(unknown_rank=True)
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_INT32 if dtype is None else dtype, tensor_shape=shape, **fields)


def _fuzz_grpc_requests(rng) -> list[tuple[str, bytes]]:
    """(kind, serialized PredictRequest or raw bytes) for PredictionService/Predict; the model can answer none of them."""
    from tensorflow.core.framework import tensor_pb2, types_pb2

    def request(inputs: dict, signature: str = ""):
        r = _predict_request({}, signature=signature)
        for k, v in inputs.items():
            r.inputs[k].CopyFrom(v if isinstance(v, tensor_pb2.TensorProto) else tf.make_tensor_proto(v))
        return r

    def generate(**inputs):
        base = {"prompt": np.ones((1, 3), np.int32), "max_new_tokens": np.int32(4), "temperature": np.float32(0), "seed": np.int32(0)}
        return request(base | inputs, "generate")

    cases = []
    for i in range(40):
        b, t = int(rng.integers(1, 4)), int(rng.integers(1, 20))
        tokens = rng.integers(0, VOCAB, (b, t)).astype(np.int32)
        tokens[rng.integers(b), rng.integers(t)] = rng.choice([VOCAB, VOCAB + int(rng.integers(1, 10**6)), 2**31 - 1, -1, -(2**31)])
        cases.append(("token id", request({"tokens": tokens}) if i % 2 else generate(prompt=tokens, max_new_tokens=np.int32(1))))
    cases += [("length", request({"tokens": np.ones((1, t), np.int32)})) for t in (MAX_LEN + 1, 200)]
    cases += [("length", generate(prompt=np.ones((1, MAX_LEN), np.int32), max_new_tokens=np.int32(1)))]
    cases += [("generate argument", generate(max_new_tokens=np.int32(v))) for v in (0, -1, MAX_LEN - 2, 2**31 - 1)]
    cases += [("generate argument", generate(temperature=np.float32(v))) for v in (-1, -1e-30, np.nan, np.inf, -np.inf)]
    cases += [("generate argument", generate(seed=np.int64(2**31))), ("generate argument", generate(max_new_tokens=np.ones(2, np.int32)))]
    cases += [  # TensorProtos whose dtype, shape or contents disagree with the signature
        ("shape", request({"tokens": np.ones(3, np.int32)})),
        ("shape", request({"tokens": np.ones((1, 3, 1), np.int32)})),
        ("shape", request({"tokens": np.ones((1, 0), np.int32)})),
        ("shape", request({"tokens": _tensor([1, 3], tensor_content=np.ones(2, np.int32).tobytes())})),
        ("shape", request({"tokens": _tensor([1, 3], tensor_content=b"\x01" * 5)})),
        ("shape", request({"tokens": _tensor([100_000, 100_000], int_val=[1])})),  # 40 GB if materialized
        ("shape", request({"tokens": _tensor([2**40, 2**40], int_val=[1])})),
        ("shape", request({"tokens": _tensor([-1, 3], int_val=[1])})),
        ("shape", request({"tokens": _tensor(None, int_val=[1])})),
        ("shape", request({"tokens": _tensor([1, 3], int_val=list(range(10)))})),
        ("dtype", request({"tokens": _tensor([1, 2], types_pb2.DT_STRING, string_val=[b"a", b"b"])})),
        ("dtype", request({"tokens": _tensor([1, 2], types_pb2.DT_FLOAT, float_val=[1.0, 2.0])})),
        ("dtype", request({"tokens": _tensor([1, 2], 9999, int_val=[1, 2])})),
        ("dtype", request({"tokens": _tensor([1, 2], types_pb2.DT_INVALID)})),
        ("shape", generate(prompt=np.ones((1, 0), np.int32))),
    ]
    cases = [(kind, r.SerializeToString()) for kind, r in cases]
    good = request({"tokens": np.ones((2, 4), np.int32)}).SerializeToString()
    cases += [("truncated", good[: int(rng.integers(1, len(good)))]) for _ in range(30)]
    cases += [("random bytes", rng.bytes(int(rng.integers(1, 2048)))) for _ in range(60)]
    return cases


def test_fuzz_malformed_requests_get_4xx_and_the_server_keeps_answering(server, stubs, exported):
    """Several hundred malformed requests over REST and gRPC (bounded, seeded, loopback): each gets a 4xx /
    INVALID_ARGUMENT with an error message, no 200, no 5xx, no dropped connection, no traceback in the
    server's log; afterwards a good request is answered exactly as before (the same compiled program)."""
    if server.kind != "embedded":
        pytest.skip("the fuzz targets the embedded server's readers (the real binary's are TF Serving's C++)")
    rng = np.random.default_rng(21)
    # shapes the tests above have compiled already
    good_body = {"inputs": {"tokens": _tokens(3, 17).tolist()}}
    good_gen = {"signature_name": "generate", "inputs": {"prompt": PROMPT.tolist(), "max_new_tokens": 5, "temperature": 0.7, "seed": 3}}
    before = [_post(server, "/v1/models/tiny/versions/1:predict", b) for b in (good_body, good_gen)]
    assert [r.status_code for r in before] == [200, 200], [r.text[:300] for r in before]
    prediction, _ = stubs
    good_grpc = _predict_request({"tokens": _tokens(2, 9)}, version=1)
    grpc_before = tf.make_ndarray(prediction.Predict(good_grpc, timeout=120).outputs["logits"])

    session, failures, kinds = requests.Session(), [], {}
    rest_cases = _fuzz_rest_bodies(rng)
    for kind, body in rest_cases:
        r = session.post(server.rest + "/v1/models/tiny:predict", data=body, timeout=60)  # a dropped connection raises here
        payload = r.json() if r.headers.get("Content-Type") == "application/json" else None
        if not (400 <= r.status_code < 500 and isinstance(payload, dict) and list(payload) == ["error"] and payload["error"]):
            failures.append(("REST", kind, body[:200], r.status_code, r.text[:300]))
        kinds[("REST", kind)] = kinds.get(("REST", kind), 0) + 1
    for headers in ({"Content-Length": "abc"}, {"Content-Length": "-1"}, {"Content-Length": "+5"}, {"Transfer-Encoding": "chunked"}):
        status, text = _raw_http(server, headers, b"5\r\n[[1]]\r\n0\r\n\r\n" if "Transfer-Encoding" in headers else b"")
        if not (400 <= status < 500 and json.loads(text)["error"]):
            failures.append(("REST", "framing", headers, status, text[:300]))
        kinds[("REST", "framing")] = kinds.get(("REST", "framing"), 0) + 1
    for data in (b"NONSENSE\r\n\r\n", b"POST /v1/models/tiny:predict HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"):
        head, _, text = _raw_socket(server, data).partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
        if not (400 <= status < 500 and json.loads(text)["error"]):
            failures.append(("REST", "not HTTP", data[:100], head[:200], text[:300]))
        kinds[("REST", "not HTTP")] = kinds.get(("REST", "not HTTP"), 0) + 1

    raw_predict = grpc.insecure_channel(server.grpc).unary_unary("/tensorflow.serving.PredictionService/Predict")  # bytes in, bytes out
    grpc_cases = _fuzz_grpc_requests(rng)
    for kind, data in grpc_cases:
        try:
            raw_predict(data, timeout=60)
            failures.append(("gRPC", kind, data[:200], "OK", ""))
        except grpc.RpcError as e:
            # bytes that happen to parse can name another model ('ti' from a cut "tiny"): NOT_FOUND, HTTP 404
            allowed = {grpc.StatusCode.INVALID_ARGUMENT} | ({grpc.StatusCode.NOT_FOUND} if kind in ("truncated", "random bytes") else set())
            if e.code() not in allowed or not e.details():
                failures.append(("gRPC", kind, data[:200], e.code(), e.details()))
        kinds[("gRPC", kind)] = kinds.get(("gRPC", kind), 0) + 1

    assert not failures, failures[:10]
    assert sum(kinds.values()) >= 400, kinds
    after = [_post(server, "/v1/models/tiny/versions/1:predict", b) for b in (good_body, good_gen)]
    assert [r.content for r in after] == [r.content for r in before]
    np.testing.assert_array_equal(tf.make_ndarray(prediction.Predict(good_grpc, timeout=120).outputs["logits"]), grpc_before)
    assert server.proc.poll() is None and "Traceback" not in "".join(server.log), "".join(server.log)[-3000:]


def test_json_nesting_is_measured_without_recursion():
    from jaxbig.serve.errors import ServingError
    from jaxbig.serve.json_tensors import nesting_depth, parse_json

    assert [nesting_depth(b) for b in (b"1", b"[]", b'{"a": [[1, 2]]}', b'{"a": "[[[[\\"[["}', b'["\\\\", [[1]]]')] == [0, 1, 3, 1, 3]
    assert parse_json(b'{"inputs": {"tokens": [[1, 2]]}}', 5) == {"inputs": {"tokens": [[1, 2]]}}
    for body, message in (
        (b"[" * 100_000, "nest 100000 levels deep; this model's signatures need at most 5"),
        (b'{"instances": ' + b"[" * 50_000 + b"1" + b"]" * 50_000 + b"}", "nest 50001 levels deep"),
        (b'{"inputs": {"tokens": [[[[1]]]]}}', "nest 6 levels deep"),
        (b'{"instances": [[' + b"9" * 5000 + b"]]}", "JSON Parse error: Exceeds the limit (4300 digits)"),
        (b'{"instances": [[1, 2]', "JSON Parse error"),
    ):
        with pytest.raises(ServingError, match=re.escape(message)) as info:
            parse_json(body, 5)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "signature, inputs, message",
    [
        ("serving_default", {"tokens": [[1, 256]]}, "input 'tokens' of signature 'serving_default' holds token id 256 at [0, 1] (1 id(s) out of range); token ids must be in [0, 256) (the model's vocab_size)"),
        ("serving_default", {"tokens": [[-3, -1]]}, "holds token id -3 at [0, 0] (2 id(s) out of range)"),
        ("serving_default", {"tokens": np.ones((1, 65), np.int32)}, "input 'tokens' of signature 'serving_default' has length 65; it must be in [1, 64] (model.max_seq_len 64)"),
        ("serving_default", {"tokens": [[1.0, 2.0]]}, "has dtype float64; token ids must be integers"),
        ("generate", {"prompt": np.ones((1, 64), np.int32), "max_new_tokens": 1, "temperature": 0.0, "seed": 0}, "input 'prompt' of signature 'generate' has length 64; it must be in [1, 63]"),
        ("generate", {"prompt": [[1, 2]], "max_new_tokens": 63, "temperature": 0.0, "seed": 0}, "input 'max_new_tokens' of signature 'generate' is 63; it must be in [1, 62] (model.max_seq_len 64 - prompt length 2)"),
        ("generate", {"prompt": [[1, 2]], "max_new_tokens": 0, "temperature": 0.0, "seed": 0}, "is 0; it must be in [1, 62]"),
        ("generate", {"prompt": [[1, 2]], "max_new_tokens": 2, "temperature": float("inf"), "seed": 0}, "input 'temperature' of signature 'generate' is inf; it must be a finite number >= 0 (0 = greedy)"),
        ("generate", {"prompt": [[1, 2]], "max_new_tokens": 2, "temperature": np.float32(-0.5), "seed": 0}, "is -0.5; it must be a finite number >= 0"),
        ("generate", {"prompt": [[1, 2]], "max_new_tokens": 2, "temperature": 0.0, "seed": 2**31}, "input 'seed' of signature 'generate' is 2147483648; it must be in [-2147483648, 2147483647] (int32)"),
        ("generate", {"prompt": [[1, 2]], "max_new_tokens": 2, "temperature": 0.0, "seed": [1]}, "input 'seed' of signature 'generate' must be a scalar; got shape [1]"),
    ],
)
def test_model_limits_name_the_field_the_value_and_the_range(signature, inputs, message):
    from jaxbig.serve.errors import ServingError
    from jaxbig.serve.limits import ModelLimits

    limits = ModelLimits(vocab_size=VOCAB, max_seq_len=MAX_LEN)
    with pytest.raises(ServingError, match=re.escape(message)) as info:
        limits.check(signature, inputs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.http_status == 400
    limits.check("serving_default", {"tokens": np.array([[0, 255]] * 2, np.int32)})  # the edges pass
    limits.check("generate", {"prompt": np.ones((1, 63), np.int32), "max_new_tokens": np.int32(1), "temperature": np.float32(0), "seed": np.int32(-(2**31))})


def test_clients_refuse_before_sending(exported, tmp_path, capsys):
    """Against a port nothing listens on: a request that were sent would fail to connect, so the
    INVALID_ARGUMENT proves the check ran first. scripts/generate.py --server refuses the same way."""
    import importlib.util
    import socket

    from jaxbig.serve.client import GrpcClient, NotSent, RestClient, generate_text
    from jaxbig.serve.limits import ModelLimits
    from jaxbig.data.tokenizer import ByteTokenizer

    _, staging, _, _ = exported
    limits = ModelLimits.read(staging / "1")
    assert limits == ModelLimits(vocab_size=VOCAB, max_seq_len=MAX_LEN)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    for client in (RestClient(dead, "tiny", limits=limits, timeout=5), GrpcClient(dead, "tiny", limits=limits, timeout=5)):
        with pytest.raises(NotSent, match=re.escape("holds token id 256 at [0, 0]")):
            client.predict({"tokens": np.array([[256]], np.int32)})
        with pytest.raises(NotSent, match="is 61; it must be in \\[1, 59\\]"):
            generate_text(client, "def f", tokenizer=ByteTokenizer(), max_new_tokens=61)
        with pytest.raises(NotSent, match="input 'temperature' of signature 'generate' is -1.0"):
            generate_text(client, "def f", tokenizer=ByteTokenizer(), max_new_tokens=4, temperature=-1.0)
        with pytest.raises(NotSent, match="input 'seed' of signature 'generate' is 4294967296"):
            generate_text(client, "def f", tokenizer=ByteTokenizer(), max_new_tokens=4, seed=2**32)
    spec = importlib.util.spec_from_file_location("generate_script", os.path.join(os.path.dirname(__file__), "..", "scripts", "generate.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--server", dead, "--model_name", "tiny", "--temperature", "-1"]) == 2
    assert "not sent: input 'temperature' of signature 'generate' is -1.0; it must be a finite number >= 0" in capsys.readouterr().err


def test_prometheus_metrics(server):
    """The counters see this test's own requests (3 answered, 1 refused, 1 for a missing version), whatever ran before."""
    r = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=30)
    assert r.status_code == 200
    if server.kind != "embedded":
        return  # TF Serving's own series; their names are its business
    predict = server.rest + "/v1/models/tiny"
    for _ in range(3):
        assert requests.post(predict + ":predict", json={"inputs": {"tokens": _tokens(1, 4).tolist()}}, timeout=120).status_code == 200
    assert requests.post(predict + ":predict", json={"inputs": {"tokens": [[VOCAB + 5]]}}, timeout=120).status_code == 400
    assert requests.post(predict + "/versions/99:predict", json={"inputs": {"tokens": [[1]]}}, timeout=120).status_code == 404
    text = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=30).text
    ok = [line for line in text.splitlines() if line.startswith("jaxbig_serving_requests_total{") and 'status="OK"' in line and 'api="predict"' in line]
    assert ok and sum(float(line.split()[-1]) for line in ok) >= 3, text[:2000]
    assert 'status="INVALID_ARGUMENT"' in text and 'status="NOT_FOUND"' in text
    assert "jaxbig_serving_request_latency_seconds_bucket{" in text
    assert 'jaxbig_serving_latest_version{model="tiny"} 2.0' in text


# ---- batching ----------------------------------------------------------------------------------------
def test_batching_merges_concurrent_requests_and_keeps_answers(exported, tmp_path):
    """8 clients at once: the answers equal the unbatched ones, and model calls hold more than one request."""
    _, staging, references, _ = exported
    base = tmp_path / "tiny"
    shutil.copytree(staging / "1", base / "1")
    shapes = [(1, 8)] * 6 + [(2, 8), (1, 5)]  # two different lengths: only equal shapes merge
    with ServerProcess(base, "tiny", "--enable_batching", "--max_batch_size", "8", "--batch_timeout_micros", "50000") as s:
        results, barrier = {}, threading.Barrier(len(shapes))

        def client(i, shape):
            tokens = (_tokens(*shape) + i) % 255 + 1  # ids in the vocabulary
            barrier.wait()
            r = requests.post(s.rest + "/v1/models/tiny:predict", json={"inputs": {"tokens": tokens.tolist()}}, timeout=120)
            results[i] = (tokens, r)

        threads = [threading.Thread(target=client, args=(i, sh)) for i, sh in enumerate(shapes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for tokens, r in results.values():
            assert r.status_code == 200, r.text[:300]
            _close(np.asarray(r.json()["outputs"], np.float32), references[1](tokens))
        # generate (scalar inputs) bypasses the batcher and still works
        body = {"signature_name": "generate", "inputs": {"prompt": [[1, 2]], "max_new_tokens": 3, "temperature": 0.0, "seed": 0}}
        assert requests.post(s.rest + "/v1/models/tiny:predict", json=body, timeout=120).status_code == 200
        metrics = requests.get(s.rest + "/monitoring/prometheus/metrics", timeout=30).text
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("jaxbig_serving_batch_requests_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("jaxbig_serving_batch_requests_sum")))
    assert total == len(shapes) and count < len(shapes), (count, total)  # every request ran, in fewer model calls


# ---- load with a version switch ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_load_while_a_new_version_is_exported(exported, tmp_path, kind):
    """8 clients (4 REST, 4 gRPC) for LOAD_SECONDS (longer if the export is slow); version 2 is exported mid-run and must take over with zero errors."""
    _skip_unless_available(kind)
    run_dir, staging, _, _ = exported
    references = _references(exported, kind)
    base = tmp_path / "tiny"
    shutil.copytree(staging / "1", base / "1")
    tokens = _tokens(1, 16)
    expected = {v: references[v](tokens) for v in (1, 2)}
    server, extra = _server_args(kind)
    fmt = "onnx" if kind == "onnx" else "savedmodel"
    with ServerProcess(base, "tiny", "--enable_batching", *extra, server=server) as s:
        rest, grpc_ = checked_calls(s.rest, s.grpc, "tiny", tokens, expected)
        clients = [("REST", rest()) if i % 2 == 0 else ("gRPC", grpc_()) for i in range(8)]
        result = run_load(clients, LOAD_SECONDS, during=lambda: export_run(run_dir, base, 2, quantize="int8", format=fmt), during_at=0.1, until_version=2)
        status = requests.get(s.rest + "/v1/models/tiny", timeout=30).json()["model_version_status"]
    assert result.errors == [], result.errors[:5]
    assert result.versions[1] > 0 and result.versions[2] > 0, result.versions  # both versions answered
    assert result.requests >= 8 * 3, result.requests
    assert [(st["version"], st["state"]) for st in status] == [("2", "AVAILABLE"), ("1", "END")]


def test_batches_pad_to_allowed_sizes():
    from jaxbig.config import ConfigError
    from jaxbig.serve.batching import BatchingParameters, padded_size

    assert [padded_size(r, BatchingParameters(max_batch_size=8)) for r in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, 9]
    assert [padded_size(r, BatchingParameters(max_batch_size=6, allowed_batch_sizes=(3, 6))) for r in (1, 3, 4)] == [3, 3, 6]
    with pytest.raises(ConfigError, match=r"allowed_batch_sizes=\[2, 4\] must increase strictly and end at max_batch_size=8"):
        BatchingParameters(allowed_batch_sizes=(2, 4))


def _as_float32(doc):
    if isinstance(doc, float):
        return float(np.float32(doc))
    if isinstance(doc, list):
        return [_as_float32(v) for v in doc]
    if isinstance(doc, dict):
        return {k: _as_float32(v) for k, v in doc.items()}
    return doc


def test_predict_json_written_by_orjson_means_what_tf_serving_writes():
    """Response bodies (orjson, numpy arrays written directly) parse to the same values, in the same structure, as the
    `tolist` + `json` body did; every float32 comes back bit for bit; NaN and Infinity stay bare (TF Serving's
    WriteDecimal), written by `json`; whole numbers keep their ".0" (WriteDecimal adds it)."""
    from jaxbig.serve.json_tensors import COLUMNAR, ROW, format_predict

    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 4, 5)) * 10.0 ** rng.integers(-30, 30, size=(3, 4, 5))).astype(np.float32)
    logits[0, 0, :3] = [1.0, -0.0, 0.1]
    tokens = rng.integers(0, 256, size=(3, 6)).astype(np.int32)
    for outputs in ({"logits": logits}, {"logits": logits, "tokens": tokens}):
        for fmt in (ROW, COLUMNAR):
            body = format_predict(outputs, fmt)
            lists = {k: v.tolist() for k, v in outputs.items()}
            if fmt == COLUMNAR:
                old = {"outputs": lists["logits"] if len(outputs) == 1 else lists}
            else:
                old = {"predictions": lists["logits"] if len(outputs) == 1 else [{k: lists[k][i] for k in outputs} for i in range(3)]}
            assert _as_float32(json.loads(body)) == old, (fmt, list(outputs))  # the same float32 values (JSON has float64)
            doc = json.loads(body)
            got = doc["outputs"] if fmt == COLUMNAR else doc["predictions"]
            got_logits = got if len(outputs) == 1 else (got["logits"] if fmt == COLUMNAR else [row["logits"] for row in got])
            np.testing.assert_array_equal(np.asarray(got_logits, np.float32).view(np.int32), logits.view(np.int32))
    assert b"[1.0,-0.0,0.1," in format_predict({"logits": logits}, COLUMNAR)  # shortest round trip; whole numbers with .0
    special = np.array([[np.nan, np.inf, -np.inf, 1.5]], np.float32)
    assert format_predict({"logits": special}, ROW) == b'{"predictions":[[NaN,Infinity,-Infinity,1.5]]}'
