"""Quantization report: export a run as none/int8/fp8/int8-dynamic, measure size and validation perplexity.

`python scripts/export_eval.py --run_dir runs/tiny` writes the `export:quant` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jaxbig.cli import fail  # noqa: E402
from jaxbig.config import ConfigError  # noqa: E402

START, END = "<!-- export:quant:start -->", "<!-- export:quant:end -->"
INTRO = """## Export: int8 / fp8 weight-only and int8-dynamic (W8A8) quantization

Target: the int8 SavedModel at most 0.3x the float32 one on disk, validation perplexity within 1%.
Perplexity is measured on the *exported* function (the reloaded `jax.export` artifact, the same
StableHLO TF Serving runs; tests/test_export.py checks TF and JAX agree to 1e-5) over the run's
validation split of the real corpus. Size = the version directory TF Serving loads
(saved_model.pb + variables/ + assets.extra/), without the jax/ artifacts.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--batches", type=int, default=32, help="validation batches of --batch_size windows")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--doc", default=str(Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    try:
        import jax

        from jaxbig.export.bundle import export_run
        from jaxbig.export.evaluate import perplexity, saved_model_bytes, validation_windows

        windows = validation_windows(args.run_dir, args.batches, args.batch_size)
        rows = {}
        with tempfile.TemporaryDirectory() as tmp:
            for version, method in enumerate(("none", "int8", "fp8", "int8-dynamic"), start=1):
                path = export_run(args.run_dir, Path(tmp) / "m", version, quantize=method)
                rows[method] = (saved_model_bytes(path), perplexity(path, windows))
                print(f"{method}: {rows[method][0]:,} bytes, perplexity {rows[method][1]:.4f}")
    except ConfigError as e:
        return fail(e)
    size0, ppl0 = rows["none"]
    n_tokens = windows.shape[0] * windows.shape[1] * (windows.shape[2] - 1)
    lines = [
        f"Command: `python scripts/export_eval.py --run_dir {args.run_dir}`  ",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; jax {jax.__version__}; run {args.run_dir}; "
        f"{n_tokens:,} validation tokens ({args.batches} x {args.batch_size} windows)",
        "",
        "| quantization | SavedModel bytes | x float32 | val perplexity | change |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, (size, ppl) in rows.items():
        lines.append(f"| {method} | {size:,} | {size / size0:.3f} | {ppl:.4f} | {100 * (ppl / ppl0 - 1):+.2f}% |")
    section = f"{START}\n" + "\n".join(lines) + f"\n{END}"
    doc = Path(args.doc)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if START in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: section, text, count=1, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + INTRO + "\n" + section + "\n"
    doc.write_text(text)
    print(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
