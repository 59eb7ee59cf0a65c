"""Manifest CSV validation: every error names the CSV, the row and the fix."""

from pathlib import Path

import pytest

from tdamil.data.manifest import ManifestError, load_manifest, manifest_classes


def _csv(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "manifest.csv"
    p.write_text(text)
    return p


def test_valid_manifest_keeps_ids_as_text_and_indexes_labels(tmp_path):
    p = _csv(tmp_path, "slide_id,patient_id,label,site,slide_path\n001,P1,MSI,a,s/001.svs\n002,P1,MSS,a,/abs/002.svs\n003,P2,MSS,b,\n")
    df = load_manifest(p, classes=["MSS", "MSI"])
    assert df["slide_id"].tolist() == ["001", "002", "003"]  # leading zeros kept
    assert df["label_index"].tolist() == [1, 0, 0]
    assert manifest_classes(df) == ["MSS", "MSI"]
    assert "cohort" in df.columns  # 'site' accepted as synonym
    assert df["slide_path"].iloc[0] == str(tmp_path.resolve() / "s/001.svs")
    assert df["slide_path"].iloc[1] == "/abs/002.svs"


def test_default_classes_are_sorted_labels(tmp_path):
    df = load_manifest(_csv(tmp_path, "slide_id,patient_id,label\na,1,tumor\nb,2,normal\n"))
    assert manifest_classes(df) == ["normal", "tumor"]
    assert df["label_index"].tolist() == [1, 0]


def test_missing_column_names_file_and_columns(tmp_path):
    p = _csv(tmp_path, "slide_id,label\na,x\n")
    with pytest.raises(ManifestError, match=r"manifest\.csv.*missing required column.*patient_id"):
        load_manifest(p)


def test_duplicate_slide_id_names_rows(tmp_path):
    p = _csv(tmp_path, "slide_id,patient_id,label\na,1,x\nb,2,y\na,3,y\n")
    with pytest.raises(ManifestError, match=r"duplicate slide_id 'a' on rows 2, 4"):
        load_manifest(p)


def test_empty_label_names_row(tmp_path):
    p = _csv(tmp_path, "slide_id,patient_id,label\na,1,x\nb,2,\n")
    with pytest.raises(ManifestError, match=r"empty label on row\(s\) 3.*Fill in"):
        load_manifest(p)


def test_unknown_label_names_row_and_classes(tmp_path):
    p = _csv(tmp_path, "slide_id,patient_id,label\na,1,MSS\nb,2,MSI-H\n")
    with pytest.raises(ManifestError, match=r"unknown label 'MSI-H' on row\(s\) 3.*data\.classes"):
        load_manifest(p, classes=["MSS", "MSI"])


def test_bad_split_and_patient_across_splits(tmp_path):
    with pytest.raises(ManifestError, match="split 'training'"):
        load_manifest(_csv(tmp_path, "slide_id,patient_id,label,split\na,1,x,training\nb,2,y,test\n"))
    with pytest.raises(ManifestError, match="patient '1' has slides in different split"):
        load_manifest(_csv(tmp_path, "slide_id,patient_id,label,split\na,1,x,train\nb,1,x,test\nc,2,y,train\n"))


def test_bad_fold_and_missing_file_and_empty(tmp_path):
    with pytest.raises(ManifestError, match="fold 'x' on row"):
        load_manifest(_csv(tmp_path, "slide_id,patient_id,label,fold\na,1,x,0\nb,2,y,x\n"))
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="no slides"):
        load_manifest(_csv(tmp_path, "slide_id,patient_id,label\n"))
