"""Serve an exported model over TF Serving's REST and gRPC APIs:

    python scripts/serve.py --model_base_path exports/tiny --model_name tiny [--rest_port 8501] [--grpc_port 8500]
                            [--server auto|tf-serving|embedded] [--runtime auto|tf|onnx] [--enable_batching] [--num_versions 1]
                            [--monitoring on|off] [--request_logging_sample_rate 0.01 --request_logging_dir DIR]

`auto` runs the real `tensorflow_model_server` when it is on PATH (config files written to
--config_dir, XLA:CPU JIT enabled), otherwise the embedded server (jaxbig.serve.server). Once both
ports answer it prints `REST http://HOST:PORT` and `gRPC HOST:PORT` and serves until interrupted.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jaxbig.cli import fail  # noqa: E402
from jaxbig.config import ConfigError  # noqa: E402


def _labels(values: list[str]) -> tuple[tuple[str, int], ...]:
    out = []
    for v in values:
        label, _, version = v.partition("=")
        if not label or not version.isdigit():
            raise ConfigError(f"--version_label {v!r} must look like stable=2")
        out.append((label, int(version)))
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_base_path", required=True, help="directory of numbered versions, e.g. exports/tiny")
    p.add_argument("--model_name", required=True, help="name in /v1/models/NAME and ModelSpec.name")
    p.add_argument("--rest_port", type=int, default=8501, help="0: a free port")
    p.add_argument("--grpc_port", type=int, default=8500, help="0: a free port")
    p.add_argument("--server", choices=("auto", "tf-serving", "embedded"), default="auto")
    p.add_argument("--host", default="127.0.0.1", help="embedded: interface to bind (tensorflow_model_server always binds all)")
    p.add_argument("--num_versions", type=int, default=1, help="serve the newest N versions; 0: all")
    p.add_argument("--version_label", action="append", default=[], metavar="LABEL=VERSION", help="e.g. stable=1 (repeatable)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0)
    p.add_argument("--enable_batching", action="store_true", help="merge concurrent requests (tf-serving: generate then fails, see docs)")
    p.add_argument("--max_batch_size", type=int, default=8)
    p.add_argument("--batch_timeout_micros", type=int, default=2000)
    p.add_argument("--max_request_bytes", type=int, default=16 << 20, help="embedded: larger requests get 413 / RESOURCE_EXHAUSTED")
    p.add_argument("--runtime", choices=("auto", "tf", "onnx"), default="auto",
                   help="embedded: tf (the SavedModel), onnx (ONNX Runtime on onnx/model.onnx) or auto (the SavedModel where there is one, else ONNX)")
    p.add_argument("--monitoring", choices=("on", "off"), default="on", help="embedded: drift and quality metrics against each export's profile")
    p.add_argument("--monitoring_window_tokens", type=int, default=4096, help="embedded: the drift window, in prompt tokens per version")
    p.add_argument("--monitoring_profile", default="", help="embedded: compare every version with this profile (a manifest.json or profile JSON)")
    p.add_argument("--request_logging_sample_rate", type=float, default=0.0, help="embedded: share of Predict requests logged as PredictionLog TFRecords")
    p.add_argument("--request_logging_dir", default="", help="embedded: where the request logs go")
    p.add_argument("--request_logging_max_file_bytes", type=int, default=64 << 20, help="embedded: rotate a log file before this size")
    p.add_argument("--request_logging_max_files", type=int, default=10, help="embedded: keep at most this many log files")
    p.add_argument("--config_dir", default=None, help="tf-serving: where models.config etc. go (default: a temporary directory)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from jaxbig.serve import tf_serving
        from jaxbig.serve.batching import BatchingParameters

        batching = BatchingParameters(max_batch_size=args.max_batch_size, batch_timeout_micros=args.batch_timeout_micros)
        kind = args.server
        if kind == "auto":  # ONNX Runtime runs in the embedded server only
            kind = "tf-serving" if tf_serving.find_binary() and args.runtime != "onnx" else "embedded"
        if kind == "tf-serving" and args.runtime == "onnx":
            raise ConfigError("--runtime onnx needs --server embedded (tensorflow_model_server runs SavedModels only)")
        if kind == "embedded":
            return _embedded(args, batching)
        return _tf_serving(args, batching)
    except ConfigError as e:
        return fail(e)


def _embedded(args, batching) -> int:
    from jaxbig.serve.server import ServerConfig, serve_forever

    import dataclasses

    # every flag named like a ServerConfig field is that field
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig) if hasattr(args, f.name)}
    return serve_forever(ServerConfig(**same | {"version_labels": _labels(args.version_label), "batching": batching, "monitoring": args.monitoring == "on"}))


def _tf_serving(args, batching) -> int:
    from jaxbig.serve import tf_serving

    return tf_serving.serve_forever(
        args.model_name, args.model_base_path, rest_port=args.rest_port, grpc_port=args.grpc_port, num_versions=args.num_versions,
        version_labels=dict(_labels(args.version_label)), poll_seconds=args.file_system_poll_wait_seconds,
        enable_batching=args.enable_batching, batching=batching, config_dir=args.config_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
