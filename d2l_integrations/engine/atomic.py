"""Write a folder atomically: build it under a temporary name beside the target, then swap it in.

A crash at any moment leaves either the old folder or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(directory: str | os.PathLike[str], *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit fsync its files and rename it to ``directory``.

    An existing ``directory`` is replaced, or, with ``keep_existing`` (a shared cache another
    process may have filled meanwhile), kept and the new folder discarded. On an exception the
    temporary folder is removed and ``directory`` is left as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if not path.is_file():
                continue
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists() and keep_existing:
            shutil.rmtree(tmp, ignore_errors=True)
        elif directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
