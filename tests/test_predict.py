"""tdamil-predict: a trained checkpoint (federated or centralised) applied to a site's slides gives
per-slide predictions, metrics and relevance heatmaps over the real slide's thumbnail; new slides
need no label and no features yet."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from tdamil.checkpoint import save_checkpoint
from tdamil.data.config import DataConfig
from tdamil.federation.checkpoint import CheckpointStore
from tdamil.federation.task import ModelSpec, model_to_arrays
from tdamil.models import create_model
from tdamil.predict import PredictError, decision_threshold, load_trained_model, main, predict_site
from tdamil.wsi.extract import ExtractionConfig, extract_site

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"
MODEL = {"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 4}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    """A site with the real H&E slide twice (two patients), features from the seeded tiny encoder."""
    root = tmp_path_factory.mktemp("site")
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(CMU, slides / "s1.svs")
    shutil.copy(CMU, slides / "s2.svs")
    (root / "manifest.csv").write_text("slide_id,patient_id,label\ns1,p1,MSS\ns2,p2,MSI\n")
    data = DataConfig(manifest=root / "manifest.csv", features_dir=root / "features", slides_dir=slides)
    summary = extract_site(data, ExtractionConfig(encoder="tiny", batch_size=8, num_workers=0, progress=False))
    assert summary.ok
    cfg = root / "site.yaml"
    cfg.write_text(yaml.safe_dump({
        "site": "site_x",
        "data": {"manifest": "manifest.csv", "features_dir": "features", "slides_dir": "slides"},
        "extraction": {"encoder": "tiny"},
    }))
    return {"root": root, "data": data, "config": cfg}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(dict(MODEL), in_dim=64, num_classes=2)


def test_training_checkpoint_predicts_with_heatmaps(site, tmp_path: Path) -> None:
    model = _model()
    ckpt = save_checkpoint(tmp_path / "run" / "best.pt", model, epoch=3)
    out = tmp_path / "preds"
    assert main(["--checkpoint", str(ckpt), "--config", str(site["config"]), "--out", str(out)]) == 0

    table = pd.read_csv(out / "predictions.csv")
    assert list(table["slide_id"]) == ["s1", "s2"]
    assert list(table["label"]) == ["MSS", "MSI"]
    probs = table[["prob_MSI", "prob_MSS"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # every slide's map is checked (deletion of its top patches vs random ones) where it is predicted positive
    for i, check in enumerate(table["map_check"]):
        assert check in ("faithful", "NOT faithful", "n/a (predicted negative)"), check
        assert (check.startswith("n/a")) == np.isnan(table.loc[i, "map_deletion_gap"])
    # The same model run directly on the cached features gives the same probabilities.
    from tdamil.data.h5 import read_features

    with torch.no_grad():
        feats = torch.from_numpy(read_features(site["data"].features_dir / "s1.h5").features)
        direct = model.eval()(feats.unsqueeze(0)).logits.softmax(-1)[0].numpy()
    np.testing.assert_allclose(table.loc[0, ["prob_MSI", "prob_MSS"]].to_numpy(dtype=float), direct, rtol=1e-4)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 2 and set(metrics) >= {"auroc", "balanced_accuracy", "f1", "auroc_ci_low", "f1_ci_high"}
    assert metrics["auroc_ci_low"] <= metrics["auroc"] <= metrics["auroc_ci_high"]
    for sid in ("s1", "s2"):
        png = out / "heatmaps" / f"{sid}.png"
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 300
        qupath = json.loads((out / "qupath" / f"{sid}.geojson").read_text())  # QuPath objects of the slide
        tiles = [f for f in qupath["features"] if f["properties"]["objectType"] == "tile"]
        assert tiles and {"patch score", "P(MSI)", "P(MSS)"} <= set(tiles[0]["properties"]["measurements"])


def test_federated_checkpoint_loads_the_global_weights(site, tmp_path: Path) -> None:
    model = _model(seed=1)
    spec = ModelSpec(model=dict(MODEL), in_dim=64, num_classes=2)
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(4, model_to_arrays(model), spec.to_json(), metric_value=0.7)
    trained = load_trained_model(store.last_path)
    assert trained.origin == "federated round 4"
    for key, value in model.state_dict().items():
        assert torch.equal(trained.model.state_dict()[key], value), key
    outcome = predict_site(trained, site["data"], tmp_path / "out", heatmaps=False)
    assert len(outcome.table) == 2 and not outcome.not_predicted and not (tmp_path / "out" / "heatmaps").exists()


def test_mismatched_features_and_bad_checkpoints_are_clear_errors(site, tmp_path: Path) -> None:
    wide = create_model(dict(MODEL), in_dim=1024, num_classes=2)
    ckpt = save_checkpoint(tmp_path / "wide.pt", wide)
    with pytest.raises(PredictError, match="features have 64 dims but the model expects 1024"):
        predict_site(load_trained_model(ckpt), site["data"], tmp_path / "o")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PredictError, match="bad.pt"):
        load_trained_model(bad)
    with pytest.raises(PredictError, match="not found"):
        load_trained_model(tmp_path / "missing.pt")
    three = save_checkpoint(tmp_path / "three.pt", create_model(dict(MODEL), in_dim=64, num_classes=3))
    with pytest.raises(PredictError, match="2 classes .* but the model predicts 3"):
        predict_site(load_trained_model(three), site["data"], tmp_path / "o")


def _assert_pictures(out: Path, slide_ids: list[str]) -> None:
    for sid in slide_ids:
        with Image.open(out / "heatmaps" / f"{sid}.png") as im:
            assert im.size[0] > 300 and im.size[1] > 300
        qupath = json.loads((out / "qupath" / f"{sid}.geojson").read_text())
        assert any(f["properties"]["objectType"] == "tile" for f in qupath["features"])


def test_a_folder_of_unlabelled_slides_is_extracted_and_predicted(tmp_path: Path, capsys) -> None:
    """The normal case for new slides: a slides folder, no manifest, no labels, no features yet."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("new_1", "new_2"):
        shutil.copy(CMU, slides / f"{name}.svs")
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({
        "site": "site_x",
        "data": {"features_dir": "features", "slides_dir": "slides", "classes": ["MSS", "MSI"]},
        "extraction": {"encoder": "tiny", "batch_size": 8, "num_workers": 0, "progress": False},
    }))
    ckpt = save_checkpoint(tmp_path / "run" / "best.pt", _model())
    out = tmp_path / "preds"
    assert main(["--checkpoint", str(ckpt), "--config", str(cfg), "--out", str(out)]) == 0
    assert "Traceback" not in capsys.readouterr().err

    assert sorted(p.name for p in (tmp_path / "features").glob("*.h5")) == ["new_1.h5", "new_2.h5"]
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["slide_id"]) == ["new_1", "new_2"] and "label" not in table.columns
    assert set(table["prediction"]) <= {"MSS", "MSI"}
    expected = np.where(table["prob_MSI"] >= 0.5, "MSI", "MSS")
    assert list(table["prediction"]) == list(expected)
    assert (table["threshold"] == 0.5).all() and table["threshold_source"].str.contains("no validation").all()
    assert not (out / "metrics.json").exists()  # metrics only where labels exist
    _assert_pictures(out, ["new_1", "new_2"])


def test_a_slide_id_only_manifest_predicts_with_a_calibrated_threshold(site, tmp_path: Path) -> None:
    root = site["root"]
    (root / "ids.csv").write_text("slide_id\ns2\ns1\n")
    cfg = tmp_path / "site.yaml"  # no extraction section: the features are cached already
    cfg.write_text(yaml.safe_dump({"site": "site_x", "data": {
        "manifest": str(root / "ids.csv"), "features_dir": str(root / "features"), "slides_dir": str(root / "slides")}}))
    val = {"labels": [0, 0, 1, 1], "probs": [0.1, 0.3, 0.35, 0.9]}
    ckpt = save_checkpoint(tmp_path / "run" / "best.pt", _model(), epoch=2, val_predictions=val)
    out = tmp_path / "preds"
    assert main(["--checkpoint", str(ckpt), "--config", str(cfg), "--out", str(out), "--no-heatmaps"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table["slide_id"]) == ["s2", "s1"] and list(table.columns[:4]) == ["slide_id", "prediction", "prob_0", "prob_1"]
    assert table["threshold"].iloc[0] == pytest.approx(0.35)
    assert "calibrated on the checkpoint's 4 validation slides" in table["threshold_source"].iloc[0]
    assert list(table["prediction"]) == [1 if p >= 0.35 else 0 for p in table["prob_1"]]
    assert not (out / "metrics.json").exists()


def test_decision_threshold_sources() -> None:
    assert decision_threshold({"threshold": 0.42}, 2) == (0.42, "the checkpoint's threshold")
    assert decision_threshold({"extra": {"val_predictions": {"labels": [1, 1], "probs": [0.2, 0.9]}}}, 2)[0] == 0.5
    assert decision_threshold({}, 3)[0] is None
    t, source = decision_threshold({"val_predictions": {"labels": [0, 1, 0, 1], "probs": [[0.9, 0.1], [0.2, 0.8],
                                                                                          [0.4, 0.6], [0.3, 0.7]]}}, 2)
    assert t == pytest.approx(0.7) and "Youden" in source


def test_expected_errors_are_one_line_naming_the_file_and_the_fix(site, tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tmp_path / "best.pt", _model())
    slides_only = tmp_path / "no_extraction.yaml"  # slides without features and nothing to extract them with
    slides_only.write_text(yaml.safe_dump({"site": "site_x", "data": {
        "features_dir": str(tmp_path / "empty"), "slides_dir": str(site["root"] / "slides")}}))
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump({"site": "site_x", "data": {
        "slide_dir": str(site["root"] / "slides"), "features_dir": "f"}}))
    for cfg, expected in ((slides_only, "no features for 2 of 2 slides (s1, s2). Add an extraction section"),
                          (typo, "'data.slide_dir' is not a known setting. Did you mean 'slides_dir'?")):
        assert main(["--checkpoint", str(ckpt), "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and expected in err and str(tmp_path) in err  # names the file
        assert err.count("\n") == 1 and "Traceback" not in err


def test_a_slide_that_cannot_be_extracted_is_listed_with_a_fix_for_a_slides_folder(site, tmp_path: Path, capsys) -> None:
    slides, features = tmp_path / "slides", tmp_path / "features"
    slides.mkdir()
    features.mkdir()
    shutil.copy(CMU, slides / "good.svs")
    shutil.copy(site["data"].features_dir / "s1.h5", features / "good.h5")  # extracted already
    (slides / "broken.svs").write_bytes(b"not a slide" * 100)
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({"site": "site_x", "data": {"features_dir": "features", "slides_dir": "slides"},
                                   "extraction": {"encoder": "tiny", "num_workers": 0, "progress": False}}))
    ckpt = save_checkpoint(tmp_path / "best.pt", _model())
    out = tmp_path / "preds"
    assert main(["--checkpoint", str(ckpt), "--config", str(cfg), "--out", str(out), "--no-heatmaps"]) == 1
    err = " ".join(capsys.readouterr().err.split())  # the summary wraps to the console's width
    assert "broken: " in err and "move its file out of data.slides_dir" in err and "manifest" not in err
    assert "Not predicted (no features): broken" in err and "Traceback" not in err
    assert list(pd.read_csv(out / "predictions.csv")["slide_id"]) == ["good"]
