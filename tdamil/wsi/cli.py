"""``tdamil-extract``: extract a site's patch features before (or without) federated training.

    tdamil-extract --config configs/sites/site_a.yaml
    tdamil-extract --site site_a                 # = --config configs/sites/site_a.yaml
    tdamil-extract --site site_a --slides S1 S2 --device cuda --overwrite
    tdamil-extract --site site_a --device cuda:0 &  tdamil-extract --site site_a --device cuda:1 &
    tdamil-extract --site site_a --shard 0/4        # this machine takes every 4th slide from the 1st

Only the ``site``, ``data`` and ``extraction`` sections of the site YAML are read and validated
(the other sections belong to the training client). No labels are needed: the manifest needs only
a ``slide_id`` column, and without ``data.manifest`` every slide file in ``data.slides_dir`` is
extracted. Several processes may run at once on one features folder (one per GPU, or shards on
several machines): each slide is claimed by one process; the others report it as busy.

Exit status: 0 all slides done, skipped or busy in another process, 1 some slides failed (listed
with reason and fix), 2 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from tdamil.config import ConfigError, from_dict, load_yaml
from tdamil.logs import one_line, setup_logging

logger = logging.getLogger("tdamil.wsi.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdamil-extract", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="site YAML (sections site, data, extraction)")
    src.add_argument("--site", help="site name: reads configs/sites/<site>.yaml under --configs-dir")
    p.add_argument("--configs-dir", type=Path, default=Path("configs/sites"), help="where --site looks (default configs/sites)")
    p.add_argument("--slides", nargs="+", metavar="SLIDE_ID", help="only these slides (default: the whole manifest)")
    p.add_argument("--device", help="override extraction.device (auto, cpu, cuda, cuda:1); run one process per GPU")
    p.add_argument("--shard", type=_shard, metavar="I/N", help="only every N-th slide starting at the I-th (0-based)")
    p.add_argument("--batch-size", type=int, help="override extraction.batch_size")
    p.add_argument("--num-workers", type=int, help="override extraction.num_workers")
    p.add_argument("--overwrite", action="store_true", help="re-extract slides already done")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not I/N, e.g. 0/2") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"'{text}': need 0 <= I < N, e.g. 0/2 and 1/2")
    return i, n


#: The top-level sections of a site YAML (``tdamil.client.config.SiteConfig``, which the apps own;
#: tests/test_config.py keeps the two equal). The commands here read three of them and reject
#: misspelled ones, so that ``extration:`` is an error instead of a silently ignored section.
SITE_SECTIONS = ("site", "data", "extraction", "contract", "accept_unlabelled_features", "train", "federation", "tls",
                 "auth", "privacy")


def load_extraction_sections(path: Path, overrides: Optional[dict] = None, *, extraction_required: bool = True):
    """``(site, DataConfig, ExtractionConfig)`` from a site YAML; the other sections are left to
    the training client (their names are checked, their values are not).

    ``data.manifest`` may be left out (``DataConfig.manifest`` is then None): extraction then
    takes every slide file in ``data.slides_dir``. ``extraction_required=False`` (prediction, which
    extracts only missing features) gives None for the ``extraction`` section when it is absent.
    """
    from tdamil.config import check_keys
    from tdamil.data.config import DataConfig

    from .extract import ExtractionConfig

    raw = load_yaml(path)
    base = path.resolve().parent
    check_keys(raw, SITE_SECTIONS, str(path))
    site = raw.get("site")
    if not isinstance(site, str) or not site:
        raise ConfigError(f"{path}: 'site' is required: the site's name as text, e.g. site: site_a.")
    if "data" not in raw:
        raise ConfigError(f"{path}: 'data' is required (manifest, features_dir, slides_dir). Add the section.")
    data_raw = raw["data"] or {}
    if not isinstance(data_raw, dict):
        raise ConfigError(f"{path}: 'data' must be a mapping (key: value lines), got {type(data_raw).__name__}.")
    check_keys(data_raw, DataConfig, str(path), "data")  # a misspelled key is named before what it leaves missing
    data_raw = dict(data_raw)
    folder_only = "manifest" not in data_raw
    if folder_only:
        if "slides_dir" not in data_raw:
            raise ConfigError(f"{path}: data needs a manifest (a CSV with a slide_id column) or a slides_dir "
                              "(every slide file in it is used). Add one of them.")
        data_raw["manifest"] = "."  # validated as a path, then dropped below
    data_cfg = from_dict(DataConfig, data_raw, source=f"{path}: data", base_dir=base)
    if folder_only:
        data_cfg.manifest = None  # type: ignore[assignment]
    if raw.get("extraction") is None and not extraction_required and not overrides:
        return site, data_cfg, None
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
        summary = extract_site(data_cfg, ext_cfg, slide_ids=args.slides, shard=args.shard)
    except (ConfigError, ValueError, RuntimeError) as exc:  # config, manifest, encoder, extraction set-up
        print(f"tdamil-extract: error: {one_line(exc)}", file=sys.stderr)  # once: not logged as well
        return 2
    summary.from_folder = data_cfg.manifest is None
    summary.print()
    return 0 if summary.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
