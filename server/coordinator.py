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
import logging
import re
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Optional

from tdamil.config import ConfigError
from tdamil.logs import reformat_flower_line
from tdamil.federation.processes import ManagedProcess, flower_bin, flower_env, wait_for_port

logger = logging.getLogger(__name__)

__all__ = ["Coordinator", "main", "register_site_keys_cli"]

CONNECTION = "tdamil"
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
        tls = self.cfg.tls
        self.tls_on = all((tls.ca_cert, tls.cert, tls.key))
        if any((tls.ca_cert, tls.cert, tls.key)) and not self.tls_on:
            raise ConfigError(f"{self.config_path}: 'tls' needs ca_cert, cert and key together (or none with "
                              "--insecure).")
        if not self.tls_on and not insecure:
            raise ConfigError(
                f"{self.config_path}: no TLS certificates (tls.ca_cert, tls.cert, tls.key). The coordinator refuses "
                "to send models over an unencrypted link. Create them with `tdamil-certs init` and set the tls "
                "section, or pass --insecure for a local test on a trusted network.")
        if insecure and self.tls_on:
            logger.warning("--insecure given: the TLS certificates in %s are ignored.", self.config_path)
            self.tls_on = False
        if self.cfg.auth.enabled and not self.tls_on:
            raise ConfigError(f"{self.config_path}: auth.enabled needs TLS (Flower refuses node auth without it).")
        host, _, port = self.cfg.superlink.address.rpartition(":")
        if int(port) == self.cfg.superlink.internal_port:
            raise ConfigError(f"{self.config_path}: superlink.address port and superlink.internal_port must differ.")
        if self.tls_on:
            self.check_tls(host.strip("[]"))

    def check_tls(self, public_host: str) -> None:
        """Before anything starts: the certificate parses, is signed by ``tls.ca_cert``, is valid,
        matches ``tls.key`` and covers 127.0.0.1 and the public host (not checked for a wildcard
        bind address). Raises :class:`~tdamil.security.preflight.SecurityCheckError`."""
        import ipaddress  # noqa: PLC0415

        from tdamil.security.preflight import SecurityCheckError, check_server_tls  # noqa: PLC0415

        source = str(self.config_path)
        check_server_tls(self.cfg.tls, [], source=source)  # parse, CA signature, validity, key, 127.0.0.1
        if public_host in ("0.0.0.0", "::", "", "127.0.0.1", "localhost"):
            return
        try:
            check_server_tls(self.cfg.tls, [public_host], source=source)
        except SecurityCheckError as exc:
            try:
                ipaddress.ip_address(public_host)
            except ValueError:
                raise exc from None  # sites dial this name: the certificate must cover it
            # bound to an IP the sites may reach under a DNS name the certificate covers
            logger.warning("%s (sites must dial a name the certificate covers).", " ".join(str(exc).split()))

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
        proc = ManagedProcess("fleet-gateway", cmd, self.state_dir / "logs" / "gateway.log", env=flower_env())
        self.processes.append(proc)
        host, _, port = self.cfg.superlink.address.rpartition(":")
        wait_for_port(host.strip("[]"), int(port), timeout=60, proc=proc)
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
        """Register every ``<site>.pub`` with the SuperLink (auth enabled)."""
        folder = Path(self.cfg.auth.site_public_keys)
        try:
            from tdamil.security.nodeauth import register_site_keys  # noqa: PLC0415
        except ImportError:
            register_site_keys = None  # type: ignore[assignment]
        if register_site_keys is not None:
            return list(register_site_keys(folder, superlink=CONNECTION, flwr_home=self.state_dir / "cli-home"))
        return register_site_keys_cli(folder, self.state_dir / "cli-home")

    def submit(self) -> int:
        """Submit the run and follow its logs until it ends; returns flwr run's exit code."""
        from tdamil.server.fab import write_app_dir  # noqa: PLC0415

        app_dir = write_app_dir(self.state_dir / "app" / "tdamil-fl")
        overrides = (f'server-config="{self.config_path}" output-dir="{self.out_dir}" '
                     f'resume={"true" if self.resume else "false"} session-id="{self.session}"')
        cmd = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", overrides, "--stream"]
        env = flower_env(self.state_dir / "cli-home")
        log_path = self.state_dir / "logs" / "run.log"
        logger.info("Submitting the run (bundle: %s/pyproject.toml only).", app_dir)
        self.run_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                         start_new_session=True)
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
            logger.error("The run failed: %s (details: %s)", error, self.state_dir / "logs" / "run.log")
            return 1
        logger.error("The run did not finish (flwr run exit code %s). See %s and %s. Continue it with --resume.",
                     code, self.state_dir / "logs", self.out_dir / "audit.jsonl")
        return 1


def register_site_keys_cli(folder: Path, flwr_home: Path) -> list[str]:
    """Register ``<folder>/*.pub`` with ``flwr supernode register`` (one call per key)."""
    names = []
    keys = sorted(Path(folder).glob("*.pub"))
    if not keys:
        raise ConfigError(f"{folder}: no <site>.pub files to register. Collect the sites' public keys there.")
    for key in keys:
        res = subprocess.run([flower_bin("flwr"), "supernode", "register", str(key), CONNECTION, "--name", key.stem],
                             env=flower_env(flwr_home), capture_output=True, text=True, timeout=60, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"Registering {key} failed: {res.stdout}{res.stderr}")
        names.append(key.stem)
    return names


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
    from tdamil.security.nodeauth import NodeAuthError  # noqa: PLC0415
    from tdamil.security.preflight import SecurityCheckError  # noqa: PLC0415

    try:
        coordinator = Coordinator(Path(args.config), insecure=args.insecure, resume=args.resume,
                                  output_dir=args.output_dir)
    except (ConfigError, ValueError, SecurityCheckError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
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
    except (ConfigError, SecurityCheckError, NodeAuthError) as exc:  # everything is stopped by run()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (certificate / registration errors may span several)."""
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
