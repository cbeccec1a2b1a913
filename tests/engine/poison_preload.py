"""Dask worker preload for test_dask_poison: a caption that makes its worker process SIGKILL itself.

Loaded with `dask worker --preload` into every worker process (again after each restart). It wraps the
filter stage's per-record function in that process only, so one record kills whichever worker runs it,
every time, as a native crash in a decoder would; nothing in mmcorpus itself knows about it.
"""

from __future__ import annotations

import os
import signal

import transforms.filter_base as filter_base

POISON = "POISON-KILLS-ITS-WORKER"
# dask may import a preload more than once per process: wrap the original function, never our wrapper.
_run_filters = getattr(filter_base.run_filters, "unpoisoned", filter_base.run_filters)


def _poisoned(pair, filters):
    if POISON in (pair.caption or ""):
        os.kill(os.getpid(), signal.SIGKILL)
    return _run_filters(pair, filters)


_poisoned.unpoisoned = _run_filters
filter_base.run_filters = _poisoned
