"""`checksums.json`: size and digest of every file of a committed step, and their verification.

orbax commits a step atomically but does not check its files afterwards; these checksums catch
a file truncated or overwritten later.

The digest is XXH3-128 (the `xxhash` library), not sha256: it guards against corruption, not an
adversary, and it hashes an order of magnitude faster than sha256 on one core, so the pass over a
just-written step (it runs in orbax's background thread, and the next save waits for it) costs little
beside the write. Files are hashed concurrently (reads and hashing overlap). Steps written before
this change carry sha256 digests, which `verify` still checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

CHECKSUMS = "checksums.json"
DIGEST = "xxh3_128"
_CHUNK = 4 << 20
_WORKERS = min(8, os.cpu_count() or 1)


def _digest(path: Path, algorithm: str = DIGEST) -> str:
    h = xxhash.xxh3_128() if algorithm == DIGEST else hashlib.new(algorithm)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _digests(paths: list[Path], algorithms: list[str]) -> list[str]:
    if len(paths) <= 1:
        return [_digest(p, a) for p, a in zip(paths, algorithms)]
    with ThreadPoolExecutor(_WORKERS) as pool:
        return list(pool.map(_digest, paths, algorithms))


def write_checksums(step_dir: Path) -> None:
    """Records size and XXH3-128 digest of every file of a committed step (atomically: tmp file, rename)."""
    files = _files(step_dir)
    digests = _digests(files, [DIGEST] * len(files))
    sums = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, DIGEST: d} for p, d in zip(files, digests)}
    tmp = step_dir / f"{CHECKSUMS}.tmp-{os.getpid()}-{threading.get_ident()}"
    tmp.write_text(json.dumps(sums, indent=1))
    tmp.replace(step_dir / CHECKSUMS)


def verify(step_dir: Path) -> str | None:
    """None when every file matches `checksums.json` (or the step has none yet), else what is wrong."""
    path = step_dir / CHECKSUMS
    if not path.is_file():
        return None  # committed by orbax, killed before its checksums were written: the restore decides
    try:
        sums = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS} unreadable ({e})"
    checked = []
    for rel, want in sums.items():
        f = step_dir / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, {want['bytes']} were written (truncated?)"
        algorithm = DIGEST if DIGEST in want else "sha256"  # sha256: steps checksummed before XXH3
        if algorithm not in want:
            return f"{CHECKSUMS} has no digest for {rel}"
        checked.append((rel, f, algorithm, want[algorithm]))
    got = _digests([f for _, f, _, _ in checked], [a for _, _, a, _ in checked])
    for (rel, _, algorithm, want), digest in zip(checked, got):
        if digest != want:
            return f"{rel} does not match its {algorithm} (corrupted)"
    return None


__all__ = ["CHECKSUMS", "DIGEST", "verify", "write_checksums"]
