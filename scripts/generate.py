"""Sample a continuation from a trained run: `python scripts/generate.py --run_dir runs/tiny --prompt "def "`.

KV-cache decoding; greedy with --temperature 0 (the default), otherwise temperature and top-k sampling.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxbig.runtime import emulate_cpu_devices  # noqa: E402

emulate_cpu_devices(8)

from jaxbig.cli import fail  # noqa: E402
from jaxbig.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="a directory scripts/train.py wrote")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args(argv)
    try:
        from jaxbig.sample import sample_text

        text = sample_text(
            args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed, step=args.step
        )
    except ConfigError as e:
        return fail(e)
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
