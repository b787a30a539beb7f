"""Atomic writes: a file is written under a temporary name beside it and renamed when complete.

A reader (or a run resumed after `kill -9`) sees the old file or the new one, never half of one.
Temporary names start with a dot and hold ".tmp-", so `remove_temporaries` finds what a killed
writer left behind.
"""

import contextlib
import json
import os
import uuid
from pathlib import Path


def temporary_name(path):
    """A unique hidden name beside `path`, keeping its suffix (numpy and matplotlib read it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path, sync=False):
    """Yield a temporary path to write; it replaces `path` on success and is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if sync:  # the data is on disk before the name points at it (checkpoints)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(data, path, indent=1):
    """Write `data` as JSON to `path` atomically; returns the path."""
    return write_text(path, json.dumps(data, indent=indent, ensure_ascii=False))


def remove_temporaries(folder):
    """Delete the temporaries that killed writers left in `folder` (complete files stay)."""
    for tmp in Path(folder).glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
