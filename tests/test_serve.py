"""Serving: TF Serving's REST and gRPC APIs answer like the model does, refuse bad input, and survive a version switch.

The server runs as `scripts/serve.py` in its own process on free loopback ports: the embedded
server always, a real `tensorflow_model_server` too when one is on PATH (those cases are skipped,
with a message, otherwise). Clients are plain HTTP (requests) and TF Serving's own gRPC stubs.
One tiny run is trained once and exported as float32 (version 1) and int8 (version 2).
"""

import json
import os
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
from jaxbig.train.loop import train
from jaxbig.train.restore import load_params

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

KINDS = ["embedded", "tf-serving"]
LOAD_SECONDS = float(os.environ.get("JAXBIG_SERVE_LOAD_SECONDS", "10"))  # benchmarks/serving.py runs 30
MAX_REQUEST_BYTES = 64 << 10
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
def exported(tmp_path_factory, text_dir):
    root = tmp_path_factory.mktemp("serve")
    run_dir = root / "run"
    train(load_config(None, SMALL + [f"train.run_dir={run_dir}", f"data.paths={text_dir}"]), progress=False)
    staging = root / "staging"
    export_run(run_dir, staging, 1, quantize="none")
    export_run(run_dir, staging, 2, quantize="int8")
    _, graphdef, params, _ = load_params(run_dir)
    model = __import__("flax").nnx.merge(graphdef, params)
    int8_forward, _, int8_leaves = load_exported(staging / "2")
    references = {  # what JAX computes, per version
        1: lambda tokens: np.asarray(model(tokens)),
        2: lambda tokens: np.asarray(int8_forward.call(int8_leaves, tokens)),
    }
    return run_dir, staging, references, (graphdef, params)


def _skip_unless_available(kind):
    if kind == "tf-serving" and tf_serving.find_binary() is None:
        pytest.skip(f"{tf_serving.BINARY} is not on PATH: the real TF Serving cases need it (docs/serving.md has the docker command)")


@pytest.fixture(scope="module", params=KINDS)
def server(request, exported, tmp_path_factory):
    """Both versions served (num_versions 0 = TF Serving's `all` policy); Latest(tiny) is version 2."""
    _skip_unless_available(request.param)
    _, staging, _, _ = exported
    base = tmp_path_factory.mktemp("base") / "tiny"
    shutil.copytree(staging, base)
    with ServerProcess(base, "tiny", "--num_versions", "0", "--version_label", "stable=1", "--max_request_bytes", str(MAX_REQUEST_BYTES), server=request.param) as s:
        s.kind, s.base = request.param, base
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
    _, _, references, _ = exported
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
    _, _, references, _ = exported
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
    _, generate, leaves = load_exported(staging / "2")  # the server's latest version: int8
    ids = np.asarray(generate.call(leaves, ByteTokenizer().encode(prompt)[None], np.int32(12), np.float32(0), np.int32(0)))[0, :12]
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
]


def _check_still_serving(server, references):
    tokens = _tokens(1, 5)
    r = _post(server, "/v1/models/tiny/versions/1:predict", {"instances": tokens.tolist()})
    assert r.status_code == 200, r.text
    _close(np.asarray(r.json()["predictions"], np.float32), references[1](tokens))


@pytest.mark.parametrize("case, path, body, status, message", BAD_REST, ids=[c[0] for c in BAD_REST])
def test_rest_bad_input_gets_tf_serving_error(server, exported, case, path, body, status, message):
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
    tokens = np.ones((64, 400), np.int32)  # ~100 KB of JSON > 64 KiB
    r = _post(server, "/v1/models/tiny:predict", {"instances": tokens.tolist()})
    assert r.status_code == 413 and "exceeds the server's limit of 65536 bytes" in r.json()["error"]
    _check_still_serving(server, exported[2])


BAD_GRPC = [
    ("wrong dtype", {"tokens": np.ones((1, 3), np.float32)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("wrong rank", {"tokens": np.ones((3,), np.int32)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("missing input", {}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("extra input", {"tokens": np.ones((1, 3), np.int32), "mask": np.ones((1, 3), np.int32)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("batch of 0", {"tokens": np.ones((0, 3), np.int32)}, {}, grpc.StatusCode.INVALID_ARGUMENT),
    ("unknown model", {"tokens": np.ones((1, 3), np.int32)}, {"name": "nope"}, grpc.StatusCode.NOT_FOUND),
    ("unknown version", {"tokens": np.ones((1, 3), np.int32)}, {"version": 7}, grpc.StatusCode.NOT_FOUND),
    ("oversized", {"tokens": np.ones((64, 1024), np.int32)}, {}, grpc.StatusCode.RESOURCE_EXHAUSTED),
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


def test_prometheus_metrics(server):
    r = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=30)
    assert r.status_code == 200
    if server.kind != "embedded":
        return  # TF Serving's own series; their names are its business
    text = r.text
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
    run_dir, staging, references, _ = exported
    base = tmp_path / "tiny"
    shutil.copytree(staging / "1", base / "1")
    tokens = _tokens(1, 16)
    expected = {v: references[v](tokens) for v in (1, 2)}
    with ServerProcess(base, "tiny", "--enable_batching", server=kind) as s:
        rest, grpc_ = checked_calls(s.rest, s.grpc, "tiny", tokens, expected)
        clients = [("REST", rest()) if i % 2 == 0 else ("gRPC", grpc_()) for i in range(8)]
        result = run_load(clients, LOAD_SECONDS, during=lambda: export_run(run_dir, base, 2, quantize="int8"), during_at=0.1, until_version=2)
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
