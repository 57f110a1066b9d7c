"""The garbage collector in a process that runs the runtime: freeze the startup heap once.

A Django process holds a few hundred thousand objects that live as long as it does (modules,
URL patterns, models, templates). CPython's full (generation 2) collection walks all of them:
30-40 ms with the event loop stopped, which a request that arrives meanwhile waits out. Draining
tasks allocates enough to trigger such a collection every few thousand runs. `freeze_startup_heap`
collects once, then moves everything alive into the permanent generation (`gc.freeze()`), so
later collections walk only what was created since. It also keeps forked server workers from
copying those pages on write. Objects frozen are never collected, so it runs once, at startup,
after a full collection (controlled by ``REPROQ_RUNTIME["GC_FREEZE"]``).
"""

from __future__ import annotations

import gc

_frozen_by_us = False


def freeze_startup_heap() -> int:
    """Collect, then freeze every object alive; once per process. Returns the number of objects
    frozen by this call (0 when this process already did)."""
    global _frozen_by_us
    if _frozen_by_us:
        return 0
    _frozen_by_us = True
    before = gc.get_freeze_count()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count() - before


def frozen_objects() -> int:
    """Objects in the permanent generation (by us or anyone else)."""
    return gc.get_freeze_count()
