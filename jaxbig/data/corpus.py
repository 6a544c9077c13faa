"""A corpus of real text: the Python standard library's source, or files and directories you name.

Files are split into train and validation by a hash of their path relative to the root they
were found under, so the split is the same on every machine and for every run.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from jaxbig.config import ConfigError
from jaxbig.data.tokenizer import ByteTokenizer

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".yaml", ".yml", ".toml", ".cfg", ".ini", ".html", ".css", ".js", ".sh"}


class CorpusError(ConfigError):
    """The corpus cannot be built; the message names the path and the fix."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    train_BYTES: np.ndarray  # uint8 tokens, documents separated by ByteTokenizer.eos_id
    val_BYTES: np.ndarray
    num_train_files: int
    num_val_files: int
    source: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_text_files(paths: tuple[str, ...] | list[str]) -> list[tuple[Path, str]]:
    """(file, key) pairs, sorted by hashed key; the key is the path relative to the root it was found under.

    `paths` holds files, directories (searched for text suffixes) or glob patterns; empty means the
    Python standard library's source.
    """
    if not paths:
        root = stdlib_root()
        found = [(f, f.relative_to(root).as_posix()) for f in root.rglob("*.py") if "site-packages" not in f.parts]
    else:
        found = []
        for p in paths:
            path = Path(p).expanduser()
            if path.is_file():
                found.append((path, path.name))
            elif path.is_dir():
                found.extend((f, f.relative_to(path).as_posix()) for f in path.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            elif glob.has_magic(p):
                pattern = os.path.expanduser(p)
                matches = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if Path(f).is_file())
                if not matches:
                    raise CorpusError(f"pattern {p!r} matches no files; check the path (quote the pattern so the shell leaves it alone)")
                base = Path(os.path.dirname(pattern[: min(pattern.find(ch) for ch in "*?[" if ch in pattern)]))
                found.extend((f, f.relative_to(base).as_posix()) for f in matches)
            else:
                raise CorpusError(f"data path {p!r} does not exist; name text files, directories or glob patterns (e.g. 'docs/*.md')")
    return sorted(found, key=lambda fk: (_hash(fk[1]), fk[1]))


def is_validation(key: str, val_fraction: float) -> bool:
    """The file-level split: a stable hash of the file's key, the same on every machine."""
    return (_hash("split:" + key) % 10_000) < val_fraction * 10_000


def _hash(key: str) -> int:
    return zlib.crc32(key.encode("utf-8"))


def load_corpus(paths: tuple[str, ...] = (), val_fraction: float = 0.05, max_bytes: int = 0) -> Corpus:
    """Reads the corpus, split by file; with `max_bytes`, files are taken in hashed order up to the cap."""
    files = list_text_files(paths)
    source = "python-stdlib:" + str(stdlib_root()) if not paths else ",".join(paths)
    if not files:
        raise CorpusError(f"no text files found under {source}; text suffixes are {', '.join(sorted(TEXT_SUFFIXES))}")
    eos = np.array([ByteTokenizer.eos_id], np.uint8)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    total = 0
    for path, key in files:
        data = path.read_bytes()
        if not data or b"\x00" in data:
            continue  # empty or binary
        split = "val" if is_validation(key, val_fraction) else "train"
        parts[split].append(np.frombuffer(data, np.uint8))
        parts[split].append(eos)
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    n_train, n_val = len(parts["train"]) // 2, len(parts["val"]) // 2
    if n_train == 0 or n_val == 0:
        raise CorpusError(
            f"corpus {source} gave {n_train} training and {n_val} validation files; "
            f"add text files or change data.val_fraction={val_fraction}"
        )
    return Corpus(
        train_BYTES=np.concatenate(parts["train"]),
        val_BYTES=np.concatenate(parts["val"]),
        num_train_files=n_train,
        num_val_files=n_val,
        source=source,
    )
