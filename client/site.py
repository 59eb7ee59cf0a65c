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
import socket
import sys
from pathlib import Path
from typing import Any, Optional

from tdamil.config import ConfigError
from tdamil.federation.processes import flower_env
from tdamil.net import split_host_port
from tdamil.federation.supernode import SuperNodeRejected, supervise_supernode
from tdamil.federation.watchdog import start_watchdog

logger = logging.getLogger(__name__)

__all__ = ["supernode_command", "check_connection", "prepare_site", "check_feature_files", "main"]


def check_connection(address: str, ca_cert: Path | str, timeout: float = 5.0) -> bool:
    """TLS handshake with the coordinator, verified against ``ca_cert``, before the SuperNode starts.

    Returns True when verified; False (with a warning) when the coordinator cannot be reached yet:
    refused, timed out or unresolvable, or a proxy in front of it accepts and closes at once (its
    coordinator is not up yet), which the SuperNode's own retries cover. Raises
    :class:`~tdamil.security.preflight.SecurityCheckError` for a TLS problem (certificate from
    another CA, plaintext server, name not covered, expired), which retrying would never fix.
    """
    from tdamil.security.preflight import CoordinatorNotReady, probe_tls  # noqa: PLC0415

    host, port = split_host_port(address, "federation.superlink")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        logger.warning("The coordinator at %s cannot be reached yet (%s); the SuperNode will keep trying. If this "
                       "lasts, check federation.superlink, that the coordinator runs, and that the firewall allows "
                       "outbound TCP to port %d.", address, exc.__class__.__name__ if not str(exc) else exc, port)
        return False
    try:
        version = probe_tls(address, ca_cert, timeout=timeout)
    except CoordinatorNotReady as exc:
        logger.warning("%s The SuperNode will keep trying; if this lasts, check that the coordinator runs (behind "
                       "its proxy, where there is one).", exc)
        return False
    logger.info("TLS link to the coordinator %s verified (%s, CA %s).", address, version, ca_cert)
    return True


def supernode_command(cfg: Any, config_path: Path, *, insecure: bool = False) -> list[str]:
    """The ``flower-supernode`` command line for a validated site config."""
    fed = cfg.federation
    node_config = f'site="{cfg.site}" config="{Path(config_path).resolve()}"'
    # Flower's flower-supernode, run with a shorter idle poll (tdamil.client.supernode_poll)
    cmd = [sys.executable, "-m", "tdamil.client.supernode_poll", "--poll-interval", f"{fed.poll_interval_s:g}",
           "--superlink", fed.superlink, "--host", "127.0.0.1", "--port", str(fed.runtime_port),
           "--node-config", node_config]
    if fed.warm_start:  # the ClientApps come from tdamil.client.warm_start, started beside it
        cmd += ["--isolation", "process"]
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


def prepare_site(cfg: Any, extraction: Any, *, extract: bool = True) -> dict[str, Any]:
    """Extract missing features (when configured) and open the site's datasets.

    Returns ``{"train": dataset, "val": ..., "test": ...}``.
    """
    if extract and cfg.federation.extract_missing and cfg.data.slides_dir is not None and extraction is not None:
        from tdamil.wsi.extract import extract_site  # noqa: PLC0415

        summary = extract_site(cfg.data, extraction)
        if not summary.ok:  # each failed slide with its reason and fix, under the table
            summary.print()
        logger.info("Feature extraction: %s", summary.table().caption)
    from tdamil.federation.data import split_datasets  # noqa: PLC0415

    fed = cfg.federation
    parts = split_datasets(cfg.data, val_fraction=fed.val_fraction, test_fraction=fed.test_fraction,
                           seed=fed.split_seed)
    if len(parts["train"]) == 0:
        raise ConfigError(f"site {cfg.site}: no training slides in {cfg.data.manifest}. Check its split column.")
    labels = set(parts["train"].labels)
    if len(labels) < 2:
        logger.warning("Site %s: the training slides hold one class only (%s); the site still trains, but its "
                       "validation AUROC is undefined (reported as NaN).", cfg.site, labels)
    return parts


def check_feature_files(parts: dict[str, Any]) -> int:
    """Open every feature file the site will use: readable, finite, one feature dimension across all
    files. Returns that dimension; raises ValueError naming the file and the fix (a truncated h5, an
    encoder mix-up) so it is found now, not in the middle of a round."""
    dim: Optional[int] = None
    first: Optional[Path] = None
    for ds in parts.values():
        for index in range(len(ds)):
            bag = ds[index]  # the dataset's reader checks the file opens and holds finite 2-D features
            path = ds.path(bag.slide_id)
            width = int(bag.features.shape[-1])
            if dim is None:
                dim, first = width, path
            elif width != dim:
                raise ValueError(f"{path}: {width} features per patch, but {first} has {dim}: the files were made "
                                 "by different encoders. Re-extract this site's slides with one encoder "
                                 "(tdamil-extract) or point data.features_dir at the right cache.")
    return int(dim or 0)


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
    parser.add_argument("--check", action="store_true",
                        help="validate config, keys, every feature file and the TLS link to the coordinator (when "
                             "it is up), then exit")
    parser.add_argument("--once", action="store_true", help="exit when the SuperNode exits (default: reconnect)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    from tdamil.logs import setup_logging  # noqa: PLC0415

    setup_logging(args.verbose)
    from tdamil.client.config import load_site_config, site_config_path  # noqa: PLC0415
    from tdamil.security.preflight import SecurityCheckError, check_site_security  # noqa: PLC0415
    from tdamil.wsi.extract_config import ExtractionError  # noqa: PLC0415 - no slides folder, nothing to extract

    path = args.config if args.config is not None else site_config_path(args.site, args.configs_dir)
    try:
        cfg, extraction = load_site_config(path)
        if args.site and cfg.site != args.site:
            raise ConfigError(f"{path}: the file is for site '{cfg.site}', not '{args.site}'.")
        check_site_security(cfg.tls, cfg.auth, args.insecure, source=str(path))  # the site's one precondition check
        if not args.insecure:
            check_connection(cfg.federation.superlink, cfg.tls.ca_cert)
        parts = prepare_site(cfg, extraction, extract=not args.no_extract)
        if cfg.contract is not None:  # the contract the site expects to join: every file's attrs, before joining
            from tdamil.data.contract import check_features, feature_paths, site_origin  # noqa: PLC0415

            check_features(feature_paths(parts.values()), cfg.contract, site=cfg.site,
                           allow_unlabelled_attrs=cfg.accept_unlabelled_features, origin=site_origin(path))
        dim = check_feature_files(parts) if args.check else None
    except (ConfigError, ValueError, SecurityCheckError, ExtractionError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    logger.info("Site %s: %s slides (train/val/test); coordinator %s.", cfg.site,
                "/".join(str(len(parts[k])) for k in ("train", "val", "test")), cfg.federation.superlink)
    if args.check:
        fits = f"; they fit the contract: {cfg.contract.describe()}" if cfg.contract is not None else ""
        print(f"{path}: OK (every feature file opens, {dim} features per patch{fits})")
        return 0
    state = args.state_dir or Path.home() / ".tdamil" / "sites" / cfg.site
    watchdog = start_watchdog()  # noqa: F841 - Flower's clientapp processes go when this process dies
    cmd = supernode_command(cfg, path, insecure=args.insecure)
    try:
        companion = None
        if cfg.federation.warm_start:
            from tdamil.client.warm_start import warm_superexec_command  # noqa: PLC0415

            port = cfg.federation.runtime_port
            companion = lambda supernode_pid: warm_superexec_command(port, supernode_pid)  # noqa: E731
        return supervise_supernode(cmd, flower_env(state, threads=cfg.federation.cpu_threads), restart=not args.once,
                                   companion=companion)
    except SuperNodeRejected:
        print(f"error: {_rejected_message(cfg)}", file=sys.stderr)
        return 3
    except OSError as exc:  # flower-supernode missing or not executable
        print(f"error: cannot start flower-supernode ({_one_line(exc)}); reinstall tdamil-fl in this environment.",
              file=sys.stderr)
        return 2


def _rejected_message(cfg: Any) -> str:
    key = cfg.auth.private_key
    if key is None:
        return (f"the coordinator at {cfg.federation.superlink} accepts registered sites only and this site has no "
                "key. Create one with `tdamil-certs issue --site " + cfg.site + " --ca <ca.pem> --out <folder>`, set "
                f"auth.private_key, and send {cfg.site}.pub to the coordinator to register it.")
    pub = Path(key).with_suffix(".pub")
    return (f"the coordinator at {cfg.federation.superlink} refused this site's key {key}: it is not registered "
            f"there. Send {pub} to the coordinator and ask them to register it (put it in certs/site_keys/ and "
            "restart flwr-server), then start tdamil-client again.")


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, without Python's wrappers."""
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
