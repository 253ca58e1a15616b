"""File helpers shared by the stages that write directories: checksums and atomic replacement."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomically(out_dir: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh sibling directory ``.NAME.tmp-*``, then rename it to ``out_dir``.

    An existing ``out_dir`` is moved aside first and deleted after the rename; if ``write`` fails the
    temporary directory is removed and ``out_dir`` is untouched. So ``out_dir`` is always either the
    old complete directory or the new complete one, never a half-written one.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        write(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
