"""The persistent XLA compilation cache that `extkd` enables, and a sweep of the entries a killed run cut short.

JAX (0.10) writes a cache entry in place (`Path.write_bytes` in `jax/_src/lru_cache.py`), not through a temporary
file and a rename, and never replaces an entry that exists: a process killed while writing one leaves it truncated,
and every later run that needs that program warns "Error reading persistent compilation cache entry ... incomplete"
and compiles it again, for good. `sweep_incomplete` deletes such entries before the cache is used: each entry
written since the last sweep (newer than the `SWEPT` marker, so a large cache is not read at every start) is
decompressed as JAX reads it, and deleted when that fails. A sweep that deletes an entry another process is writing
at that moment only costs that program's next compilation.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

SWEPT = ".extkd_swept"  # its mtime: when the last sweep started
ENTRY_SUFFIX = "-cache"  # jax/_src/lru_cache.py's `_CACHE_SUFFIX`


def _readable(data: bytes) -> bool:
    """Whether a cache entry decompresses as JAX reads it (jax/_src/compilation_cache.py), to more than its
    compile-time suffix; True when this JAX's internals are not the expected ones (nothing is deleted then)."""
    try:
        from jax._src.compilation_cache import _TIME_BYTES, decompress_executable
    except ImportError:
        return True
    try:
        return len(decompress_executable(data)) > _TIME_BYTES
    except Exception:  # noqa: BLE001 - zlib.error, zstd errors: a truncated or garbled entry
        return False


def sweep_incomplete(cache_dir: str) -> list[str]:
    """Deletes the entries of a local cache directory written since the last sweep that JAX cannot read; returns
    their names. A remote cache (gs://) is left alone."""
    if "://" in cache_dir or not os.path.isdir(cache_dir):
        return []
    marker = os.path.join(cache_dir, SWEPT)
    since = os.path.getmtime(marker) if os.path.exists(marker) else 0.0
    started = time.time()
    removed = []
    with os.scandir(cache_dir) as entries:
        for entry in entries:
            if not entry.name.endswith(ENTRY_SUFFIX) or not entry.is_file():
                continue
            try:
                if entry.stat().st_mtime < since:
                    continue
                with open(entry.path, "rb") as f:
                    data = f.read()
                if not _readable(data):
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except OSError:  # deleted or replaced by another process meanwhile
                continue
    try:
        with open(marker, "w"):
            pass
        os.utime(marker, (started, started))
    except OSError:
        pass
    if removed:
        log.warning(
            "deleted %d incomplete XLA cache entr%s in %s (a run killed while writing it)",
            len(removed),
            "y" if len(removed) == 1 else "ies",
            cache_dir,
        )
    return removed
