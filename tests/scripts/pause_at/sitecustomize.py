"""Test-only: hold each rank at one start-up phase until the test lets it go, so a signal lands in
that phase deterministically (tests/e2e/test_preempt.py). On PYTHONPATH, Python imports this module
at start-up in every process; it acts only in ranks (RANK set) when HARNESS_TEST_PAUSE names a phase:

- ``import_torch``: before ``import torch`` runs (the worker's stop handlers are already installed);
- ``rendezvous``: torch imported, before ``torch.distributed.init_process_group``.

At the phase the rank writes ``<HARNESS_TEST_PAUSE_DIR>/<rank>.<phase>`` and waits until
``<HARNESS_TEST_PAUSE_DIR>/go`` exists (signals arriving meanwhile are handled as usual).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import time

PHASE = os.environ.get("HARNESS_TEST_PAUSE", "")
FOLDER = os.environ.get("HARNESS_TEST_PAUSE_DIR", "")


def _pause(phase: str) -> None:
    with open(os.path.join(FOLDER, f"{os.environ['RANK']}.{phase}"), "w") as marker:
        marker.write(str(os.getpid()))
    while not os.path.exists(os.path.join(FOLDER, "go")):
        time.sleep(0.01)


class _Hold(importlib.abc.MetaPathFinder):
    """Pauses before the first import of ``torch``, or patches init_process_group once
    ``torch.distributed`` is imported."""

    def find_spec(self, name, path, target=None):
        if name == "torch" and PHASE == "import_torch":
            sys.meta_path.remove(self)
            _pause(PHASE)
            return None  # the normal finders import torch now
        if name == "torch.distributed" and PHASE == "rendezvous":
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            loader = spec.loader
            original = loader.exec_module

            def exec_module(module):
                original(module)
                init = module.init_process_group

                def paused_init(*args, **kwargs):
                    _pause(PHASE)
                    return init(*args, **kwargs)
                module.init_process_group = paused_init
            loader.exec_module = exec_module
            return spec
        return None


if PHASE and FOLDER and "RANK" in os.environ:
    sys.meta_path.insert(0, _Hold())
