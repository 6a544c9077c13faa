"""Tokenize text into ArrayRecord shards: `python scripts/prepare_data.py --out data/stdlib`.

Inputs are files, directories or glob patterns (default: the Python standard library's source).
The byte tokenizer is the default; `--tokenizer sentencepiece --vocab_size 4096` trains one on the
training split, `--spm_model FILE` uses an existing SentencePiece model; `--tokenizer bpe --vocab_size 4096`
trains a byte-level BPE with Hugging Face `tokenizers`; `--tokenizer hf:PATH` uses a Hugging Face
tokenizer.json (or a model directory holding one, whose tokenizer_config.json names BOS and EOS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxbig.cli import fail  # noqa: E402
from jaxbig.config import ConfigError  # noqa: E402
from jaxbig.data.prepare import prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="*", default=[], help="text files, directories or globs (default: the stdlib's source)")
    parser.add_argument("--out", required=True, help="output directory, e.g. data/stdlib")
    parser.add_argument("--tokenizer", default="byte", help="byte, sentencepiece, bpe, or hf:PATH (a tokenizer.json or Hugging Face model directory)")
    parser.add_argument("--vocab_size", type=int, default=0, help="vocabulary size to train (sentencepiece, bpe)")
    parser.add_argument("--spm_model", default=None, help="an existing SentencePiece .model file")
    parser.add_argument("--spm_type", default="bpe", choices=["bpe", "unigram"])
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--shard_mb", type=float, default=64.0, help="target size of a shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        m = prepare(
            args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size, spm_model=args.spm_model,
            spm_type=args.spm_type, val_fraction=args.val_fraction, shard_mb=args.shard_mb, overwrite=args.overwrite,
        )  # fmt: skip
    except ConfigError as e:
        return fail(e)
    for split, s in m["splits"].items():
        print(f"{split}: {s['documents']} documents, {s['tokens']:,} tokens ({s['bytes']:,} bytes) in {len(s['shards'])} shard(s)")
    print(f"tokenizer {m['tokenizer']['name']} (vocab {m['tokenizer']['vocab_size']}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
