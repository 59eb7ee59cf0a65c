"""``tdamil-client --site site_a``: join the federation from a hospital.

1. reads and validates ``configs/sites/<site>.yaml`` (or ``--config``) before anything starts;
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
import sys
from pathlib import Path
from typing import Any, Optional

from tdamil.config import ConfigError
from tdamil.federation.processes import ManagedProcess, flower_bin, flower_env

logger = logging.getLogger(__name__)

__all__ = ["supernode_command", "prepare_site", "main"]


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
    parser.add_argument("--check", action="store_true", help="validate config and data, then exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from tdamil.client.config import load_site_config, site_config_path  # noqa: PLC0415

    path = args.config if args.config is not None else site_config_path(args.site, args.configs_dir)
    try:
        cfg, extraction = load_site_config(path)
        if args.site and cfg.site != args.site:
            raise ConfigError(f"{path}: the file is for site '{cfg.site}', not '{args.site}'.")
        if not args.insecure and cfg.tls.ca_cert is None:
            raise ConfigError(f"{path}: no tls.ca_cert. The site refuses to send its model over an unencrypted link. "
                              "Set tls.ca_cert to the consortium CA from the coordinator, or pass --insecure for a "
                              "local test.")
        sizes = prepare_site(cfg, extraction, extract=not args.no_extract)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logger.info("Site %s: %s slides (train/val/test); coordinator %s.", cfg.site,
                "/".join(str(sizes[k]) for k in ("train", "val", "test")), cfg.federation.superlink)
    if args.check:
        print(f"{path}: OK")
        return 0
    if args.insecure:
        logger.warning("--insecure: NO TLS to the coordinator. Use this only for a local test.")
    state = args.state_dir or Path.home() / ".tdamil" / "sites" / cfg.site
    threads = getattr(cfg.federation, "cpu_threads", None)
    proc = ManagedProcess("flower-supernode", supernode_command(cfg, path, insecure=args.insecure), None,
                          env=flower_env(state, threads=threads))

    def _stop(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        code = proc.proc.wait()
    except KeyboardInterrupt:
        logger.info("Stopping the SuperNode.")
        proc.stop()
        return 130
    proc.stop()
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
