"""The embedded TF-Serving-compatible server: one model's versions, REST and gRPC, on the TF runtime or ONNX Runtime.

    with EmbeddedServer(ServerConfig(model_name="tiny", model_base_path="exports/tiny", rest_port=0, grpc_port=0)) as s:
        print(s.rest_url, s.grpc_target)

It loads every aspired version with `tf.saved_model.load` (TensorFlow 2.21, the runtime inside
TF Serving 2.21, so it is the reference for what TF Serving computes), replays the warmup
records, then opens both ports. See docs/serving.md for what matches TF Serving and what does not.
Model monitoring (jaxbig.serve.monitor: drift and quality against each export's profile) is on by default;
request logging (jaxbig.serve.request_log) when request_logging_sample_rate > 0.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading

from jaxbig.config import ConfigError
from jaxbig.serve.batching import BatchingParameters

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerConfig:
    model_name: str  # the {name} in /v1/models/{name} and ModelSpec.name
    model_base_path: str  # directory holding the numbered version directories (TF Serving's --model_base_path)
    host: str = "127.0.0.1"  # interface for both ports; "0.0.0.0" exposes the server to the network
    rest_port: int = 8501  # 0 picks a free port
    grpc_port: int = 8500  # 0 picks a free port
    num_versions: int = 1  # latest-version policy: serve the newest N versions; 0 serves them all
    version_labels: tuple[tuple[str, int], ...] = ()  # (label, version) pairs for /labels/{label} and ModelSpec.version_label
    file_system_poll_wait_seconds: float = 1.0  # how often the base path is listed for new versions; 0: only at start
    enable_batching: bool = False  # merge concurrent requests (TF Serving's --enable_batching, off by default there too)
    batching: BatchingParameters = BatchingParameters()  # used when enable_batching
    max_request_bytes: int = 16 << 20  # larger bodies get HTTP 413 / gRPC RESOURCE_EXHAUSTED
    warmup: bool = True  # replay assets.extra/tf_serving_warmup_requests before a version turns AVAILABLE
    runtime: str = "auto"  # tf, onnx (ONNX Runtime on onnx/model.onnx) or auto: saved_model.pb on TF, else ONNX
    monitoring: bool = True  # drift and quality metrics against each version's reference profile (jaxbig.serve.monitor)
    monitoring_window_tokens: int = 4096  # the drift window: the last N prompt tokens per version (whole requests)
    monitoring_profile: str = ""  # a profile (manifest.json or profile JSON) to compare every version with; "": each version's own
    request_logging_sample_rate: float = 0.0  # share of answered Predict requests logged as PredictionLogs (0: off)
    request_logging_dir: str = ""  # where the PredictionLog TFRecords go (needed when the sample rate is > 0)
    request_logging_max_file_bytes: int = 64 << 20  # a log file is closed before it passes this size
    request_logging_max_files: int = 10  # the oldest log files are deleted beyond this many

    def __post_init__(self):
        if not self.model_name or "/" in self.model_name or ":" in self.model_name:
            raise ConfigError(f"--model_name {self.model_name!r} must be non-empty without '/' or ':' (it is a URL path segment)")
        for name in ("rest_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ConfigError(f"--{name} {port} must be in [0, 65535] (0 picks a free port)")
        if self.rest_port and self.rest_port == self.grpc_port:
            raise ConfigError(f"--rest_port and --grpc_port are both {self.rest_port}; give them different ports")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"--max_request_bytes {self.max_request_bytes} is below 1024; requests of a single token would not fit")
        if self.runtime not in ("auto", "tf", "onnx"):
            raise ConfigError(f"--runtime {self.runtime!r} is not supported; use one of auto, tf, onnx")
        if self.file_system_poll_wait_seconds < 0:
            raise ConfigError(f"--file_system_poll_wait_seconds {self.file_system_poll_wait_seconds} must be >= 0")
        if self.monitoring_window_tokens < 1:
            raise ConfigError(f"--monitoring_window_tokens {self.monitoring_window_tokens} must be >= 1 (a few thousand keeps PSI's noise low)")
        if not 0.0 <= self.request_logging_sample_rate <= 1.0:  # also refuses NaN
            raise ConfigError(f"--request_logging_sample_rate {self.request_logging_sample_rate} must be in [0, 1] (0: off, 1: every request)")
        if self.request_logging_sample_rate > 0 and not self.request_logging_dir:
            raise ConfigError(f"--request_logging_sample_rate {self.request_logging_sample_rate} needs --request_logging_dir (where the PredictionLog files go)")
        if self.request_logging_max_file_bytes < 1 << 16 or self.request_logging_max_files < 1:
            raise ConfigError(
                f"--request_logging_max_file_bytes {self.request_logging_max_file_bytes} must be >= 65536 and "
                f"--request_logging_max_files {self.request_logging_max_files} >= 1"
            )


class EmbeddedServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.rest_port = self.grpc_port = None
        self._started = False

    @property
    def rest_url(self) -> str:
        return f"http://{self.config.host}:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    def start(self) -> EmbeddedServer:
        # TensorFlow and gRPC load when the server starts; a ServerConfig is built and checked without them.
        from jaxbig.profile import ReferenceProfile
        from jaxbig.serve.core import ServingCore
        from jaxbig.serve.grpc_api import make_server
        from jaxbig.serve.metrics import Metrics
        from jaxbig.serve.models import ModelManager, loader_for
        from jaxbig.serve.monitor import Monitor
        from jaxbig.serve.request_log import RequestLogger, check_log_dir
        from jaxbig.serve.rest import RestServer

        c = self.config
        # What can be refused is refused before any model loads: the profile file, the log directory.
        profile = ReferenceProfile.read(c.monitoring_profile) if c.monitoring and c.monitoring_profile else None
        if c.request_logging_sample_rate > 0:
            check_log_dir(c.request_logging_dir)
        self.metrics = Metrics()
        self.manager = ModelManager(
            c.model_name, c.model_base_path, num_versions=c.num_versions, version_labels=dict(c.version_labels),
            poll_wait_seconds=c.file_system_poll_wait_seconds, warmup=c.warmup, loader=loader_for(c.runtime),
        )
        self.monitor = Monitor(self.metrics.registry, c.model_name, window_tokens=c.monitoring_window_tokens, profile=profile) if c.monitoring else None
        self.request_log = None
        if c.request_logging_sample_rate > 0:
            self.request_log = RequestLogger(
                c.request_logging_dir, c.request_logging_sample_rate, self.metrics.registry, c.model_name,
                max_file_bytes=c.request_logging_max_file_bytes, max_files=c.request_logging_max_files,
            )

        def on_change():
            paths = self.manager.version_paths()
            self.metrics.versions.labels(c.model_name).set(len(paths))
            self.metrics.latest.labels(c.model_name).set(max(paths, default=0))
            for version, stats in self.manager.load_stats.items():
                if version in paths:
                    self.metrics.load_seconds.labels(c.model_name, str(version)).set(stats.seconds)
                    if stats.rss_growth_bytes is not None:
                        self.metrics.load_bytes.labels(c.model_name, str(version)).set(stats.rss_growth_bytes)
            if self.monitor is not None:
                self.monitor.keep_versions(list(paths))
                for version in sorted(set(paths) - set(self.monitor.known_versions())):
                    try:
                        self.monitor.add_version(version, paths[version])
                    except ConfigError as e:
                        if not self._started:
                            raise  # at start: the one-line error, before any port opens
                        log.error("%s version %d is served without monitoring: %s", c.model_name, version, e)

        self.manager.on_change = on_change
        observers = [o for o in (self.monitor and self.monitor.observe, self.request_log and self.request_log.maybe_log) if o]
        try:
            self.manager.start()  # the initial versions load before any port opens
        except ConfigError:
            self._stop_observers()
            raise
        self.core = ServingCore(self.manager, c.batching if c.enable_batching else None, self.metrics.on_batch, observers)
        try:
            self._grpc, self.grpc_port = make_server(f"{c.host}:{c.grpc_port}", self.core, self.metrics, max_request_bytes=c.max_request_bytes)
            self._rest = RestServer((c.host, c.rest_port), self.core, self.metrics, max_request_bytes=c.max_request_bytes)
        except OSError as e:
            self.manager.stop()
            self.core.stop()
            self._stop_observers()
            raise ConfigError(f"cannot bind {c.host} (REST port {c.rest_port}, gRPC port {c.grpc_port}): {e}; pick other ports or 0 for free ones") from None
        self.rest_port = self._rest.server_address[1]
        self._grpc.start()
        self._rest_thread = threading.Thread(target=self._rest.serve_forever, name="rest", daemon=True)
        self._rest_thread.start()
        self._started = True
        log.info("serving %s versions %s: REST %s, gRPC %s", c.model_name, self.manager.available_versions(), self.rest_url, self.grpc_target)
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._rest.shutdown()
        self._rest.server_close()
        self._grpc.stop(grace=2).wait()
        self.manager.stop()
        self.core.stop()
        self._stop_observers()

    def _stop_observers(self) -> None:
        for observer in (self.monitor, self.request_log):
            if observer is not None:
                observer.stop()

    def wait(self) -> None:
        self._grpc.wait_for_termination()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(config: ServerConfig) -> int:
    """Starts the server, prints its addresses, and serves until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with EmbeddedServer(config) as server:
        print(f"serving {config.model_name} (embedded) versions {server.manager.available_versions()}", flush=True)
        print(f"REST {server.rest_url}\ngRPC {server.grpc_target}", flush=True)
        stop.wait()
    return 0
