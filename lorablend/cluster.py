"""Ray, for work spread over many processes or machines: `bench --executor ray` and `bank build --executor ray`."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from lorablend.errors import InputError


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator:
    """The `ray` module, connected to `address` (a running cluster), else to a local instance started here and shut
    down on leaving. A local instance's workers inherit this process's environment (cache, offline mode)."""
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'lorablend[ray]'") from None
    started = not ray.is_initialized()
    if started and address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    elif started:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
