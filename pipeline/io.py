"""Small file helpers shared by the stages: every output is written whole or not at all."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """`write(temp_path)` fills a temporary file beside `path`, which then replaces `path` in one rename:
    readers see the old file or the new one, never half of one, and a crash leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files others read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def copy_file(source: str | Path, path: str | Path) -> Path:
    """Copy `source` to `path` atomically (see atomic_write)."""
    return atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, data) -> Path:
    # default=float: numpy scalars in metrics serialise as plain numbers
    return write_text(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
