"""Plan a layout before launching it: per-device memory and per-step collective bytes, no weights allocated.

    python scripts/plan.py --config configs/llama2_70b.yaml --mesh fsdp=16,tensor=8 [--batch_size 256]
    python scripts/plan.py --config configs/tiny.yaml --all-layouts [--write-benchmarks]

Compiles the train step scripts/train.py would run for the same config (the same set-up,
jaxbig/train/setup.py) on abstract inputs over a mesh of emulated CPU devices (as many as the
mesh names) and prints what each device holds (params, optimizer state, temporaries from the
compiled memory analysis), the collective bytes each device sends per step by kind, and the
pipeline bubble. See jaxbig/train/plan.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from jaxbig.cli import add_config_args, fail  # noqa: E402
from jaxbig.config import ConfigError, MeshConfig, load_config  # noqa: E402
from jaxbig.parallel.mesh import devices_needed, make_mesh, parse_mesh_spec  # noqa: E402
from jaxbig.runtime import use_cpu_devices  # noqa: E402

# --all-layouts, 8 devices each: a mesh spec, then any config overrides for that layout (the pipeline schedule).
LAYOUTS = (
    "data=8",
    "fsdp=8",
    "data=4,tensor=2",
    "data=2,fsdp=2,tensor=2",
    "data=2,tensor=2,pipeline=2",
    "data=2,tensor=2,pipeline=2 parallel.schedule=circular parallel.repeats=2",
    "tensor=2,pipeline=4",
)
DOC = ROOT / "docs" / "benchmarks.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--batch_size", type=int, default=None, help="train.batch_size (global sequences per step)")
    parser.add_argument("--seq_len", type=int, default=None, help="data.seq_len")
    parser.add_argument("--devices", type=int, default=None, help="emulated devices when the mesh has a -1 axis")
    parser.add_argument("--all-layouts", action="store_true", help=f"plan each of {'; '.join(LAYOUTS)}")
    parser.add_argument("--write-benchmarks", action="store_true", help=f"with --all-layouts: write the table into {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.write_benchmarks and not args.all_layouts:
        parser.error("--write-benchmarks needs --all-layouts")
    if args.all_layouts == (args.mesh is not None):
        parser.error("give either --mesh or --all-layouts")
    layouts = [entry.split() for entry in LAYOUTS] if args.all_layouts else [[args.mesh]]
    specs = [spec for spec, *_ in layouts]
    overrides = list(args.set)
    for flag, key in (("steps", "train.steps"), ("run_dir", "train.run_dir"), ("seed", "train.seed"), ("batch_size", "train.batch_size"), ("seq_len", "data.seq_len")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        sizes = [parse_mesh_spec(s) for s in specs]
        use_cpu_devices(args.devices or max(devices_needed(s) for s in sizes))
        # The whole training set-up, imported once the device count is set (and not for --help or a bad --mesh).
        from jaxbig.train.plan import format_plan, plan_layout

        name = Path(args.config).stem if args.config else "tiny"
        plans = []
        for (spec, *layout_sets), size in zip(layouts, sizes):
            cfg = load_config(args.config, overrides + layout_sets + [f"mesh.{k}={v}" for k, v in size.items()])
            p = plan_layout(cfg, make_mesh(MeshConfig(**size), spec=spec), name=name)
            print(format_plan(p), flush=True)
            plans.append(p)
    except ConfigError as e:
        return fail(e)
    if args.write_benchmarks:
        from benchmarks.layouts import write_benchmarks  # only when writing the docs

        command = "python scripts/plan.py" + "".join(f" {shlex.quote(a)}" for a in (sys.argv[1:] if argv is None else argv))
        write_benchmarks(DOC, plans, command)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
