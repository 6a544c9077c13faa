"""Train a model: `python scripts/train.py --mesh 4x2 [--config configs/small.yaml] [--set model.num_layers=8]`.

Runs on 8 emulated CPU devices when no accelerator is present. Re-running with the same
--run_dir resumes from its latest checkpoint; --fresh starts over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from jaxbig.runtime import emulate_cpu_devices  # noqa: E402

emulate_cpu_devices(8)

from jaxbig.cli import add_config_args, config_from_args, fail  # noqa: E402
from jaxbig.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--fresh", action="store_true", help="delete the run_dir's checkpoints and metrics and start over")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    args = parser.parse_args(argv)
    try:
        cfg, mesh_spec = config_from_args(args)
        from jaxbig.train.loop import train

        train(cfg, mesh_spec=mesh_spec, fresh=args.fresh, progress=not args.no_progress)
    except ConfigError as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
