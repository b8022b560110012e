"""skin.data.provenance: the kind of a source and its licence as found, never assumed; and
`skin stage` writing it into the manifest the retrain reads."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from skin.data import provenance as pv

SHARED_README = Path(__file__).resolve().parents[2] / "shared/datasets/skin-cancer-isic/README.md"


def _isic_readme(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = (SHARED_README.read_text() if SHARED_README.is_file() else
            "# Skin Cancer: Malignant vs. Benign (ISIC Archive)\nImages from the ISIC Archive.\n")
    (folder / "README.md").write_text(text)
    return folder / "README.md"


@pytest.mark.parametrize("source, kind", [
    ("synthetic", "synthetic"), ("gs://b/images", "gcs"), ("/data/set.ZIP", "zip"),
    ("/data/folder", "folder"), ("relative/folder", "folder")])
def test_kind_of_a_source(source, kind):
    assert pv.describe(source)["kind"] == kind


def test_the_isic_licence_only_when_the_readme_or_the_config_says_so(tmp_path):
    readme = _isic_readme(tmp_path / "skin-cancer-isic")
    train = tmp_path / "skin-cancer-isic" / "train"
    train.mkdir()
    doc = pv.describe(str(train), train)  # the README one level up, as in ../shared
    assert pv.is_isic(doc) and doc["licence_basis"] == f"recognised by {readme}"
    assert pv.is_isic(pv.describe(str(train / "benign"), train / "benign"))  # two levels up
    other = tmp_path / "mine"
    (other / "benign").mkdir(parents=True)
    (other / "README.md").write_text("My own photos, CC-BY 4.0.\n")
    assert not pv.is_isic(pv.describe(str(other), other))
    assert pv.describe(str(other), other)["licence"] == ""
    assert pv.is_isic(pv.describe(str(other), other, licence="isic"))
    assert pv.describe(str(other), other, licence="CC-BY 4.0")["licence"] == "CC-BY 4.0"
    # A data folder inside this checkout: the project's README mentions the ISIC Archive but
    # is not about a data set there.
    repo = tmp_path / "checkout"
    (repo / "data" / "benign").mkdir(parents=True)
    (repo / "README.md").write_text((Path(__file__).resolve().parents[1] / "README.md")
                                    .read_text())
    assert "ISIC Archive" in (repo / "README.md").read_text()
    assert not pv.is_isic(pv.describe(str(repo / "data"), repo / "data"))
    # Synthetic images are synthetic whatever the configuration says.
    syn = pv.describe("synthetic", synthetic=True, licence="isic")
    assert syn["kind"] == "synthetic" and not pv.is_isic(syn)


def test_an_older_manifest_without_provenance(tmp_path):
    _isic_readme(tmp_path)
    (tmp_path / "train").mkdir()
    assert pv.of_manifest({"source": "synthetic", "synthetic": True})["kind"] == "synthetic"
    assert pv.is_isic(pv.of_manifest({"source": str(tmp_path / "train"), "synthetic": False}))
    assert pv.of_manifest({"source": "x"}, which="test_source") is None


def test_stage_writes_the_provenance_into_the_manifest(emulator, storage,
                                                       real_or_synthetic_images, tmp_path):
    import shutil

    from skin.staging.stage import stage

    sys.path.insert(0, str(Path(__file__).parent))
    from test_retrain import experiment

    bucket = f"pv-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    root = tmp_path / "skin-cancer-isic"
    readme = _isic_readme(root)
    shutil.copytree(real_or_synthetic_images, root / "train", symlinks=True)
    exp = experiment(bucket, root / "train")
    stage(exp, storage, work_dir=tmp_path / "work")
    manifest = storage.read_json(f"{exp.data_uri}/manifest.json")
    doc = manifest["provenance"]["source"]
    assert doc["kind"] == "folder" and doc["source"] == str(root / "train")
    assert pv.is_isic(doc) and doc["licence_basis"] == f"recognised by {readme}"
    assert pv.of_manifest(manifest) == doc
