"""Warm ClientApp start: the site's SuperExec forks each message's ClientApp from a pre-imported process.

Flower 1.42's SuperNode (``--isolation subprocess``, its default) starts a fresh ``flwr-clientapp``
process for every message, so every round pays the interpreter, Flower, torch, the training engine
and scikit-learn again: 3-4 s on an idle machine, tens of seconds on a loaded one (issue #10,
``benchmarks/federation.md``). With ``federation.warm_start: true`` (the default) ``tdamil-client``
starts the SuperNode with ``--isolation process`` and runs this module beside it
(``python -m tdamil.client.warm_start``): Flower's own SuperExec loop (``run_superexec``: it asks the
SuperNode for ClientApp tasks) with :class:`ForkExecutor`, which imports that stack ONCE and then
``fork()``s one child per task. The child runs Flower's own ``run_clientapp`` with the task's token,
exactly what ``flwr-clientapp --token`` would run, and exits. So every message still gets a process of
its own (a crash, a leak or a CUDA context of one round cannot reach the next); only the imported
modules are shared, copy-on-write.

What keeps ``fork()`` safe here: the parent imports modules and does nothing else with them. It
never runs a torch operation (no OpenMP pool to inherit) and never touches CUDA (a CUDA context does
not survive fork; each child creates its own on the site's GPU), and it holds no HDF5 file open.
Children are reaped in :meth:`ForkExecutor.reconcile`, which Flower's loop calls before every poll,
and each child watches the SuperExec's pid (Flower's parent monitor), so none outlives it.
Any other task type (not used by this project) falls back to Flower's subprocess executor.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger(__name__)

__all__ = ["PRELOAD", "ForkExecutor", "preload", "warm_superexec_command", "main"]

#: What a train message uses, imported once in the parent (Flower's runtime, the ClientApp, the
#: training engine with its metrics stack). Nothing of the extraction stack (timm, OpenCV, openslide).
PRELOAD = (
    "numpy",
    "torch",
    "h5py",
    "sklearn.metrics",
    "flwr.supernode.runtime.run_clientapp",
    "tdamil.client.client_app",
    "tdamil.client.config",
    "tdamil.federation.data",
    "tdamil.federation.task",
    "tdamil.models",
    "tdamil.train.engine",
    "tdamil.train.evaluate",
    "tdamil.train.metrics",
    "tdamil.train.instance_metrics",
    "tdamil.security.dp",
)


def preload(modules: tuple[str, ...] = PRELOAD) -> float:
    """Import ``modules`` (a missing optional one is logged, not fatal); returns the seconds it took."""
    start = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # pragma: no cover - every module above is a dependency of the project
            logger.warning("Warm start: could not pre-import %s (%s); the ClientApp imports it itself.", name, exc)
    return time.perf_counter() - start


def _run_task(spec: Any, certificates: Optional[bytes]) -> int:
    """In the forked child: run Flower's ClientApp task for ``spec.token``; returns the exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the parent's handlers close the parent's client
        signal.signal(sig, signal.SIG_DFL)
    from flwr.supernode.runtime.run_clientapp import run_clientapp  # noqa: PLC0415 - pre-imported

    try:
        run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token, insecure=spec.insecure,
                      certificates=certificates, parent_pid=spec.parent_pid,
                      runtime_dependency_install=spec.runtime_dependency_install)
    except SystemExit as exc:  # flwr_exit ends every task with sys.exit(code)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


class ForkExecutor:
    """A Flower SuperExec executor (``flwr.supercore.superexec.executor.Executor``) that forks
    ClientApp task processes from this pre-imported process instead of exec'ing ``flwr-clientapp``."""

    def __init__(self, fork: Any = os.fork) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor  # noqa: PLC0415

        self._fork = fork
        self._fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: set[Any], *, insecure: bool = False,
                              root_certificates_path: Optional[str] = None) -> tuple[set[Any], set[str]]:
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: Any = None, *, fab_hash: Optional[str] = None, insecure: bool = False,
                          root_certificates_path: Optional[str] = None) -> None:
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType  # noqa: PLC0415
        from flwr.supercore.superexec.executor import LaunchResult  # noqa: PLC0415

        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        try:
            certificates = None if spec.insecure or not spec.root_certificates_path else \
                Path(spec.root_certificates_path).read_bytes()
        except OSError as exc:
            return LaunchResult.failed(f"cannot read the Runtime API CA {spec.root_certificates_path}: {exc}")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = self._fork()
        if pid == 0:  # pragma: no cover - the child; measured by the end-to-end tests
            code = 1
            try:
                code = _run_task(spec, certificates)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (Flower's loop calls this before every poll)."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.children.discard(pid)
                continue
            if done:
                self.children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    logger.warning("A ClientApp task process (pid %d) ended with exit code %d; Flower reports the "
                                   "task as failed to the coordinator.", pid, code)

    def close(self) -> None:
        """On shutdown: stop running task processes (they would also stop when they see us gone)."""
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.reconcile()


def warm_superexec_command(runtime_port: int, parent_pid: int) -> list[str]:
    """The command ``tdamil-client`` runs beside a ``--isolation process`` SuperNode."""
    return [sys.executable, "-m", "tdamil.client.warm_start", "--runtime-api-address", f"127.0.0.1:{runtime_port}",
            "--parent-pid", str(parent_pid)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tdamil.client.warm_start", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (127.0.0.1:PORT)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) ends")
    args = parser.parse_args(argv)
    from tdamil.federation.object_pulls import use_quick_object_pulls  # noqa: PLC0415
    from tdamil.logs import setup_logging  # noqa: PLC0415

    setup_logging(False)
    seconds = preload()
    # the forked ClientApps ask their SuperNode for the instruction's arrays every <= 0.5 s while it
    # is still downloading them, not Flower's up-to-10 s back-off (tdamil.federation.object_pulls)
    use_quick_object_pulls("site")
    logger.info("Warm start: the ClientApp stack is imported (%.1f s); each message's ClientApp is forked from it.",
                seconds)
    import flwr.supercore.superexec.run_superexec as superexec  # noqa: PLC0415

    executor = ForkExecutor()
    # Flower's loop builds its executor through this one factory (subprocess or Kubernetes); ours is
    # handed in the same way. tests/test_warm_start.py fails if a Flower release renames it.
    superexec.get_executor = lambda *a, **k: executor
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True,
                            parent_pid=args.parent_pid)  # the Runtime API listens on the site's loopback only
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
