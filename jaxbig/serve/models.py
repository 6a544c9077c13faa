"""The versions of one model under a base path: discovered by polling, loaded on the TF runtime, retired safely.

Mirrors TF Serving's manager for a `model_config_list` entry with the latest-version policy
(`latest { num_versions: N }`, N=1 by default; `num_versions=0` serves every version, TF Serving's
`all {}`): every poll lists the numeric directories under the base path, loads the aspired
versions that are not loaded yet (availability first: a new version is AVAILABLE before the old
one starts UNLOADING), and retires the rest. A request holds its version for its whole duration
(`acquire`), so a version that is retired mid-request finishes that request; it reaches END once
no request holds it. Version states (START, LOADING, AVAILABLE, UNLOADING, END) and load errors
are kept for GetModelStatus, newest first, as TF Serving's ServableStateMonitor reports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jaxbig.config import ConfigError
from jaxbig.runtime import rss_bytes
from jaxbig.serve.errors import invalid_argument, not_found
from jaxbig.serve.limits import ModelLimits

log = logging.getLogger(__name__)
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"


@dataclasses.dataclass
class VersionState:
    state: str  # START, LOADING, AVAILABLE, UNLOADING or END (ModelVersionStatus.State names)
    error_code: str = "OK"  # tensorflow.error.Code name
    error_message: str = ""


@dataclasses.dataclass(frozen=True)
class LoadStats:
    seconds: float  # wall time of the load, warmup included
    rss_growth_bytes: int | None  # the process's RSS after minus before (None where RSS cannot be read)


class Servable:
    """One loaded version: the TF object, its signature functions, its SignatureDefs (the metadata), and
    the model's limits from the export's manifest.json (None for a SavedModel jaxbig did not export)."""

    def __init__(self, name: str, version: int, path: Path, *, warmup: bool = True):
        import tensorflow as tf
        from tensorflow.python.saved_model import loader_impl

        self.name, self.version, self.path = name, version, path
        self.model = tf.saved_model.load(str(path), tags=["serve"])
        meta = [m for m in loader_impl.parse_saved_model(str(path)).meta_graphs if "serve" in m.meta_info_def.tags]
        if not meta:
            raise ValueError(f"{path} has no MetaGraph tagged 'serve'")
        self.signature_defs = meta[0].signature_def  # name -> tensorflow.SignatureDef
        self.functions = dict(self.model.signatures)
        self.limits = ModelLimits.read(path)
        self.inflight = 0  # requests holding this version (guarded by the manager's lock)
        if warmup:
            self._warm_up()

    def _warm_up(self) -> None:
        """Replays assets.extra/tf_serving_warmup_requests as TF Serving does before a version turns AVAILABLE."""
        import tensorflow as tf
        from tensorflow_serving.apis import prediction_log_pb2

        records = self.path / WARMUP_FILE
        if not records.is_file():
            return
        for record in tf.data.TFRecordDataset(str(records)):
            request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
            fn = self.functions[request.model_spec.signature_name or "serving_default"]
            fn(**{k: tf.constant(tf.make_ndarray(t)) for k, t in request.inputs.items()})

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        outputs = self.functions[signature](**{k: tf.constant(v) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in outputs.items()}


RUNTIMES = ("auto", "tf", "onnx")  # --runtime: auto serves saved_model.pb on TF, else onnx/model.onnx on ONNX Runtime


def loader_for(runtime: str):
    """A ModelManager loader: each version on TensorFlow or ONNX Runtime (jaxbig.serve.onnx_runtime), by `runtime`.

    Both give the same SignatureDefs, so requests are checked, batched, counted and answered the same way.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime {runtime!r} is not supported; use one of {', '.join(RUNTIMES)}")

    def load(name: str, version: int, path: Path, *, warmup: bool = True):
        onnx_file = Path(path) / "onnx" / "model.onnx"
        use_onnx = runtime == "onnx" or (runtime == "auto" and not (Path(path) / "saved_model.pb").is_file() and onnx_file.is_file())
        if not use_onnx:
            return Servable(name, version, path, warmup=warmup)
        if not onnx_file.is_file():
            raise FileNotFoundError(f"{onnx_file} does not exist: --runtime onnx serves exports written with scripts/export.py --format onnx or all")
        from jaxbig.serve.onnx_runtime import OnnxServable  # onnxruntime loads only where a version needs it

        return OnnxServable(name, version, path, warmup=warmup)

    return load


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Which servable a request asks for: by version, by label, or the latest (neither)."""

    name: str
    version: int | None = None
    label: str | None = None

    def describe(self, version: int | None = None) -> str:
        # ServableRequest::DebugString, the text of TF Serving's "Servable not found" error.
        v = self.version if version is None else version
        return f"Specific({self.name}, {v})" if v is not None else f"Latest({self.name})"


class ModelManager:
    """Loads, serves and retires the versions of `name` under `base_path` (see the module docstring)."""

    def __init__(
        self,
        name: str,
        base_path: str | Path,
        *,
        num_versions: int = 1,
        version_labels: dict[str, int] | None = None,
        poll_wait_seconds: float = 1.0,
        warmup: bool = True,
        loader=Servable,
    ):
        self.name, self.base_path = name, Path(base_path)
        if not self.base_path.is_dir():
            raise ConfigError(f"--model_base_path {str(self.base_path)!r} is not a directory; export a model there first (scripts/export.py --out {self.base_path} --version 1)")
        if num_versions < 0:
            raise ConfigError(f"num_versions={num_versions} must be >= 1 (latest N versions) or 0 (all versions)")
        self.num_versions, self.labels = num_versions, dict(version_labels or {})
        self.poll_wait_seconds, self.warmup, self._loader = poll_wait_seconds, warmup, loader
        self._lock = threading.Condition()
        self._loaded: dict[int, Servable] = {}  # AVAILABLE versions
        self._retiring: dict[int, Servable] = {}  # UNLOADING: waiting for their requests to finish
        self._states: dict[int, VersionState] = {}
        self._failed: set[int] = set()
        self.load_stats: dict[int, LoadStats] = {}  # per loaded version, for the metrics
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_change = lambda: None  # called after every load or unload (metrics)

    # ---- discovery and lifecycle -----------------------------------------------------------
    def versions_on_disk(self) -> list[int]:
        """Numeric directory names, as TF Serving's file system source sees them (temporary names are skipped)."""
        return sorted(int(p.name) for p in self.base_path.iterdir() if p.is_dir() and p.name.isdigit())

    def aspired(self, on_disk: list[int]) -> list[int]:
        candidates = [v for v in on_disk if v not in self._failed]
        return candidates if self.num_versions == 0 else candidates[-self.num_versions :]

    def poll_once(self) -> None:
        """One pass of the manager loop: load what is aspired and missing, then retire the rest."""
        aspired = self.aspired(self.versions_on_disk())
        for version in sorted(set(aspired) - set(self._loaded), reverse=True):
            self._load(version)
        with self._lock:
            for version in [v for v in self._loaded if v not in aspired]:
                self._retiring[version] = self._loaded.pop(version)
                self._states[version] = VersionState("UNLOADING")
            self._finish_retiring()
        self.on_change()

    def _load(self, version: int) -> None:
        with self._lock:
            self._states[version] = VersionState("LOADING")
        start, rss_before = time.perf_counter(), rss_bytes()
        try:
            servable = self._loader(self.name, version, self.base_path / str(version), warmup=self.warmup)
        except Exception as e:  # noqa: BLE001 - any load failure is reported in the version's status, as TF Serving does
            log.error("loading %s version %d failed: %s", self.name, version, e)
            with self._lock:
                self._failed.add(version)
                self._states[version] = VersionState("END", "UNKNOWN", f"{type(e).__name__}: {e}")
            return
        rss_after = rss_bytes()
        stats = LoadStats(time.perf_counter() - start, None if rss_before is None or rss_after is None else rss_after - rss_before)
        with self._lock:
            self._loaded[version] = servable
            self._states[version] = VersionState("AVAILABLE")
            self.load_stats[version] = stats
        log.info("loaded %s version %d in %.1f s", self.name, version, stats.seconds)

    def _finish_retiring(self) -> None:
        for version in [v for v, s in self._retiring.items() if s.inflight == 0]:
            del self._retiring[version]  # the TF objects go with the last reference
            self._states[version] = VersionState("END")
            log.info("unloaded %s version %d", self.name, version)

    def start(self) -> None:
        """Loads the initial versions (before any port opens, like TF Serving), then polls in the background."""
        if not self.versions_on_disk():
            raise ConfigError(f"no version directories (1, 2, ...) under {str(self.base_path)!r}; export one with scripts/export.py --out {self.base_path} --version 1")
        self.poll_once()
        if self.poll_wait_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name=f"poll-{self.name}", daemon=True)
            self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - a bad poll (a directory vanishing mid-listing) must not stop serving
                log.exception("polling %s failed", self.base_path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- requests ----------------------------------------------------------------------------
    def resolve(self, spec: ModelSpec) -> int | None:
        """The version a spec names (None: the latest). Unknown labels are InvalidArgument, as in ServerCore."""
        if spec.label is not None:
            if spec.label not in self.labels:
                raise invalid_argument(f"Unrecognized servable version label: {spec.label}")
            return self.labels[spec.label]
        return spec.version

    @contextlib.contextmanager
    def acquire(self, spec: ModelSpec) -> Iterator[Servable]:
        """Holds one AVAILABLE version for the duration of a request (it cannot finish unloading meanwhile)."""
        version = self.resolve(spec)
        with self._lock:
            if spec.name != self.name or not self._loaded or (version is not None and version not in self._loaded):
                raise not_found(f"Servable not found for request: {spec.describe(version)}")
            servable = self._loaded[max(self._loaded) if version is None else version]
            servable.inflight += 1
        try:
            yield servable
        finally:
            with self._lock:
                servable.inflight -= 1
                if servable.version in self._retiring:
                    self._finish_retiring()

    def status(self, spec: ModelSpec) -> list[tuple[int, VersionState]]:
        """(version, state) newest first: every version this manager has seen, or the one asked for."""
        if spec.name != self.name:
            raise not_found(f"Could not find any versions of model {spec.name}")
        version = self.resolve(spec)
        with self._lock:
            states = dict(self._states)
        if version is not None:
            if version not in states:
                raise not_found(f"Could not find version {version} of model {spec.name}")
            return [(version, states[version])]
        if not states:
            raise not_found(f"Could not find any versions of model {spec.name}")
        return sorted(states.items(), reverse=True)

    def available_versions(self) -> list[int]:
        with self._lock:
            return sorted(self._loaded)

    def version_paths(self) -> dict[int, Path]:
        """The directory of every AVAILABLE version."""
        with self._lock:
            return {v: s.path for v, s in sorted(self._loaded.items())}


def tf_dtype_name(enum: int) -> str:
    import tensorflow as tf

    return tf.dtypes.as_dtype(enum).name


def numpy_dtype(enum: int) -> Any:
    import tensorflow as tf

    return tf.dtypes.as_dtype(enum).as_numpy_dtype

