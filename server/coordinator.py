"""``flwr-server`` / ``tdamil-server``: the coordinator of a federated TDA-MIL run.

What it does, in order:

1. validates ``configs/server.yaml`` (unknown keys, types, files) before anything starts;
2. refuses to run without TLS certificates unless ``--insecure`` is given (then warns loudly);
3. starts a real ``flower-superlink`` bound to 127.0.0.1 (its Fleet, Control and Runtime APIs share
   one port in Flower 1.42), with per-run dependency installation and telemetry off;
4. starts the fleet gateway on ``superlink.address``: the only public port, serving ``/v1/fleet/*``;
5. with ``auth.enabled`` registers every ``<site>.pub`` of ``auth.site_public_keys``;
6. submits the run (``flwr run``) with a bundle that carries configuration only (see
   :mod:`tdamil.server.fab`) and follows its logs until the ServerApp finishes;
7. stops everything (also on Ctrl-C / SIGTERM); ``--resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

from tdamil.config import ConfigError
from tdamil.logs import one_line_error, reformat_flower_line
from tdamil.federation.processes import (
    ManagedProcess,
    die_with_parent,
    flower_bin,
    flower_env,
)
from tdamil.federation.watchdog import start_watchdog
from tdamil.net import split_host_port, wait_for_port

logger = logging.getLogger(__name__)

__all__ = ["Coordinator", "main"]

CONNECTION = "tdamil"
REJECTED_JOIN = "Rejected join from"  # the gateway's line for a site whose key the SuperLink refused
_BANNER = "!" * 78


class Coordinator:
    """Owns the SuperLink, the gateway and the submitted run of one coordinator session."""

    def __init__(self, config_path: Path, *, insecure: bool = False, resume: bool = False,
                 output_dir: Optional[Path] = None, echo: bool = True) -> None:
        from tdamil.server.config import load_server_config  # noqa: PLC0415

        self.config_path = Path(config_path).resolve()
        self.cfg = load_server_config(self.config_path)
        self.insecure = insecure
        self.resume = resume
        self.echo = echo
        self.out_dir = Path(output_dir or self.cfg.output_dir).resolve()
        self.state_dir = self.out_dir / ".flower"
        self.processes: list[ManagedProcess] = []
        self.run_proc: Optional[subprocess.Popen] = None
        self.run_id: Optional[int] = None
        # tags this session's audit lines: a --resume judges its own outcome, not the earlier run's
        self.session = uuid.uuid4().hex[:12]
        from tdamil.security.preflight import check_coordinator_security  # noqa: PLC0415

        # the coordinator's one precondition check (the YAML loader checked structure and data files)
        self.tls_on = check_coordinator_security(self.cfg.tls, self.cfg.auth, insecure=insecure,
                                                 public_address=self.cfg.superlink.address,
                                                 source=str(self.config_path))
        self._watchdog: Optional[subprocess.Popen] = None

    # ---------------------------------------------------------------------------------------
    @property
    def internal(self) -> str:
        return f"127.0.0.1:{self.cfg.superlink.internal_port}"

    def _tls_args(self) -> list[str]:
        t = self.cfg.tls
        return ["--ssl-ca-certfile", str(t.ca_cert), "--ssl-certfile", str(t.cert), "--ssl-keyfile", str(t.key)]

    def start_superlink(self) -> None:
        cmd = [flower_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.cfg.superlink.internal_port),
               "--disable-runtime-dependency-installation"]
        cmd += self._tls_args() if self.tls_on else ["--insecure"]
        if self.cfg.auth.enabled:
            cmd.append("--enable-supernode-auth")
        if self.cfg.superlink.database is not None:
            cmd += ["--database", str(self.cfg.superlink.database)]
        proc = ManagedProcess("flower-superlink", cmd, self.state_dir / "logs" / "superlink.log",
                              env=flower_env(self.state_dir / "superlink-home", threads=None))
        self.processes.append(proc)
        wait_for_port("127.0.0.1", self.cfg.superlink.internal_port, timeout=60, proc=proc)
        logger.info("SuperLink running on %s (loopback only; log %s).", self.internal, proc.log_path)

    def start_gateway(self) -> None:
        scheme = "https" if self.tls_on else "http"
        cmd = [sys.executable, "-m", "tdamil.server.gateway", "--listen", self.cfg.superlink.address,
               "--upstream", f"{scheme}://{self.internal}"]
        if self.tls_on:
            t = self.cfg.tls
            cmd += ["--ssl-certfile", str(t.cert), "--ssl-keyfile", str(t.key), "--ca-cert", str(t.ca_cert)]
        if logger.isEnabledFor(logging.DEBUG):  # flwr-server -v: the gateway logs every forwarded call
            cmd.append("--verbose")
        proc = ManagedProcess("fleet-gateway", cmd, self.state_dir / "logs" / "gateway.log", env=flower_env(),
                              on_line=_show_rejected_joins)
        self.processes.append(proc)
        wait_for_port(*split_host_port(self.cfg.superlink.address), timeout=60, proc=proc)
        logger.info("Sites connect to %s (%s; Fleet API only).", self.cfg.superlink.address,
                    "TLS" if self.tls_on else "NO TLS")

    def write_cli_config(self) -> Path:
        home = self.state_dir / "cli-home"
        home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "{self.internal}"']
        lines.append(f'root-certificates = "{self.cfg.tls.ca_cert}"' if self.tls_on else "insecure = true")
        (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return home

    def register_keys(self) -> list[str]:
        """Register every ``<site>.pub`` of ``auth.site_public_keys`` with the SuperLink and write
        ``site_nodes.json`` ({node id: site}): the ServerApp names every reply by the key that sent
        it, never by the name the reply claims."""
        from tdamil.atomic import atomic_path  # noqa: PLC0415
        from tdamil.security.nodeauth import register_site_keys  # noqa: PLC0415

        sites = register_site_keys(Path(self.cfg.auth.site_public_keys), superlink=CONNECTION,
                                   flwr_home=self.state_dir / "cli-home")
        with atomic_path(self.site_nodes_path) as tmp:
            tmp.write_text(json.dumps({str(r.node_id): site for site, r in sites.items()}, indent=1) + "\n",
                           encoding="utf-8")
        return list(sites)

    @property
    def site_nodes_path(self) -> Path:
        return self.state_dir / "site_nodes.json"

    def submit(self) -> int:
        """Submit the run and follow its logs until it ends; returns flwr run's exit code."""
        from tdamil.server.fab import write_app_dir  # noqa: PLC0415

        app_dir = write_app_dir(self.state_dir / "app" / "tdamil-fl")
        nodes = str(self.site_nodes_path) if self.cfg.auth.enabled else ""
        overrides = (f'server-config="{self.config_path}" output-dir="{self.out_dir}" '
                     f'resume={"true" if self.resume else "false"} session-id="{self.session}" site-nodes="{nodes}"')
        cmd = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", overrides, "--stream"]
        env = flower_env(self.state_dir / "cli-home")
        log_path = self.state_dir / "logs" / "run.log"
        logger.info("Submitting the run (bundle: %s/pyproject.toml only).", app_dir)
        self.run_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                         start_new_session=True, preexec_fn=die_with_parent)
        with open(log_path, "a", encoding="utf-8") as log:
            assert self.run_proc.stdout is not None
            for line in self.run_proc.stdout:
                line = reformat_flower_line(line)  # Flower's "INFO :   msg" -> time, level, source
                log.write(line)
                log.flush()
                m = re.search(r"Successfully started run (\d+)", line)
                if m:
                    self.run_id = int(m.group(1))
                    logger.info("Run %s started; output in %s", self.run_id, self.out_dir)
                if self.echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        return self.run_proc.wait()

    def outcome(self) -> tuple[str, Optional[str]]:
        """How THIS session's run ended per the audit log: ("finished" | "failed" | "unknown", error)."""
        from tdamil.federation.audit import session_outcome  # noqa: PLC0415

        return session_outcome(self.out_dir / "audit.jsonl", self.session)

    def run_finished(self) -> bool:
        """Whether this session's run wrote ``run_finished`` (an earlier session's does not count)."""
        return self.outcome()[0] == "finished"

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # SuperExec and ServerApp are Flower's children, not ours: they go when this process dies
        self._watchdog = start_watchdog()
        if self.insecure:
            logger.warning("\n%s\n  --insecure: NO TLS. Model weights and metrics travel unencrypted and sites are not\n"
                           "  authenticated. Use this only for a local test on a trusted network.\n%s",
                           _BANNER, _BANNER)
        self.start_superlink()
        self.write_cli_config()
        if self.cfg.auth.enabled:
            names = self.register_keys()
            logger.info("Registered %d site key(s): %s", len(names), ", ".join(names))
        self.start_gateway()

    def stop(self) -> None:
        if self.run_id is not None and self.run_proc is not None and self.run_proc.poll() is None:
            try:
                subprocess.run([flower_bin("flwr"), "stop", str(self.run_id), CONNECTION], timeout=15,
                               env=flower_env(self.state_dir / "cli-home"), capture_output=True, check=False)
            except (subprocess.TimeoutExpired, OSError):
                pass
        if self.run_proc is not None and self.run_proc.poll() is None:
            self.run_proc.terminate()
            try:
                self.run_proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.run_proc.kill()
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        if self._watchdog is not None and self._watchdog.stdin is not None:
            self._watchdog.stdin.close()  # everything is stopped: the watchdog exits
            self._watchdog.wait(timeout=10)
        logger.info("Coordinator stopped.")

    def run(self) -> int:
        try:
            self.start()
            code = self.submit()
        finally:
            self.stop()
        state, error = self.outcome()
        if state == "finished":
            logger.info("Run finished. Checkpoints, metrics.csv, audit.jsonl and plots are in %s", self.out_dir)
            return 0
        if state == "failed":
            logger.error("The run failed: %s%s (details: %s)", one_line_error(error or ""), self._resume_hint(error),
                         self.state_dir / "logs" / "run.log")
            return 1
        logger.error("The run did not finish (flwr run exit code %s). See %s and %s. Continue it with "
                     "`flwr-server --config %s --resume`.", code, self.state_dir / "logs",
                     self.out_dir / "audit.jsonl", self.config_path)
        return 1

    def _resume_hint(self, error: Optional[str]) -> str:
        """Sites that did not come are fixed outside this run: say how to continue it afterwards."""
        if error and "site(s) connected" in error:
            return f". Once the sites are up, continue with `flwr-server --config {self.config_path} --resume`"
        return ""


def _show_rejected_joins(line: str) -> None:
    """The gateway's log goes to a file; a site refused for its key is shown to the operator too."""
    if REJECTED_JOIN in line:
        sys.stderr.write(line)
        sys.stderr.flush()


def _sigterm_to_interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="flwr-server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/server.yaml", help="coordinator YAML (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    parser.add_argument("--insecure", action="store_true", help="run WITHOUT TLS (local tests only)")
    parser.add_argument("--output-dir", type=Path, default=None, help="override output_dir")
    parser.add_argument("--check", action="store_true", help="only validate the config and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    from tdamil.logs import setup_logging  # noqa: PLC0415

    setup_logging(args.verbose)
    from tdamil.security.preflight import SecurityCheckError  # noqa: PLC0415

    try:
        coordinator = Coordinator(Path(args.config), insecure=args.insecure, resume=args.resume,
                                  output_dir=args.output_dir)
    except (ConfigError, ValueError, SecurityCheckError) as exc:
        print(f"error: {one_line_error(exc)}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK")
        return 0
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        return coordinator.run()
    except KeyboardInterrupt:
        logger.warning("Interrupted: everything is stopped. Continue later with --resume.")
        return 130
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:  # everything is stopped by run()
        # ConfigError, SecurityCheckError, NodeAuthError, a SuperLink that exited early (RuntimeError,
        # TimeoutError): each message names the file or log and the fix
        print(f"error: {one_line_error(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
