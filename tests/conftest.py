"""Shared test fixtures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny models and bags run fastest on one torch thread (two threads spin-wait on the CI's
    2 shared cores); the previous setting is restored afterwards. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



_MODULE_FIXTURE = re.compile(r"@pytest\.fixture\([^)]*scope=[\"']module[\"']")


def _files_with_module_fixtures() -> set[str]:
    """Test files (as xdist names them, relative to the rootdir) that define a module-scoped fixture."""
    here = Path(__file__).parent
    return {f"{here.name}/{p.name}" for p in here.glob("test_*.py") if _MODULE_FIXTURE.search(p.read_text())}


# Tests that must never run at the same time as each other, so they share one worker: a Ray engine
# started while another test's local Ray cluster is up can attach to that cluster and wait on it
# (the Ray engine test took 75 s instead of 15 s when the two overlapped).
ONE_WORKER_GROUPS: dict[str, tuple[str, ...]] = {
    "ray": ("tests/test_simulation_ray.py", "tests/test_simulation.py::test_ray_engine_runs_the_same_apps"),
}


def _group_of(nodeid: str) -> str | None:
    path = nodeid.split("::", 1)[0]
    for group, members in ONE_WORKER_GROUPS.items():
        if any(m == path or nodeid == m or nodeid.startswith(m + "[") for m in members):
            return group
    return None


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist, the tests of a file that builds a module-scoped fixture (a federation, a
    wheel, an extracted slide) run on one worker, so the fixture is built once rather than once per
    worker, and so do the tests of each :data:`ONE_WORKER_GROUPS` group; every other test goes to
    whichever worker is free. (xdist's ``loadgroup`` cannot be
    used: with pytest 9 its renamed node ids do not take.)"""
    from xdist.scheduler import LoadScopeScheduling

    shared = _files_with_module_fixtures()

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return _group_of(nodeid) or (path if path in shared else nodeid)

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The tests marked ``slow`` start first (in their files' order), so that under xdist the
    long real-process runs overlap each other and the short tests fill the gaps at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
