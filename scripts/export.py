"""Export a trained run for serving: `python scripts/export.py --run_dir runs/tiny --out exports/tiny --version 1`.

Writes exports/NAME/<V>/: a TF Serving SavedModel (signatures serving_default and generate,
params as variables, warmup records), the `jax.export` artifacts, the ONNX graphs (onnx/) and
manifest.json; `--format savedmodel` or `--format onnx` writes one of them. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jaxbig.cli import fail  # noqa: E402
from jaxbig.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="a directory scripts/train.py wrote")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="model base path, e.g. exports/tiny (TF Serving's --model_base_path)")
    parser.add_argument("--version", type=int, required=True, help="version directory to write, a positive integer")
    parser.add_argument("--quantize", default="int8", help="none, int8 (weight-only, default), fp8 (weight-only) or int8-dynamic (W8A8: int8 weights and per-row dynamic int8 activations)")
    parser.add_argument("--target", default="tf-serving-2.21", help="serving runtime the SavedModel must load in")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version directory")
    parser.add_argument("--format", default="all", help="savedmodel (SavedModel + jax.export artifacts), onnx (ONNX graphs for ONNX Runtime) or all (default)")
    parser.add_argument("--group_size", type=int, default=64, help="--quantize int4: weights per scale along the contracted axis (32, 64 or 128)")
    args = parser.parse_args(argv)
    try:
        from jaxbig.export.bundle import export_run

        path = export_run(
            args.run_dir, args.out, args.version, step=args.step, quantize=args.quantize, target=args.target, overwrite=args.overwrite,
            format=args.format, group_size=args.group_size,
        )
    except ConfigError as e:
        return fail(e)
    print(f"exported {path}")
    import json

    from jaxbig.compress.prune import sparsity_table

    sparsity = json.loads((path / "manifest.json").read_text())["sparsity"]
    if any(e["zeros"] for e in sparsity.values()):  # a pruned run: what was exported, per weight and layer
        print(f"sparsity of the exported weights (exact zeros):\n{sparsity_table(sparsity)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
