"""`checksums.json`: size and sha256 of every file of a committed step, and their verification.

orbax commits a step atomically but does not check its files afterwards; these checksums catch
a file truncated or overwritten later.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

CHECKSUMS = "checksums.json"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_checksums(step_dir: Path) -> None:
    """Records size and sha256 of every file of a committed step (atomically: tmp file, rename)."""
    sums = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": _digest(p)} for p in _files(step_dir)}
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
    for rel, want in sums.items():
        f = step_dir / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, {want['bytes']} were written (truncated?)"
        if _digest(f) != want["sha256"]:
            return f"{rel} does not match its sha256 (corrupted)"
    return None


__all__ = ["CHECKSUMS", "verify", "write_checksums"]
