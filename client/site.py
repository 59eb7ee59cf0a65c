"""``tdamil-client --site site_a``: join the federation from a hospital.

1. reads and validates ``configs/sites/<site>.yaml`` (or ``--config``) before anything starts;
   checks the consortium CA and the site key, and makes a TLS handshake with the coordinator the
   way the SuperNode will (a wrong CA, a plaintext server or a bad key is a clear error now, not
   endless retries; a coordinator that is not up yet is only a warning: the SuperNode keeps trying);
2. extracts features of slides that have none yet (``tdamil.wsi.extract.extract_site``) when
   ``data.slides_dir`` and an ``extraction`` section are set;
3. checks that every training/validation slide has its features, so a missing file is reported
   now, not in the middle of a round;
4. starts a real ``flower-supernode`` that connects OUT to the coordinator (nothing listens on the
   network at the site; the SuperNode's runtime API is on 127.0.0.1), with the site name and YAML
   path as node config, the consortium CA (TLS) and the site key (authentication) when configured.
   The SuperNode runs this site's installed ``tdamil.client.client_app:app``; slides and features
   never leave the site, only model weights and metrics do.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from tdamil.config import ConfigError
from tdamil.federation.processes import _die_with_parent, flower_bin, flower_env

logger = logging.getLogger(__name__)

__all__ = ["supernode_command", "check_connection", "prepare_site", "run_supernode", "main"]


def check_connection(address: str, ca_cert: Path | str, timeout: float = 5.0) -> bool:
    """TLS handshake with the coordinator, verified against ``ca_cert``, before the SuperNode starts.

    Returns True when verified; False (with a warning) when the coordinator cannot be reached yet:
    refused, timed out or unresolvable, which the SuperNode's own retries cover. Raises
    :class:`~tdamil.security.preflight.SecurityCheckError` for a TLS problem (certificate from
    another CA, plaintext server, name not covered, expired), which retrying would never fix.
    """
    import socket  # noqa: PLC0415

    from tdamil.security.preflight import probe_tls, split_address  # noqa: PLC0415

    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        logger.warning("The coordinator at %s cannot be reached yet (%s); the SuperNode will keep trying. If this "
                       "lasts, check federation.superlink, that the coordinator runs, and that the firewall allows "
                       "outbound TCP to port %d.", address, exc.__class__.__name__ if not str(exc) else exc, port)
        return False
    version = probe_tls(address, ca_cert, timeout=timeout)
    logger.info("TLS link to the coordinator %s verified (%s, CA %s).", address, version, ca_cert)
    return True


def supernode_command(cfg: Any, config_path: Path, *, insecure: bool = False) -> list[str]:
    """The ``flower-supernode`` command line for a validated site config."""
    fed = cfg.federation
    node_config = f'site="{cfg.site}" config="{Path(config_path).resolve()}"'
    cmd = [flower_bin("flower-supernode"), "--superlink", fed.superlink, "--host", "127.0.0.1",
           "--port", str(fed.runtime_port), "--node-config", node_config]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(cfg.tls.ca_cert)]
    if cfg.auth.private_key is not None:
        cmd += ["--auth-supernode-private-key", str(cfg.auth.private_key)]
    if fed.max_retries is not None:
        cmd += ["--max-retries", str(fed.max_retries)]
    if fed.max_wait_time_s is not None:
        cmd += ["--max-wait-time", str(fed.max_wait_time_s)]
    return cmd


def prepare_site(cfg: Any, extraction: Any, *, extract: bool = True) -> dict[str, int]:
    """Extract missing features (when configured) and check the site's datasets open."""
    if extract and cfg.federation.extract_missing and cfg.data.slides_dir is not None and extraction is not None:
        try:
            from tdamil.wsi.extract import extract_site  # noqa: PLC0415
        except ImportError:
            logger.warning("Feature extraction is not available in this installation; using cached features only.")
        else:
            summary = extract_site(cfg.data, extraction)
            logger.info("Feature extraction: %s", summary)
    from tdamil.federation.data import split_datasets  # noqa: PLC0415

    fed = cfg.federation
    parts = split_datasets(cfg.data, val_fraction=fed.val_fraction, test_fraction=fed.test_fraction,
                           seed=fed.split_seed)
    sizes = {name: len(ds) for name, ds in parts.items()}
    if sizes["train"] == 0:
        raise ConfigError(f"site {cfg.site}: no training slides in {cfg.data.manifest}. Check its split column.")
    labels = set(parts["train"].labels)
    if len(labels) < 2:
        logger.warning("Site %s: the training slides hold one class only (%s); the site still trains, but its "
                       "validation AUROC is undefined (reported as NaN).", cfg.site, labels)
    return sizes


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tdamil-client", description=__doc__.split("\n\n")[0])
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--site", help="site name: reads <configs-dir>/<site>.yaml")
    who.add_argument("--config", type=Path, help="path of the site YAML")
    parser.add_argument("--configs-dir", type=Path, default=Path("configs/sites"), help="default: %(default)s")
    parser.add_argument("--insecure", action="store_true", help="connect WITHOUT TLS (local tests only)")
    parser.add_argument("--no-extract", action="store_true", help="do not extract missing features")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="Flower's working folder at the site (default: ~/.tdamil/sites/<site>)")
    parser.add_argument("--check", action="store_true", help="validate config, data and the TLS link to the coordinator (when it is up), then exit")
    parser.add_argument("--once", action="store_true", help="exit when the SuperNode exits (default: reconnect)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    from tdamil.logs import setup_logging  # noqa: PLC0415

    setup_logging(args.verbose)
    from tdamil.client.config import load_site_config, site_config_path  # noqa: PLC0415
    from tdamil.security.preflight import SecurityCheckError, check_site_security  # noqa: PLC0415

    path = args.config if args.config is not None else site_config_path(args.site, args.configs_dir)
    try:
        cfg, extraction = load_site_config(path)
        if args.site and cfg.site != args.site:
            raise ConfigError(f"{path}: the file is for site '{cfg.site}', not '{args.site}'.")
        if not args.insecure and cfg.tls.ca_cert is None:
            raise ConfigError(f"{path}: no tls.ca_cert. The site refuses to send its model over an unencrypted link. "
                              "Set tls.ca_cert to the consortium CA from the coordinator, or pass --insecure for a "
                              "local test.")
        check_site_security(cfg.tls, cfg.auth, args.insecure, source=str(path))  # CA file, site key
        if not args.insecure:
            check_connection(cfg.federation.superlink, cfg.tls.ca_cert)
        sizes = prepare_site(cfg, extraction, extract=not args.no_extract)
    except (ConfigError, ValueError, SecurityCheckError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    logger.info("Site %s: %s slides (train/val/test); coordinator %s.", cfg.site,
                "/".join(str(sizes[k]) for k in ("train", "val", "test")), cfg.federation.superlink)
    if args.check:
        print(f"{path}: OK")
        return 0
    state = args.state_dir or Path.home() / ".tdamil" / "sites" / cfg.site
    threads = getattr(cfg.federation, "cpu_threads", None)
    return run_supernode(supernode_command(cfg, path, insecure=args.insecure), flwr_env=flower_env(state, threads=threads),
                         restart=not args.once)


def run_supernode(cmd: list[str], flwr_env: dict[str, str], *, restart: bool = True,
                  backoff: tuple[float, float] = (2.0, 30.0), hang_grace: float = 10.0) -> int:
    """Run the SuperNode in the foreground; restart it when it stops (coordinator restarted, network
    lost) until Ctrl-C / SIGTERM. Returns the exit code (130 when interrupted).

    Flower 1.42's SuperNode may log "Giving up reconnection" or "SuperNode terminated gracefully" and
    then not exit (its runtime server and SuperExec keep it alive); its output is followed here and
    such a process is killed ``hang_grace`` seconds later, then restarted.
    """

    def _stop(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    delay = backoff[0]
    proc: Optional[subprocess.Popen] = None
    try:
        while True:
            started = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=flwr_env, text=True,
                                    start_new_session=True, preexec_fn=_die_with_parent)
            ended = threading.Event()
            threading.Thread(target=_follow, args=(proc, ended), daemon=True).start()
            ended_at: Optional[float] = None
            while proc.poll() is None:
                if ended.is_set():
                    ended_at = ended_at or time.monotonic()
                    if time.monotonic() - ended_at > hang_grace:
                        break
                time.sleep(0.5)
            _kill_group(proc)
            code = proc.returncode
            if not restart:
                return int(code or 0)
            if time.monotonic() - started > 60:
                delay = backoff[0]
            logger.warning("The SuperNode stopped (exit code %s): the coordinator may be restarting or unreachable. "
                           "Reconnecting in %.0f s (Ctrl-C to quit).", code, delay)
            time.sleep(delay)
            delay = min(backoff[1], delay * 2)
    except KeyboardInterrupt:
        logger.info("Stopping the SuperNode.")
        if proc is not None:
            _kill_group(proc, sig=signal.SIGTERM)
        return 130


# Lines after which a Flower 1.42 SuperNode is finished but may not exit by itself.
_ENDED_MARKERS = ("SuperNode terminated", "Giving up reconnection")


def _follow(proc: subprocess.Popen, ended: threading.Event) -> None:
    """Echo the SuperNode's output; flag its "terminated" line."""
    assert proc.stdout is not None
    from tdamil.logs import reformat_flower_line  # noqa: PLC0415

    for line in proc.stdout:
        sys.stdout.write(reformat_flower_line(line, source="flower-supernode"))
        sys.stdout.flush()
        if any(marker in line for marker in _ENDED_MARKERS):
            ended.set()


def _kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace: float = 5.0) -> None:
    """Stop the SuperNode and its children (SIGTERM first when asked, then SIGKILL)."""
    import os  # noqa: PLC0415

    if sig != signal.SIGKILL and proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
