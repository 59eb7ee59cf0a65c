"""``tdamil-extract``: extract a site's patch features before (or without) federated training.

    tdamil-extract --config configs/sites/site_a.yaml
    tdamil-extract --site site_a                 # = --config configs/sites/site_a.yaml
    tdamil-extract --site site_a --slides S1 S2 --device cuda --overwrite

Only the ``site``, ``data`` and ``extraction`` sections of the site YAML are read and validated
(the other sections belong to the training client). Exit status: 0 all slides done or skipped,
1 some slides failed (listed with reason and fix), 2 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from tdamil.config import ConfigError, from_dict, load_yaml
from tdamil.logs import setup_logging

logger = logging.getLogger("tdamil.wsi.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdamil-extract", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="site YAML (sections site, data, extraction)")
    src.add_argument("--site", help="site name: reads configs/sites/<site>.yaml under --configs-dir")
    p.add_argument("--configs-dir", type=Path, default=Path("configs/sites"), help="where --site looks (default configs/sites)")
    p.add_argument("--slides", nargs="+", metavar="SLIDE_ID", help="only these slides (default: the whole manifest)")
    p.add_argument("--device", help="override extraction.device (auto, cpu, cuda, cuda:1)")
    p.add_argument("--batch-size", type=int, help="override extraction.batch_size")
    p.add_argument("--num-workers", type=int, help="override extraction.num_workers")
    p.add_argument("--overwrite", action="store_true", help="re-extract slides already done")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def load_extraction_sections(path: Path, overrides: Optional[dict] = None):
    """``(site, DataConfig, ExtractionConfig)`` from a site YAML; other sections are ignored."""
    from tdamil.data.config import DataConfig

    from .extract import ExtractionConfig

    raw = load_yaml(path)
    base = path.resolve().parent
    site = raw.get("site")
    if not isinstance(site, str) or not site:
        raise ConfigError(f"{path}: 'site' is required: the site's name as text, e.g. site: site_a.")
    if "data" not in raw:
        raise ConfigError(f"{path}: 'data' is required (manifest, features_dir, slides_dir). Add the section.")
    data_cfg = from_dict(DataConfig, raw["data"] or {}, source=f"{path}: data", base_dir=base)
    ext_raw = dict(raw.get("extraction") or {})
    ext_raw.update(overrides or {})
    ext_cfg = from_dict(ExtractionConfig, ext_raw, source=f"{path}: extraction", base_dir=base)
    return site, data_cfg, ext_cfg


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(level=args.log_level)
    path = args.config if args.config is not None else args.configs_dir / f"{args.site}.yaml"
    overrides = {k: v for k, v in (("device", args.device), ("batch_size", args.batch_size),
                                   ("num_workers", args.num_workers)) if v is not None}
    if args.overwrite:
        overrides["overwrite"] = True
    if args.no_progress:
        overrides["progress"] = False
    try:
        site, data_cfg, ext_cfg = load_extraction_sections(path, overrides)
        if args.site is not None and site != args.site:
            raise ConfigError(f"{path}: says site: {site}, but --site {args.site} was given; fix one of them.")
        from .extract import extract_site

        logger.info("site %s: extracting with %s into %s", site, ext_cfg.encoder, data_cfg.features_dir)
        summary = extract_site(data_cfg, ext_cfg, slide_ids=args.slides)
    except (ConfigError, ValueError, RuntimeError) as exc:  # config, manifest, encoder, extraction set-up
        logger.error("%s", exc)
        print(f"tdamil-extract: error: {exc}", file=sys.stderr)
        return 2
    summary.print()
    return 0 if summary.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
