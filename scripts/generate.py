"""Generate text from a trained run, or from a served export.

    python scripts/generate.py --run_dir runs/tiny --prompt "def "                              # local, KV-cache decoding
    python scripts/generate.py --server localhost:8501 --model_name tiny --prompt "def "         # TF Serving REST (or embedded)
    python scripts/generate.py --server localhost:8500 --grpc --model_name tiny --prompt "def "  # TF Serving gRPC

Greedy with --temperature 0 (the default). With --run_dir the text is tokenized and decoded with the
run's tokenizer (its tokenizer.json, else its prepared data's, else bytes: jaxbig.data.run_tokenizer).
With --server the text is tokenized with the tokenizer the export recorded in its manifest.json
(--model_base_path, default exports/NAME, at the version the server reports as latest) and the
model's `generate` signature runs on the server. Arguments the model cannot honour (--temperature < 0, --seed outside int32, a prompt plus --max_new_tokens over the
export's max_seq_len) fail with a message before the request is sent.
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
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run_dir", help="a directory scripts/train.py wrote")
    source.add_argument("--server", help="HOST:PORT of a TF Serving endpoint (REST, or gRPC with --grpc)")
    parser.add_argument("--prompt", default="def ", help="text to continue")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="--run_dir only: sample among the k most likely tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="--run_dir only: checkpoint step (default: the latest)")
    parser.add_argument("--model_name", default=None, help="--server: the served model's name")
    parser.add_argument("--model_base_path", default=None, help="--server: the export, for its tokenizer (default: exports/NAME)")
    parser.add_argument("--grpc", action="store_true", help="--server is the gRPC port")
    args = parser.parse_args(argv)
    try:
        if args.server:
            from jaxbig.serve.client import served_text

            if not args.model_name:
                raise ConfigError("--server needs --model_name (the name in /v1/models/NAME)")
            text = served_text(
                args.server, args.model_name, args.prompt, grpc=args.grpc, model_base_path=args.model_base_path,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
            )
        else:
            from jaxbig.runtime import emulate_cpu_devices

            emulate_cpu_devices(8)
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
