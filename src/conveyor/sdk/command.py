"""`conveyor worker module:attr`: import a module and run the `Worker` it names.

The current directory goes first on `sys.path`, so `conveyor worker examples.hello_worker:worker`
works from a checkout the way `python -m` would.
"""

from __future__ import annotations

import importlib
import os
import sys

from conveyor.sdk.worker import Worker


def load_worker(spec: str) -> Worker:
    """The Worker object `module:attr` names (attr may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"conveyor worker: expected MODULE:ATTR (e.g. examples.hello_worker:worker), "
                         f"got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: object = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"conveyor worker: cannot import {module_name!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SystemExit(f"conveyor worker: {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Worker):
        raise SystemExit(f"conveyor worker: {spec} is a {type(obj).__name__}, not a conveyor.sdk.Worker")
    return obj


def run_worker(spec: str, target: str | None = None, slots: int | None = None) -> int:
    """Load and run the worker until SIGTERM/SIGINT; the process's exit code."""
    worker = load_worker(spec)
    if target is not None:
        worker.target = target
    if slots is not None:
        if slots < 1:
            raise SystemExit("conveyor worker: --slots must be >= 1")
        worker.slots = slots
    worker.run()
    return 0
