"""Running a real `tensorflow_model_server`: its three config files and its command line.

Flags, from tensorflow_serving/model_servers/main.cc (tensorflow/serving, 2026-07 snapshot):
  --xla_cpu_compilation_enabled=true   XLA:CPU JIT is *off* by default (main() calls
      DisableXlaCompilation() unless this or --xla_gpu_compilation_enabled is set); without it the
      XlaCallModule op every jaxbig export runs "will return bad Status on first compilation request".
      Marked "EXPERIMENTAL; CAN BE REMOVED ANYTIME!" there. A GPU server needs
      --xla_gpu_compilation_enabled=true instead (it enables both).
  --port / --rest_api_port             gRPC and REST; REST is off unless --rest_api_port is set.
  --model_config_file                  the models.config below (--model_name/--model_base_path are then ignored).
  --file_system_poll_wait_seconds      how often base paths are listed for new versions (default 1).
  --enable_batching, --batching_parameters_file   BatchingParameters text proto (batching.config).
  --monitoring_config_file             MonitoringConfig text proto enabling /monitoring/prometheus/metrics.
Batching is opt-in, as in TF Serving: its BatchingSession wraps every signature of a model, and
`generate` has scalar inputs, which it refuses ("Batching Run() input tensors must have at least
one dimension", batching_util.h). With batching on, only `serving_default` works.
TF Serving binds all interfaces (0.0.0.0 for gRPC); restrict access with a firewall or docker's `-p 127.0.0.1:...`.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from jaxbig.config import ConfigError
from jaxbig.serve.batching import BatchingParameters
from jaxbig.serve.metrics import PATH as METRICS_PATH

BINARY = "tensorflow_model_server"


def find_binary() -> str | None:
    return shutil.which(BINARY)


def models_config(name: str, base_path: str, *, num_versions: int = 1, version_labels: dict[str, int] | None = None) -> str:
    """A ModelServerConfig text proto, built and printed with TF Serving's own proto."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    model = config.model_config_list.config.add(name=name, base_path=str(Path(base_path).resolve()), model_platform="tensorflow")
    if num_versions == 0:
        model.model_version_policy.all.SetInParent()
    else:
        model.model_version_policy.latest.num_versions = num_versions
    for label, version in (version_labels or {}).items():
        model.version_labels[label] = version
    return text_format.MessageToString(config)


def batching_config(params: BatchingParameters) -> str:
    # session_bundle_config.proto's BatchingParameters (wrapper types, hence `{ value: }`); the pip
    # package does not ship this proto, so the text is written directly.
    fields = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
    return "".join(f"{f} {{ value: {getattr(params, f)} }}\n" for f in fields)


def monitoring_config() -> str:
    # monitoring_config.proto's MonitoringConfig (not in the pip package either).
    return f'prometheus_config {{\n  enable: true\n  path: "{METRICS_PATH}"\n}}\n'


def write_configs(out_dir: str | Path, name: str, base_path: str, *, num_versions: int = 1, version_labels=None, batching: BatchingParameters = BatchingParameters()) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "models": (out / "models.config", models_config(name, base_path, num_versions=num_versions, version_labels=version_labels)),
        "batching": (out / "batching.config", batching_config(batching)),
        "monitoring": (out / "monitoring.config", monitoring_config()),
    }
    for path, text in files.values():
        path.write_text(text)
    return {k: p for k, (p, _) in files.items()}


def command(binary: str, files: dict[str, Path], *, rest_port: int, grpc_port: int, poll_seconds: float = 1.0, enable_batching: bool = False, gpu: bool = False) -> list[str]:
    cmd = [
        binary,
        f"--port={grpc_port}",
        f"--rest_api_port={rest_port}",
        f"--model_config_file={files['models']}",
        f"--file_system_poll_wait_seconds={max(1, round(poll_seconds)) if poll_seconds > 0 else 0}",  # an int32 flag
        f"--monitoring_config_file={files['monitoring']}",
        "--xla_gpu_compilation_enabled=true" if gpu else "--xla_cpu_compilation_enabled=true",
    ]
    if enable_batching:
        cmd += ["--enable_batching=true", f"--batching_parameters_file={files['batching']}"]
    return cmd


def launch(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
        raise ConfigError(f"{cmd[0]} is not on PATH; install TF Serving (docker image tensorflow/serving:2.21) or use --server embedded")
    return subprocess.Popen(cmd, **popen_kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_available(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> bool:
    """Polls GetModelStatus over REST until some version is AVAILABLE (False if the server exits first)."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if any(s["state"] == "AVAILABLE" for s in requests.get(url, timeout=2).json().get("model_version_status", [])):
                return True
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    return False


def serve_forever(name: str, base_path: str, *, rest_port: int, grpc_port: int, config_dir: str | None = None, poll_seconds: float = 1.0,
                  enable_batching: bool = False, batching: BatchingParameters = BatchingParameters(), **config) -> int:
    """Writes the configs, runs the server until it exits (SIGINT/SIGTERM are passed on), returns its exit code."""
    binary = find_binary()
    if binary is None:
        raise ConfigError(f"--server tf-serving needs {BINARY} on PATH; use --server embedded, or the docker command in docs/serving.md")
    rest_port, grpc_port = rest_port or _free_port(), grpc_port or _free_port()
    files = write_configs(config_dir or tempfile.mkdtemp(prefix=f"tfs-{name}-"), name, base_path, batching=batching, **config)
    cmd = command(binary, files, rest_port=rest_port, grpc_port=grpc_port, poll_seconds=poll_seconds, enable_batching=enable_batching)
    print("running " + " ".join(cmd), flush=True)
    proc = launch(cmd)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: proc.terminate())
    if not wait_available(f"http://127.0.0.1:{rest_port}/v1/models/{name}", proc):
        proc.terminate()
        raise ConfigError(f"{BINARY} did not make {name} AVAILABLE; see its log above")
    print(f"serving {name} (tf-serving)\nREST http://127.0.0.1:{rest_port}\ngRPC 127.0.0.1:{grpc_port}", flush=True)
    return proc.wait()
