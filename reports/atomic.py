"""Atomic file writes: write beside the target, then rename, so no reader sees a truncated file.

Studies and reports both use these; the module imports no torch.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd


def _temporary_beside(path: Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    """Create a new file beside ``path`` with the mode a plain ``open`` would give it; return its descriptor and name.

    ``mkstemp`` creates files readable by their owner only (0600), which would leave a
    study's results unreadable to collaborators. Opening with mode 0666 lets the kernel
    apply the umask, without setting the process-wide umask to read it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        # Eight random characters, as mkstemp uses, so names near the file-system limit still fit.
        temporary = str(path.parent / f"{prefix}{secrets.token_hex(4)}{suffix}")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue  # another writer drew the same name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    handle, temporary = _temporary_beside(path, f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    handle, temporary = _temporary_beside(path, f".{path.name}.")
    os.close(handle)
    try:
        frame.to_parquet(temporary, index=False)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path with the same suffix beside ``path``; rename it into place on success."""
    handle, temporary = _temporary_beside(path, f".{path.stem}.", path.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
