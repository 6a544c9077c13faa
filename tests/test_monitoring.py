"""Model monitoring: the export's reference profile, the server's drift, quality and resource metrics, request
logging as PredictionLogs, and the alert rules: checked and unit-tested by promtool, fired by a real Prometheus.

One embedded server (in this process, on the TF runtime) serves the session's float32 export (tests/conftest.py
`served_run`) for every test that needs one; ONNX Runtime gets one short server of its own. Prometheus and
promtool are Debian's `prometheus` package (`make prometheus`, a dependency of `make test`).
"""

import json
import logging
import math
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from jaxbig.config import ConfigError
from jaxbig.data.corpus import load_corpus
from jaxbig.profile import ReferenceProfile, kl, next_token_stats, psi

tf = pytest.importorskip("tensorflow")
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc  # noqa: E402

from jaxbig.serve.server import EmbeddedServer, ServerConfig  # noqa: E402

MONITORING = REPO / "configs" / "monitoring"
WINDOW = 1024  # the server's drift window (tokens): the alert judges windows of at least this many
T = 64  # tokens per monitoring request: the model's max_seq_len (tests/conftest.py TINY_MODEL)


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not on PATH: run `make prometheus` (Debian's prometheus package) first")
    return path


def _metrics(server) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, as prometheus_client's own parser reads the server's page."""
    text = requests.get(server.rest_url + "/monitoring/prometheus/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def _value(metrics, name, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def _validation_text(text_dir) -> np.ndarray:
    """The run's own validation split (SMALL: data.val_fraction=0.2 over text_dir), as token ids."""
    return load_corpus((str(text_dir),), 0.2).val_BYTES.astype(np.int32)


@pytest.fixture(scope="module")
def server(served_run, tmp_path_factory):
    """Version 1 (float32) served with monitoring (a 1024-token window) and every request logged (1 MiB files, at most 3)."""
    _, staging = served_run
    root = tmp_path_factory.mktemp("monitoring")
    shutil.copytree(staging / "1", root / "tiny" / "1")
    config = ServerConfig(
        model_name="tiny", model_base_path=str(root / "tiny"), rest_port=0, grpc_port=0, runtime="tf", file_system_poll_wait_seconds=0,
        monitoring_window_tokens=WINDOW, request_logging_sample_rate=1.0, request_logging_dir=str(root / "logs"),
        request_logging_max_file_bytes=1 << 20, request_logging_max_files=3,
    )
    with EmbeddedServer(config) as s:
        s.log_dir = root / "logs"
        yield s


def _grpc_predict(server, inputs, signature=""):
    with __import__("grpc").insecure_channel(server.grpc_target) as channel:
        request = predict_pb2.PredictRequest()
        request.model_spec.name, request.model_spec.signature_name = "tiny", signature
        for k, v in inputs.items():
            request.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=120)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _rest_predict(server, tokens_BT):
    r = requests.post(server.rest_url + "/v1/models/tiny:predict", json={"inputs": {"tokens": tokens_BT.tolist()}}, timeout=120)
    assert r.status_code == 200, r.text[:300]


# ---- the reference profile -------------------------------------------------------------------------
def test_profile_describes_the_run(served_run, text_dir):
    """Counts equal the training split's bytes; the model's log-likelihood equals the loop's own eval loss on the same windows."""
    run_dir, staging = served_run
    profile = ReferenceProfile.read(staging / "1" / "manifest.json")
    train_BYTES = load_corpus((str(text_dir),), 0.2).train_BYTES
    counts = np.bincount(train_BYTES, minlength=256)
    assert profile.token_ids == tuple(np.flatnonzero(counts)) and profile.token_counts == tuple(counts[counts > 0])
    assert sum(profile.length_counts) == int((train_BYTES == 0).sum())  # one length per document (each ends in eos 0)
    # SMALL evaluates train.eval_batches=1 batch of 8 windows of 32 + 1 validation tokens: the profile's 8 windows.
    # Both are float32 forwards of one checkpoint compiled differently (8 devices vs 1): their mean losses agree to
    # float32 rounding (~1e-7 relative per logit, a few ulp through log-sum-exp); 1e-4 leaves two orders of margin.
    eval_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["eval_loss"]
    assert profile.validation_tokens == 8 * 32
    np.testing.assert_allclose(-profile.mean_log_likelihood_nats, eval_loss, rtol=1e-4)
    assert 0 < profile.mean_entropy_nats < math.log(256)
    assert ReferenceProfile.read(staging / "2" / "manifest.json") == profile  # the float checkpoint, whatever the export's quantization


def test_statistics_agree_with_jax_optax_and_scipy():
    import jax
    import optax
    from scipy.stats import entropy as scipy_entropy

    rng = np.random.default_rng(0)
    logits_BTV = rng.normal(0, 3, (2, 5, 11)).astype(np.float32)
    tokens_BT = rng.integers(0, 11, (2, 5))
    entropy, nll = next_token_stats(logits_BTV, tokens_BT[:, 1:])
    # jax and optax compute in float32 (relative rounding ~1e-7 per term over 11 terms); ours in float64
    logp = np.asarray(jax.nn.log_softmax(logits_BTV), np.float64)
    np.testing.assert_allclose(entropy, float(-(np.exp(logp) * logp).sum(-1).mean()), rtol=1e-5)
    want = optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1], tokens_BT[:, 1:]).mean()
    np.testing.assert_allclose(nll, float(want), rtol=1e-5)
    assert next_token_stats(logits_BTV[:, :1], tokens_BT[:, 1:1])[1] is None
    w, r = rng.dirichlet(np.ones(7)), rng.dirichlet(np.ones(7))
    w, r = np.maximum(w, 1e-3), np.maximum(r, 1e-3)  # above the floor: no flooring, so scipy sees the same numbers
    w, r = w / w.sum(), r / r.sum()
    np.testing.assert_allclose(kl(w, r), scipy_entropy(w, r), rtol=1e-12)
    np.testing.assert_allclose(psi(w, r), scipy_entropy(w, r) + scipy_entropy(r, w), rtol=1e-12)  # PSI = KL both ways
    assert psi(w, w) == 0.0


# ---- the server's metrics ----------------------------------------------------------------------------
def _check_request_metrics(server, version: str):
    tokens = np.random.default_rng(1).integers(1, 256, (2, 9)).astype(np.int32)
    before = _metrics(server)
    logits = _grpc_predict(server, {"tokens": tokens})["logits"]
    generated = _grpc_predict(server, {"prompt": tokens[:1, :4], "max_new_tokens": np.int32(6), "temperature": np.float32(0), "seed": np.int32(0)}, "generate")["tokens"]
    server.monitor.drain()
    after = _metrics(server)
    labels = {"model": "tiny", "version": version}
    entropy, nll = next_token_stats(logits, tokens[:, 1:])  # the served logits, bit for bit (gRPC carries float32 as is)
    delta = lambda name, **extra: _value(after, name, **labels, **extra) - _value(before, name, **labels, **extra)  # noqa: E731
    np.testing.assert_allclose(delta("jaxbig_monitor_entropy_nats_sum"), entropy, rtol=1e-9)
    np.testing.assert_allclose(delta("jaxbig_monitor_nll_nats_sum"), nll, rtol=1e-9)
    assert delta("jaxbig_monitor_prompt_length_tokens_count", signature="serving_default") == 2
    assert delta("jaxbig_monitor_prompt_length_tokens_count", signature="generate") == 1
    stopped = bool((generated == 0).any())  # the byte tokenizer's eos is 0
    assert delta("jaxbig_monitor_generate_rows_total", stop="eos") == stopped and delta("jaxbig_monitor_generate_rows_total", stop="max_length") == (not stopped)
    assert delta("jaxbig_monitor_generated_tokens_total") == (int(np.argmax(generated[0] == 0)) + 1 if stopped else 6)
    assert _value(after, "jaxbig_monitor_reference_nll_nats", **labels) > 0
    assert _value(after, "process_resident_memory_bytes") > 0 and _value(after, "process_cpu_seconds_total") > 0
    assert _value(after, "jaxbig_serving_model_load_seconds", **labels) > 0
    assert 0 < _value(after, "process_resident_memory_bytes") < _value(after, "jaxbig_serving_memory_limit_bytes")


def test_metrics_are_the_served_logits_statistics(server):
    _check_request_metrics(server, "1")
    assert ("jaxbig_serving_model_memory_bytes", (("model", "tiny"), ("version", "1"))) in _metrics(server)


def test_metrics_on_onnx_runtime(served_run, tmp_path):
    """The same statistics when ONNX Runtime serves (its int8 version 2)."""
    _, staging = served_run
    if not (staging / "2" / "onnx").is_dir():
        pytest.skip("onnxruntime and jax2onnx are not installed: the ONNX Runtime case needs the `onnx` extra")
    shutil.copytree(staging / "2", tmp_path / "tiny" / "2")
    config = ServerConfig(model_name="tiny", model_base_path=str(tmp_path / "tiny"), rest_port=0, grpc_port=0, runtime="onnx", file_system_poll_wait_seconds=0)
    with EmbeddedServer(config) as s:
        _check_request_metrics(s, "2")


# ---- request logging -----------------------------------------------------------------------------------
def test_request_log_reads_with_tf_and_replays_as_warmup(server, tmp_path):
    from jaxbig.serve.models import WARMUP_FILE, Servable

    tokens = np.random.default_rng(2).integers(1, 256, (1, 5)).astype(np.int32)
    logits = _grpc_predict(server, {"tokens": tokens})["logits"]
    for i in range(60):  # 64 KiB of logits a record: the 1 MiB files rotate, and only the newest 3 stay
        _rest_predict(server, (np.arange(T, dtype=np.int32)[None] + i) % 255 + 1)
    server.request_log.drain()
    files = server.request_log.files()
    assert len(files) == 3 and all(f.stat().st_size <= 1 << 20 for f in files), [(f.name, f.stat().st_size) for f in files]
    assert int(files[0].name.split("-")[1].split(".")[0]) >= 1  # older ones were deleted
    records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for f in files for r in tf.data.TFRecordDataset(str(f))]
    assert len(records) >= 40
    entry = records[-1]
    assert entry.log_metadata.model_spec.name == "tiny" and entry.log_metadata.model_spec.version.value == 1
    assert entry.log_metadata.sampling_config.sampling_rate == 1.0
    np.testing.assert_array_equal(tf.make_ndarray(entry.predict_log.request.inputs["tokens"]), (np.arange(T)[None] + 59) % 255 + 1)
    # the gRPC request above is in an older (deleted) file by now: log it again and find it with its exact answer
    _grpc_predict(server, {"tokens": tokens})
    server.request_log.drain()
    last = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(server.request_log.files()[-1]))][-1]
    np.testing.assert_array_equal(tf.make_ndarray(last.predict_log.request.inputs["tokens"]), tokens)
    np.testing.assert_array_equal(tf.make_ndarray(last.predict_log.response.outputs["logits"]), logits)
    # a log file as a version's warmup file: TF Serving's format, replayed before the version loads
    version = tmp_path / "tiny" / "1"
    shutil.copytree(server.manager.version_paths()[1], version)
    shutil.copy(files[-1], version / WARMUP_FILE)
    replayed = Servable("tiny", 1, version, warmup=True)
    assert replayed.version == 1 and sum(1 for _ in tf.data.TFRecordDataset(str(version / WARMUP_FILE))) >= 10


def test_a_full_disk_stops_logging_with_a_warning(tmp_path, caplog):
    """Writes that fail with ENOSPC (the kernel's /dev/full) stop logging once, with a warning; logging calls keep returning."""
    import prometheus_client as prom

    from jaxbig.serve.request_log import RequestLogger

    logger = RequestLogger(tmp_path, 1.0, prom.CollectorRegistry(), "tiny", max_file_bytes=1 << 16, max_files=10)
    record = ({"tokens": np.ones((1, T), np.int32)}, {"logits": np.zeros((1, T, 256), np.float32)})  # > 64 KiB: one file each
    logger.maybe_log(1, "serving_default", *record)
    logger.drain()
    (tmp_path / "prediction_log-00001.tfrecord").symlink_to("/dev/full")  # the next file the logger opens
    with caplog.at_level(logging.WARNING, logger="jaxbig.serve.request_log"):
        for _ in range(3):
            logger.maybe_log(1, "serving_default", *record)
        logger.drain()
    logger.stop()
    assert not logger.enabled and logger.failed.labels("tiny")._value.get() == 1
    assert logger.logged.labels("tiny")._value.get() == 1 and logger.dropped.labels("tiny")._value.get() == 3
    warnings = [r.getMessage() for r in caplog.records if "request logging stopped" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    assert sum(1 for _ in tf.data.TFRecordDataset(str(tmp_path / "prediction_log-00000.tfrecord"))) == 1


# ---- bad configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_sample_rate_outside_0_1_is_refused(rate):
    with pytest.raises(ConfigError, match=r"--request_logging_sample_rate .* must be in \[0, 1\]"):
        ServerConfig(model_name="tiny", model_base_path="unused", request_logging_sample_rate=rate, request_logging_dir="logs")


def test_bad_profile_and_log_dir_fail_in_one_line_at_start(served_run, tmp_path, capsys):
    """scripts/serve.py refuses them in one line before any model loads."""
    import signal

    from scripts import serve as script

    _, staging = served_run
    garbage = tmp_path / "profile.json"
    garbage.write_text('{"format": "jaxbig-profile/1", "vocab_size": 256')
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    base = ["--model_base_path", str(staging), "--model_name", "tiny", "--server", "embedded", "--rest_port", "0", "--grpc_port", "0"]
    cases = [
        (["--monitoring_profile", str(tmp_path / "missing.json")], "cannot read a profile from"),
        (["--monitoring_profile", str(garbage)], "cannot read a profile from"),
        (["--request_logging_sample_rate", "0.5", "--request_logging_dir", str(a_file / "logs")], "is not writable"),
        (["--request_logging_sample_rate", "2"], "must be in [0, 1]"),
    ]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # serve_forever installs its own
    try:
        for flags, message in cases:
            assert script.main(base + flags) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and message in err, err
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# ---- alert rules -------------------------------------------------------------------------------------------
def test_promtool_checks_and_unit_tests_the_rules():
    promtool = _need("promtool")
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alerts(prom_url: str, name: str) -> list[dict]:
    alerts = requests.get(prom_url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name]


def _query(prom_url: str, expr: str) -> list[dict]:
    return requests.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10).json()["data"]["result"]


def test_drift_alert_fires_in_a_real_prometheus(server, text_dir, tmp_path):
    """Validation text: PSI under the threshold and no drift alert; random bytes: Prometheus fires JaxbigTokenDrift."""
    prometheus = _need("prometheus")
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "JaxbigTokenDrift":
            rule["for"] = "2s"  # the shipped rule's expression, with a test-sized `for:`
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{server.rest_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    # in distribution: the run's validation text, 2.5 windows of it, before Prometheus first scrapes
    val = _validation_text(text_dir)
    for i in range(40):
        _rest_predict(server, val[None, i * T : (i + 1) * T])
    server.monitor.drain()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _ready(url):
            assert proc.poll() is None and time.monotonic() < deadline, f"prometheus did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}"
            time.sleep(0.2)
        started, psi_in = time.time(), None
        while time.monotonic() < deadline + 30:  # scraped, then held past `for:` (2 s) and two evaluations more
            result = _query(url, 'jaxbig_monitor_token_psi{version="1"}')
            if result and float(result[0]["value"][0]) > started + 4:
                psi_in = float(result[0]["value"][1])
                break
            time.sleep(0.5)
        assert psi_in is not None and psi_in < 0.5, f"PSI of validation text {psi_in}"
        assert _alerts(url, "JaxbigTokenDrift") == [], "the drift alert fired (or is pending) on in-distribution traffic"
        # drifted: random bytes
        rng = np.random.default_rng(3)
        for _ in range(40):
            _rest_predict(server, rng.integers(1, 256, (1, T)).astype(np.int32))
        deadline = time.monotonic() + 40
        while not [a for a in _alerts(url, "JaxbigTokenDrift") if a["state"] == "firing"]:
            assert time.monotonic() < deadline, f"no drift alert: PSI {_query(url, 'jaxbig_monitor_token_psi')}, alerts {_alerts(url, 'JaxbigTokenDrift')}"
            time.sleep(0.5)
        fired = _alerts(url, "JaxbigTokenDrift")[0]
        assert fired["labels"]["version"] == "1" and float(fired["value"]) > 0.5
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False
