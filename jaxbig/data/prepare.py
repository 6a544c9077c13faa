"""Text files -> tokenized ArrayRecord shards with a manifest.

Layout of a prepared data set `data/NAME/`:
  manifest.json                    tokenizer, dtype, split rule, per-split shards and counts
  tokenizer.model                  the SentencePiece model (SentencePiece only)
  tokenizer.json, tokenizer_config.json  the Hugging Face tokenizer and its BOS/EOS (hf and bpe only)
  train-00000-of-00004.arrayrecord one record per document: its token ids as little-endian `dtype`
  val-00000-of-00001.arrayrecord

A document's record is its ids without a separator (the packer appends eos). With a Hugging Face
tokenizer they are `encode(text)`, i.e. what transformers' `tokenizer(text)` gives: a BOS first where
the tokenizer.json's post-processor adds one (Llama, Mistral), as those models were pretrained; an
eos the post-processor appends is dropped (the packer's would double it).

The directory is written under a temporary name and renamed into place when complete, so a
crash never leaves a half-written data set behind.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jaxbig.data.corpus import CorpusError, is_validation, list_text_files, stdlib_root
from jaxbig.data.tokenizer import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, tokenizer_from_dict

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _read_documents(inputs: list[str]) -> tuple[list[tuple[str, str]], int]:
    """(key, text) of every text file, in the fixed hashed order, and how many binary files were skipped.

    A file named explicitly that is binary is an error; binary files found in a directory are skipped.
    """
    explicit = {Path(p).expanduser().resolve() for p in inputs if Path(p).expanduser().is_file()}
    docs, skipped = [], 0
    for path, key in list_text_files(inputs):
        data = path.read_bytes()
        try:
            if b"\x00" in data:
                raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if path.resolve() in explicit:
                raise CorpusError(f"{str(path)!r} is not UTF-8 text (binary file?); give text files") from None
            skipped += 1
            continue
        if text:
            docs.append((key, text))
    return docs, skipped


def _writer(path: Path):
    from array_record.python.array_record_module import ArrayRecordWriter  # only when preparing; reading goes through grain

    return ArrayRecordWriter(str(path), "group_size:1")


def _tokenizer(name: str, vocab_size: int, spm_model: str | None, spm_type: str, train_texts: Iterable[str]):
    """The tokenizer `prepare` names, loaded or trained on `train_texts`; CorpusError when it cannot be."""
    try:
        if name == "byte":
            if vocab_size not in (0, ByteTokenizer.vocab_size):
                raise CorpusError(f"the byte tokenizer has exactly 256 tokens; drop --vocab_size={vocab_size} or use --tokenizer sentencepiece or bpe")
            return ByteTokenizer()
        if name == "sentencepiece":
            if spm_model:
                tok = SentencePieceTokenizer.load(spm_model)
                if vocab_size not in (0, tok.vocab_size):
                    raise CorpusError(f"--vocab_size={vocab_size} does not match the model {spm_model!r}, which has {tok.vocab_size} pieces")
                return tok
            if vocab_size <= 0:
                raise CorpusError("training a SentencePiece tokenizer needs --vocab_size (e.g. 4096)")
            return SentencePieceTokenizer.train(train_texts, vocab_size, spm_type)
        if name == "bpe":
            if vocab_size <= 0:
                raise CorpusError("training a byte-level BPE tokenizer needs --vocab_size (e.g. 4096)")
            return HFTokenizer.train(train_texts, vocab_size)
        if name.startswith("hf:"):
            tok = HFTokenizer.load(name[len("hf:") :])
            if vocab_size not in (0, tok.vocab_size):
                raise CorpusError(f"--vocab_size={vocab_size} does not match {name!r}, which has {tok.vocab_size} tokens; drop --vocab_size")
            if tok.eos_id is None:
                raise CorpusError(
                    f"{name!r} names no end-of-sequence token to separate documents; set eos_token in its tokenizer_config.json"
                )
            return tok
    except ValueError as e:
        raise CorpusError(str(e)) from None
    raise CorpusError(f"--tokenizer {name!r}: use byte, sentencepiece, bpe or hf:PATH (a tokenizer.json or a Hugging Face model directory)")


def prepare(
    inputs: list[str],
    out: str | Path,
    *,
    tokenizer: str = "byte",
    vocab_size: int = 0,
    spm_model: str | None = None,
    spm_type: str = "bpe",
    val_fraction: float = 0.05,
    shard_mb: float = 64.0,
    overwrite: bool = False,
) -> dict:
    """Tokenizes `inputs` (files, directories, globs; empty = the stdlib's source) into `out`; returns the manifest.

    `tokenizer`: "byte"; "sentencepiece" (`spm_model`, or trained with `vocab_size` and `spm_type`); "bpe" (a
    byte-level BPE trained with Hugging Face `tokenizers`, `vocab_size`); "hf:PATH" (a tokenizer.json or a
    Hugging Face model directory).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CorpusError(f"{str(out)!r} already exists; pass --overwrite to replace it or choose another --out")
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction={val_fraction} must be in (0, 1)")
    if shard_mb <= 0:
        raise CorpusError(f"shard_mb={shard_mb} must be positive")
    docs, skipped = _read_documents(inputs)
    source = ",".join(inputs) if inputs else f"python-stdlib:{stdlib_root()}"
    if not docs:
        raise CorpusError(f"no text in {source}" + (f" ({skipped} binary files skipped)" if skipped else "") + "; give text files or directories")
    splits = {"train": [d for d in docs if not is_validation(d[0], val_fraction)], "val": [d for d in docs if is_validation(d[0], val_fraction)]}
    if not splits["train"] or not splits["val"]:
        raise CorpusError(
            f"{len(docs)} documents gave {len(splits['train'])} training and {len(splits['val'])} validation files at "
            f"val_fraction={val_fraction}; add files or change --val_fraction"
        )

    tok = _tokenizer(tokenizer, vocab_size, spm_model, spm_type, (text for _, text in splits["train"]))
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        manifest_splits = {}
        for split, split_docs in splits.items():
            encode = tok.encode_document if isinstance(tok, HFTokenizer) else tok.encode
            encoded = [encode(text).astype(dtype) for _, text in split_docs]
            total_bytes = sum(e.nbytes for e in encoded)
            num_shards = max(1, math.ceil(total_bytes / (shard_mb * 2**20)))
            names = [f"{split}-{i:05d}-of-{num_shards:05d}.arrayrecord" for i in range(num_shards)]
            writers = [_writer(tmp / n) for n in names]
            for i, ids in enumerate(encoded):  # documents dealt round-robin over the shards
                writers[i % num_shards].write(ids.tobytes())
            for w in writers:
                w.close()
            manifest_splits[split] = {
                "shards": names,
                "documents": len(encoded),
                "tokens": int(sum(len(e) for e in encoded)),
                "bytes": int(sum(len(text.encode("utf-8")) for _, text in split_docs)),
            }
        tok.save_files(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": source,
            "tokenizer": tok.to_dict(),
            "dtype": dtype.str,
            "split_rule": {"by": "crc32 of the file path relative to its input root", "val_fraction": val_fraction},
            "skipped_binary_files": skipped,
            "splits": manifest_splits,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():  # --overwrite: swap in the new set, then drop the old one
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


class PreparedData:
    """A prepared data set: its manifest, tokenizer and per-split random-access documents."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise CorpusError(f"{str(self.root)!r} is not a prepared data set (no {MANIFEST}); run scripts/prepare_data.py --out {root}")
        self.manifest = json.loads(path.read_text())
        self.tokenizer = tokenizer_from_dict(self.manifest["tokenizer"], self.root)
        self.dtype = np.dtype(self.manifest["dtype"])

    def documents(self, split: str):
        """A grain random-access source over `split`'s documents (bytes records; see `decode`)."""
        import grain  # only to read shards: preparing them (scripts/prepare_data.py) needs no grain

        if split not in self.manifest["splits"]:
            raise CorpusError(f"split {split!r} not in {str(self.root)!r}; it has {', '.join(self.manifest['splits'])}")
        return grain.sources.ArrayRecordDataSource([str(self.root / s) for s in self.manifest["splits"][split]["shards"]])

    def decode(self, record: bytes) -> np.ndarray:
        return np.frombuffer(record, dtype=self.dtype).astype(np.int32)
