"""Warm ClientApp start (tdamil.client.warm_start): Flower's SuperExec loop with a forking executor.

The whole path (a real SuperNode in ``--isolation process``, this SuperExec, forked ClientApps that
train and reply) runs in tests/test_e2e_federation.py; here: the executor's contract with Flower's
loop, the fork and reaping, and the switch in the site's commands."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")


def _spec(task_type, tmp_path: Path, **kw):
    from flwr.supercore.superexec.executor import ExecutionSpec

    base = dict(task_type=task_type, runtime_api_address="127.0.0.1:9", token="tok", insecure=True,
                root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
                suppress_output=False, task_id=7)
    base.update(kw)
    return ExecutionSpec(**base)


def test_flower_superexec_builds_its_executor_through_the_factory_we_replace():
    """The warm start hands its executor to Flower's loop through run_superexec.get_executor; if a Flower
    release builds it another way, this fails instead of sites silently running cold."""
    import flwr.supercore.superexec.run_superexec as superexec

    assert callable(superexec.get_executor)
    source = inspect.getsource(superexec.run_superexec)
    assert "executor = get_executor(" in source and "plugin.launch_task(" in source
    from flwr.supercore.superexec.plugin.base_exec_plugin import BaseExecPlugin

    assert "self.executor.launch(" in inspect.getsource(BaseExecPlugin.launch_task)


def test_a_clientapp_task_runs_in_a_forked_child_that_is_reaped(tmp_path, monkeypatch):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResultStatus

    import tdamil.client.warm_start as warm

    marker = tmp_path / "child.txt"

    def fake_task(spec, certificates):  # runs in the child instead of Flower's run_clientapp
        marker.write_text(f"{os.getpid()} {spec.token} {certificates!r}")
        return 3

    monkeypatch.setattr(warm, "_run_task", fake_task)
    ex = warm.ForkExecutor()
    result = ex.launch(_spec(TaskType.CLIENT_APP, tmp_path))
    assert result.status == LaunchResultStatus.ACCEPTED and len(ex.children) == 1
    deadline = time.monotonic() + 30
    while ex.children and time.monotonic() < deadline:
        ex.reconcile()
        time.sleep(0.05)
    assert not ex.children, "the finished child was not reaped"
    pid, token, certs = marker.read_text().split()
    assert int(pid) != os.getpid() and token == "tok" and certs == "None"


def test_the_runtime_ca_is_read_by_the_parent_and_handed_to_the_child(tmp_path, monkeypatch):
    from flwr.supercore.constant import TaskType

    import tdamil.client.warm_start as warm

    class Exited(Exception):
        pass

    seen = {}
    monkeypatch.setattr(warm, "_run_task", lambda spec, certificates: seen.setdefault("certs", certificates) and 0)

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(warm.os, "_exit", fake_exit)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"PEM")
    ex = warm.ForkExecutor(fork=lambda: 0)  # pretend to be the child: run the task here, then "_exit"
    with pytest.raises(Exited) as exited:
        ex.launch(_spec(TaskType.CLIENT_APP, tmp_path, insecure=False, root_certificates_path=str(ca)))
    assert seen["certs"] == b"PEM" and exited.value.args == (0,)
    missing = ex.launch(_spec(TaskType.CLIENT_APP, tmp_path, insecure=False, root_certificates_path=str(tmp_path / "no.pem")))
    assert missing.status == "failed" and "no.pem" in missing.message


def test_other_task_types_go_to_flowers_subprocess_executor(tmp_path, monkeypatch):
    from flwr.supercore.constant import TaskType

    import tdamil.client.warm_start as warm

    ex = warm.ForkExecutor(fork=lambda: pytest.fail("must not fork"))
    calls = []
    monkeypatch.setattr(ex, "_fallback", SimpleNamespace(launch=lambda spec: calls.append(spec.task_type) or "sub"))
    other = next(t for t in TaskType if t != TaskType.CLIENT_APP)
    assert ex.launch(_spec(other, tmp_path)) == "sub" and calls == [other]


def test_the_preloaded_stack_holds_no_extraction_modules():
    """The warm parent imports what a train message uses and nothing of the extraction stack (the
    same rule as the cold ClientApp path, tests/test_client_startup.py)."""
    from tdamil.client.warm_start import PRELOAD

    assert "tdamil.client.client_app" in PRELOAD and "torch" in PRELOAD
    assert not [m for m in PRELOAD if m.split(".")[0] in ("timm", "cv2", "openslide", "matplotlib")]
    assert not [m for m in PRELOAD if m.startswith("tdamil.wsi")]


def test_site_logs_carry_no_line_per_http_request():
    """The warm-start SuperExec asks the SuperNode for work 10 times a second over HTTP; a hospital
    IT person reading the site's log must not get a line for each (they show with -v)."""
    import logging

    from tdamil.logs import setup_logging

    httpx = logging.getLogger("httpx")
    before = httpx.level
    try:
        httpx.setLevel(logging.NOTSET)
        setup_logging(False)
        assert not httpx.isEnabledFor(logging.INFO)
    finally:
        httpx.setLevel(before)


def test_the_preloaded_parent_has_no_cuda_context_and_no_extraction_stack():
    """What makes forking it safe, checked in a fresh interpreter after the real preload."""
    import subprocess
    import sys

    code = ("import sys, torch; from tdamil.client.warm_start import preload; preload(); "
            "bad = [m for m in ('timm', 'cv2', 'openslide', 'matplotlib', 'tdamil.wsi') if m in sys.modules]; "
            "print(torch.cuda.is_initialized(), bad, 'tdamil.client.client_app' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False [] True", out.stdout
