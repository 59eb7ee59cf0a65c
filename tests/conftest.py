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


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist, the tests of a file that builds a module-scoped fixture (a federation, a
    wheel, an extracted slide) run on one worker, so the fixture is built once rather than once per
    worker; every other test goes to whichever worker is free. (xdist's ``loadgroup`` cannot be
    used: with pytest 9 its renamed node ids do not take.)"""
    from xdist.scheduler import LoadScopeScheduling

    shared = _files_with_module_fixtures()

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in shared else nodeid

    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The tests marked ``slow`` start first (in their files' order), so that under xdist the
    long real-process runs overlap each other and the short tests fill the gaps at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
