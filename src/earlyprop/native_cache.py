"""The compiled kernels' disk cache, kept fresh across files.

numba caches each compiled function beside its source file, stamped with that file's contents alone. A compiled
caller's cached machine code holds its callees' code, so when the caller's file is unchanged and a callee's file
changes (a ``git pull`` into an editable install, an edit), numba would load the caller with the old callee:
``native_step.ep_step`` would keep running last version's kernels of :mod:`earlyprop.native`. So every kernel's
cache is stamped with the contents of all the files whose compiled functions call each other
(:data:`KERNEL_SOURCES`): a change to any of them recompiles them all, once.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

KERNEL_SOURCES = tuple(Path(__file__).with_name(name) for name in ("native.py", "native_step.py"))


@functools.cache
def _contents_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stamp_cache(dispatcher, sources: Sequence[Path] = KERNEL_SOURCES) -> bool:
    """Give a numba dispatcher made with ``cache=True`` a disk cache whose index is stamped with the contents of
    ``sources`` besides its own file, so that a change to any of them invalidates it. Returns False, leaving
    numba's own cache, where numba's cache classes are not the ones this was written against (numba 0.68)."""
    try:
        from numba.core.caching import FunctionCache, IndexDataCacheFile

        cache = FunctionCache(dispatcher.py_func)
        stamp = (cache._impl.locator.get_source_stamp(), *(_contents_hash(Path(p)) for p in sources))
        cache._cache_file = IndexDataCacheFile(cache_path=cache._cache_path,
                                               filename_base=cache._impl.filename_base, source_stamp=stamp)
        dispatcher._cache = cache
    except (ImportError, AttributeError, TypeError, RuntimeError, OSError):
        return False
    return True
