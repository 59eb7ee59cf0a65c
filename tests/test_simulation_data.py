"""Virtual sites read their bags from the feature files, one file per access, and what a Ray actor
receives (the ClientApp's data provider, a site's datasets) holds paths, never feature arrays."""

from __future__ import annotations

import pickle

import numpy as np

from tdamil.data.bags import ConcatBagDataset
from tdamil.data.h5 import write_features
from tdamil.simulation.config import DataConfig, ManifestSitesConfig, SimConfig, SimDataConfig
from tdamil.simulation.sites import SimSiteProvider, build_sites

PATCHES, DIM = 2000, 1024  # 8 MB of float32 per slide


def _cohorts(root, per_cohort: int = 4):
    """Three cohorts of feature files (crc and stad become sites, ucec is held out)."""
    feats = root / "features"
    feats.mkdir()
    rng = np.random.default_rng(0)
    lines = ["slide_id,patient_id,label,cohort,split"]
    for cohort in ("crc", "stad", "ucec"):
        for i in range(per_cohort):
            sid = f"{cohort}_{i}"
            write_features(feats / f"{sid}.h5", rng.standard_normal((PATCHES, DIM), dtype=np.float32),
                           np.zeros((PATCHES, 2), dtype=np.int64))
            split = ("train", "train", "val", "test")[i % 4]
            lines.append(f"{sid},{sid},{'pos' if i % 2 else 'neg'},{cohort},{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    data = DataConfig(manifest=root / "manifest.csv", features_dir=feats)
    return SimConfig(data=SimDataConfig(source="manifest", manifest=ManifestSitesConfig(data=data, held_out=["ucec"])))


def test_site_data_sent_to_actors_holds_paths_not_arrays(tmp_path):
    cfg = _cohorts(tmp_path)
    sims = build_sites(cfg)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "features").glob("*.h5"))
    assert on_disk > 60e6
    for site in sims.sites.values():
        for ds in (site.train, site.val, site.test):
            if ds is not None and len(ds):
                ds[0]  # reading a bag must not keep it
        assert len(pickle.dumps(site)) < 20_000, "a site's data object carries arrays"
    provider = SimSiteProvider(cfg, sims)
    assert len(pickle.dumps(provider)) < 20_000  # what Ray ships to each actor: the config only
    assert pickle.loads(pickle.dumps(provider))._sites is None


def test_each_access_reads_the_file_again(tmp_path):
    cfg = _cohorts(tmp_path)
    train = build_sites(cfg).sites["crc"].train
    first = train[0]
    path = tmp_path / "features" / f"{first.slide_id}.h5"
    write_features(path, np.full((3, DIM), 7.0, dtype=np.float32), np.zeros((3, 2), dtype=np.int64))
    again = train[0]
    assert again.features.shape == (3, DIM) and float(again.features[0, 0]) == 7.0  # no cached copy


def test_pooled_dataset_is_as_lazy_as_its_parts(tmp_path):
    sims = build_sites(_cohorts(tmp_path))
    pooled = ConcatBagDataset([s.train for s in sims.sites.values()])
    assert len(pooled) == sum(len(s.train) for s in sims.sites.values())
    assert pooled.slide_ids == [i for s in sims.sites.values() for i in s.train.slide_ids]
    assert pooled[len(pooled) - 1].slide_id == pooled.slide_ids[-1]
    assert len(pickle.dumps(pooled)) < 20_000
