"""skin.staging.stage against the real emulator, on real images (or synthetic ones) plus crafted bad files."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skin.data import synthetic
from skin.data.grouping import fold_groups, near_duplicate_groups, split_groups, split_images
from skin.data.images import CLASSES
from skin.errors import DataError
from skin.infra.config import API_VERSION, KIND, Experiment, parse_experiment
from skin.infra.storage import Storage, join
from skin.staging.stage import stage


def make_exp(bucket: str, source: str | Path, name: str = "exp", **data) -> Experiment:
    doc = {"apiVersion": API_VERSION, "kind": KIND, "name": name,
           "storage": {"bucket": bucket, "prefix": "p"},
           "data": {"source": str(source), "validation_fraction": 0.25, "test_fraction": 0.2,
                    "shards": 2, "seed": 7, **data}}
    return parse_experiment(doc, env={})


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG that declares a huge canvas (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1) * 4)) + chunk(b"IEND", b""))


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def first(folder: Path, k: int = 0) -> Path:
    files = sorted(folder.glob("*.jpg"), key=lambda p: (len(p.stem), p.stem))
    return files[k]


@pytest.fixture(scope="module")
def crafted(real_or_synthetic_images, tmp_path_factory) -> dict:
    """The small labelled folder plus one crafted file of each kind; returns its facts."""
    src = tmp_path_factory.mktemp("crafted") / "source"
    shutil.copytree(real_or_synthetic_images, src, symlinks=True)
    extra = synthetic.generate(tmp_path_factory.mktemp("extra"), 4, size=160, seed=99)
    benign, malignant = src / "benign", src / "malignant"
    real_b = first(benign, 3)
    real_m = first(malignant, 5)
    good = Image.open(extra / "benign/0.jpg").convert("RGB")

    (benign / "zero.jpg").write_bytes(b"")
    (malignant / "truncated.jpg").write_bytes(real_m.read_bytes()[: real_m.stat().st_size // 2])
    (benign / "notes.jpg").write_text("not a picture, just notes\n")
    (malignant / "bomb.png").write_bytes(png_bomb())
    Image.new("L", (9000, 48), 128).save(benign / "wide.jpg", "JPEG")
    Image.new("RGB", (8, 8), (200, 150, 120)).save(benign / "tiny.png")

    rgba = Image.open(extra / "benign/1.jpg").convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(benign / "alpha.png")
    Image.open(extra / "malignant/0.jpg").convert("L").save(malignant / "gray.jpg", "JPEG")
    Image.open(extra / "malignant/1.jpg").convert("CMYK").save(malignant / "cmyk.jpg", "JPEG")
    Image.open(extra / "benign/2.jpg").convert("P").save(benign / "palette.png")
    good.resize((1500, 1500)).save(malignant / "big.jpg", "JPEG", quality=90)

    (benign / "dup.jpg").write_bytes(real_b.read_bytes())
    (benign / "conflict.jpg").write_bytes(real_m.read_bytes())
    near = Image.open(first(benign, 7)).convert("RGB")
    (benign / "near.jpg").write_bytes(jpeg_bytes(near, quality=70))
    (benign / ".DS_Store").write_bytes(b"\0\0junk")
    return {"src": src, "dup_of": f"benign/{real_b.name}",
            "conflict_with": f"malignant/{real_m.name}",
            "near_of": f"benign/{first(benign, 7).name}",
            "files": sum(1 for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))}


@pytest.fixture(scope="module")
def staged(crafted, emulator, tmp_path_factory) -> dict:
    """The crafted folder staged once into a fresh bucket (module scope: stage is not free)."""
    bucket = f"t-{uuid.uuid4().hex[:8]}"
    emulator.ensure_bucket(bucket)
    exp = make_exp(bucket, crafted["src"])
    storage = Storage()
    report = stage(exp, storage, work_dir=tmp_path_factory.mktemp("work"))
    manifest = storage.read_json(join(exp.data_uri, "manifest.json"))
    return {"exp": exp, "report": report, "manifest": manifest, "storage": storage}


def read_shards(storage: Storage, data_uri: str, names: list[str], tmp: Path) -> list[dict]:
    import tensorflow as tf

    out = []
    for name in names:
        local = tmp / name
        storage.download_file(join(data_uri, name), local)
        for rec in tf.data.TFRecordDataset(str(local)):
            ex = tf.train.Example.FromString(rec.numpy())
            f = ex.features.feature
            out.append({"image": f["image"].bytes_list.value[0],
                        "label": f["label"].int64_list.value[0],
                        "fold": f["fold"].int64_list.value[0],
                        "sha256": f["sha256"].bytes_list.value[0].decode(), "shard": name})
    return out


@pytest.mark.parametrize("name, reason", [
    ("benign/zero.jpg", "empty file"),
    ("malignant/truncated.jpg", "truncated"),
    ("benign/notes.jpg", "not an image"),
    ("malignant/bomb.png", "decompression bomb"),
    ("benign/wide.jpg", "too large: 9000x48"),
    ("benign/tiny.png", "too small"),
    ("benign/conflict.jpg", "conflicting labels"),
])
def test_bad_files_are_quarantined_with_the_reason(staged, crafted, name, reason):
    by_source = {q["source"]: q for q in staged["report"].quarantined}
    assert reason in by_source[name]["reason"]
    copy = by_source[name]["copy"]
    assert copy == join(staged["exp"].data_uri, "quarantine", name)
    assert staged["storage"].read_bytes(copy) == (crafted["src"] / name).read_bytes()


def test_both_copies_of_a_conflicting_image_are_quarantined(staged, crafted):
    by_source = {q["source"]: q["reason"] for q in staged["report"].quarantined}
    reason = by_source[crafted["conflict_with"]]
    assert "benign (benign/conflict.jpg)" in reason and "malignant (" in reason
    sources = {i["source"] for i in staged["manifest"]["images"]}
    assert crafted["conflict_with"] not in sources and "benign/conflict.jpg" not in sources


@pytest.mark.parametrize("name, reason", [
    ("benign/alpha.png", "PNG RGBA -> RGB JPEG; alpha composited over white"),
    ("malignant/gray.jpg", "JPEG L -> RGB JPEG"),
    ("malignant/cmyk.jpg", "JPEG CMYK -> RGB JPEG"),
    ("benign/palette.png", "PNG P -> RGB JPEG"),
    ("malignant/big.jpg", "downscaled 1500x1500 -> 1024x1024"),
])
def test_odd_formats_are_converted_to_rgb_jpeg(staged, name, reason):
    by_source = {c["source"]: c["reason"] for c in staged["report"].converted}
    assert by_source[name] == reason


def test_exact_duplicates_are_dropped(staged, crafted):
    dups = staged["report"].duplicates
    assert {"source": "benign/dup.jpg", "duplicate_of": crafted["dup_of"]} in [
        {k: d[k] for k in ("source", "duplicate_of")} for d in dups]
    sources = [i["source"] for i in staged["manifest"]["images"]]
    assert "benign/dup.jpg" not in sources and crafted["dup_of"] in sources
    shas = [i["sha256"] for i in staged["manifest"]["images"]]
    assert len(shas) == len(set(shas))


def test_hidden_files_are_ignored(staged):
    assert "benign/.DS_Store" in staged["report"].ignored


def test_manifest_matches_the_shards(staged, crafted, tmp_path):
    m, report, exp = staged["manifest"], staged["report"], staged["exp"]
    assert m["version"] == 1 and m["source_fingerprint"] == report.fingerprint
    assert m["classes"] == ["benign", "malignant"]
    names = [n for s in m["splits"].values() for n in s["shards"]]
    assert sorted(names) == sorted(m["files"])
    records = read_shards(staged["storage"], exp.data_uri, names, tmp_path)
    by_sha = {r["sha256"]: r for r in records}
    assert len(records) == len(m["images"]) == report.usable
    for image in m["images"]:
        rec = by_sha[image["sha256"]]
        assert hashlib.sha256(rec["image"]).hexdigest() == image["sha256"]
        assert rec["label"] == CLASSES.index(image["label"])
        assert rec["shard"] in m["splits"][image["split"]]["shards"]
    for split, info in m["splits"].items():
        members = [i for i in m["images"] if i["split"] == split]
        assert info["count"] == len(members) == report.splits[split]["count"]
        for c in CLASSES:
            assert info[c] == sum(i["label"] == c for i in members)
    sizes = {u.rsplit("/", 1)[1]: i.size for u, i in
             ((i.uri, i) for i in staged["storage"].list_info(exp.data_uri))}
    for name, f in m["files"].items():
        assert sizes[name] == f["bytes"]
    assert report.usable + len(report.duplicates) + len(report.quarantined) == report.files
    assert report.files == crafted["files"]

def test_stored_images_are_rgb_jpegs_of_original_size(staged, tmp_path):
    import tensorflow as tf

    m, exp = staged["manifest"], staged["exp"]
    names = [n for s in m["splits"].values() for n in s["shards"]]
    for rec in read_shards(staged["storage"], exp.data_uri, names, tmp_path):
        img = Image.open(io.BytesIO(rec["image"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert max(img.size) <= 1024
        assert tf.io.decode_jpeg(rec["image"], channels=3).shape[-1] == 3



def test_rgb_jpegs_are_stored_byte_for_byte(staged, crafted):
    for image in staged["manifest"]["images"]:
        original = hashlib.sha256((crafted["src"] / image["source"]).read_bytes()).hexdigest()
        converted = {c["source"] for c in staged["report"].converted}
        if image["source"] in converted:
            assert image["source_sha256"] == original != image["sha256"]
        else:
            assert image["sha256"] == original and "source_sha256" not in image


def test_near_duplicates_share_a_group_and_a_split(staged, crafted):
    images = {i["source"]: i for i in staged["manifest"]["images"]}
    a, b = images["benign/near.jpg"], images[crafted["near_of"]]
    assert a["group"] == b["group"] and a["split"] == b["split"]
    splits_of_group: dict[int, set] = {}
    for i in staged["manifest"]["images"]:
        splits_of_group.setdefault(i["group"], set()).add(i["split"])
    assert all(len(s) == 1 for s in splits_of_group.values())
    assert staged["report"].near_duplicates["groups_with_several"] >= 1


def test_split_is_stratified(staged):
    splits = staged["report"].splits
    total = {c: sum(s[c] for s in splits.values()) for c in CLASSES}
    for split, frac in (("validation", 0.25), ("test", 0.2)):
        for c in CLASSES:
            assert abs(splits[split][c] - frac * total[c]) <= 3, (split, c, splits)


def test_report_and_manifest_are_in_the_bucket(staged):
    exp, storage = staged["exp"], staged["storage"]
    doc = storage.read_json(join(exp.data_uri, "stage_report.json"))
    assert doc == json.loads(json.dumps(staged["report"].to_dict()))
    assert doc["near_duplicates"]["threshold"] == exp.data.near_duplicate_correlation


def test_staging_again_writes_nothing(staged, tmp_path):
    exp, storage = staged["exp"], staged["storage"]
    before = storage.list_info(exp.root_uri)
    again = stage(exp, storage, work_dir=tmp_path)
    assert again.already_staged and again.fingerprint == staged["report"].fingerprint
    assert again.splits == staged["report"].splits
    assert storage.list_info(exp.root_uri) == before  # same objects, same generations
    assert "already staged" in again.summary()


def test_another_source_under_the_same_name_is_refused(staged, crafted, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(crafted["src"], other, symlinks=True)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(other / "benign" / "new.jpg")
    exp = make_exp(staged["exp"].storage.bucket, other)
    with pytest.raises(DataError, match="already holds data staged from another source"):
        stage(exp, staged["storage"], work_dir=tmp_path / "w")


def test_zip_gcs_and_relative_sources_stage_the_same_images(
        storage, bucket, image_folder, tmp_path, monkeypatch):
    folder_exp = make_exp(bucket, image_folder, name="from-folder")
    reference = stage(folder_exp, storage, work_dir=tmp_path / "w0")
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(image_folder.rglob("*.jpg")):
            zf.write(p, "top/" + p.relative_to(image_folder).as_posix())
        zf.writestr("__MACOSX/top/benign/._1.jpg", b"resource fork")  # as macOS zips it
    storage.upload_dir(image_folder, f"gs://{bucket}/uploaded")
    monkeypatch.chdir(image_folder.parent)
    for name, source in (("from-zip", archive), ("from-gcs", f"gs://{bucket}/uploaded"),
                         ("from-relative", image_folder.name)):
        report = stage(make_exp(bucket, source, name=name), storage, work_dir=tmp_path / name)
        assert report.splits == reference.splits, name
        assert report.usable == reference.usable


def test_synthetic_source_says_so(storage, bucket, tmp_path):
    exp = make_exp(bucket, "synthetic", synthetic_images_per_class=16)
    report = stage(exp, storage, work_dir=tmp_path)
    assert report.synthetic and "[SYNTHETIC DATA]" in report.summary()
    assert report.usable == 32 and not report.quarantined
    assert storage.read_json(join(exp.data_uri, "manifest.json"))["synthetic"] is True
    assert (tmp_path / "synthetic-16-7" / "malignant" / "15.jpg").is_file()


def test_test_source_is_the_test_split_and_its_near_copies_are_held_out(
        storage, bucket, image_folder, tmp_path):
    test_dir = tmp_path / "test"
    for c in CLASSES:
        (test_dir / c).mkdir(parents=True)
        for p in sorted((image_folder / c).glob("*.jpg"))[:5]:
            shutil.move(str(p), test_dir / c / p.name)
    leak = sorted((test_dir / "malignant").glob("*.jpg"))[0]
    (image_folder / "malignant" / "leak.jpg").write_bytes(
        jpeg_bytes(Image.open(leak).convert("RGB"), quality=75))
    doc_exp = make_exp(bucket, image_folder, test_fraction=0.0, test_source=str(test_dir))
    report = stage(doc_exp, storage, work_dir=tmp_path / "w")
    assert report.splits["test"] == {"count": 10, "benign": 5, "malignant": 5}
    assert {"source": "malignant/leak.jpg", "reason": "near-duplicate of a test image"} \
        in report.held_out
    m = storage.read_json(join(doc_exp.data_uri, "manifest.json"))
    assert {i["source"] for i in m["images"] if i["split"] == "test"} == {
        f"test/{p.relative_to(test_dir).as_posix()}" for p in test_dir.rglob("*.jpg")}
    assert "malignant/leak.jpg" not in {i["source"] for i in m["images"]
                                        if i["split"] in ("train", "validation")}


@pytest.mark.parametrize("damage, match", [
    ("all-bad", "no usable images"),
    ("no-malignant", "no usable malignant images"),
    ("no-folder", "no malignant/ folder"),
])
def test_unusable_sources_are_data_errors(storage, bucket, tmp_path, damage, match):
    src = tmp_path / "src"
    (src / "benign").mkdir(parents=True)
    (src / "malignant").mkdir()
    synthetic.generate(tmp_path / "ok", 6, size=64)
    if damage == "all-bad":
        for c in CLASSES:
            (src / c / "x.jpg").write_text("nope")
    elif damage == "no-malignant":
        for p in (tmp_path / "ok" / "benign").glob("*.jpg"):
            shutil.copy(p, src / "benign")
        (src / "malignant" / "x.jpg").write_bytes(b"")
    else:
        (src / "malignant").rmdir()
    with pytest.raises(DataError, match=match):
        stage(make_exp(bucket, src), storage, work_dir=tmp_path / "w")
    if damage != "no-folder":
        # nothing was published: no manifest, so a fixed source can be staged later
        assert not storage.exists(join(make_exp(bucket, src).data_uri, "manifest.json"))


def test_missing_source_is_a_data_error(storage, bucket, tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        stage(make_exp(bucket, tmp_path / "nope"), storage, work_dir=tmp_path)


# -- the grouping and split algorithms on their own ---------------------------

def unit(v: np.ndarray) -> np.ndarray:
    v = v - v.mean()
    return v / np.linalg.norm(v)


def test_neighbours_link_only_when_they_look_alike():
    rng = np.random.default_rng(0)
    base = [unit(rng.normal(size=1024)) for _ in range(40)]
    thumbs = list(base)
    # image 40: a noisy copy of image 10 (correlation ~0.93)
    similar = unit(base[10] + 0.4 * unit(rng.normal(size=1024)))
    thumbs.append(similar)
    thumbs = np.stack(thumbs).astype(np.float32)
    corr = float(thumbs[10] @ thumbs[40])
    assert 0.80 < corr < 0.97  # looks alike, but not enough for an arbitrary pair
    labels = [0] * 41
    folders = ["benign"] * 41
    numbers = [i * 10 for i in range(40)] + [101]  # image 40 is #101, next to #100 (image 10)
    group, stats = near_duplicate_groups(thumbs, labels, numbers, folders, 0.97, seed=1)
    assert group[40] == group[10]
    assert stats["neighbour_links"] == 1 and stats["similar_pairs"] == 0
    # the same pair, numbered far apart, stays apart
    numbers[40] = 1000
    group, stats = near_duplicate_groups(thumbs, labels, numbers, folders, 0.97, seed=1)
    assert group[40] != group[10]
    # neighbours that do not look alike stay apart: images 0..39 are #0, #10... never linked
    numbers = list(range(41))
    group, _ = near_duplicate_groups(thumbs, labels, numbers, folders, 0.97, seed=1)
    assert len(set(group[:10])) == 10


def random_groups(seed: int, n: int = 300) -> list[list[int]]:
    """[benign, malignant] counts of n seeded random groups (sizes 1-7, 45 % malignant)."""
    rng = np.random.default_rng(seed)
    groups = []
    for _ in range(n):
        size = int(rng.choice([1, 1, 1, 1, 2, 3, 7]))
        label = int(rng.random() < 0.45)
        groups.append([size, 0] if label == 0 else [0, size])
    return groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_groups_keeps_groups_whole_and_classes_stratified(seed):
    groups = random_groups(seed)
    fractions = {"train": 0.6, "validation": 0.25, "test": 0.15}
    chosen = split_groups(groups, fractions, seed)
    assert len(chosen) == len(groups) and set(chosen) == set(fractions)
    totals = np.sum(groups, axis=0)
    for split, frac in fractions.items():
        got = np.sum([g for g, s in zip(groups, chosen) if s == split], axis=0)
        assert np.all(np.abs(got - frac * totals) <= 7), (split, got, frac * totals)
    assert split_groups(groups, fractions, seed) == chosen  # deterministic


def test_split_images_places_each_image_with_its_group():
    """Per image: the split split_groups gives its group (groups in sorted id order)."""
    group = [7, 3, 7, 9, 3, 3, 12, 9, 20, 21]  # ids need not be 0..n-1
    labels = [1, 0, 1, 0, 0, 0, 1, 0, 1, 0]
    fractions = {"train": 0.5, "validation": 0.25, "test": 0.25}
    split = split_images(group, labels, fractions, seed=4)
    per_group = split_groups([[3, 0], [0, 2], [2, 0], [0, 1], [0, 1], [1, 0]], fractions, 4)
    by_id = dict(zip([3, 7, 9, 12, 20, 21], per_group))
    assert split == [by_id[g] for g in group]
    assert split[0] == split[2] and split[1] == split[4] == split[5] and split[3] == split[7]
    assert set(split) == set(fractions)


def test_folds_keep_groups_whole_and_fold_0_is_the_validation_split(staged, tmp_path):
    m, report, exp = staged["manifest"], staged["report"], staged["exp"]
    # train 0.55 / validation 0.25 -> 1 + round(2.2) = 3 folds: the validation split + 2
    assert m["folds"] == len(m["fold_counts"]) == len(report.folds) == 3
    images = m["images"]
    for i in images:
        expected = {"validation": {0}, "train": {1, 2}, "test": {-1}}[i["split"]]
        assert i["fold"] in expected, i
    folds_of_group: dict[int, set] = {}
    for i in images:
        folds_of_group.setdefault(i["group"], set()).add(i["fold"])
    assert all(len(f) == 1 for f in folds_of_group.values())  # a lesion on one side
    for f, counts in enumerate(m["fold_counts"]):
        members = [i for i in images if i["fold"] == f]
        assert counts["count"] == len(members) > 0
        for c in CLASSES:
            assert counts[c] == sum(i["label"] == c for i in members) > 0, (f, counts)
    assert m["fold_counts"][0] == {k: m["splits"]["validation"][k] for k in ("count", *CLASSES)}
    train = m["splits"]["train"]
    for c in CLASSES:  # stratified: each part holds about half of the train split's class
        for f in (1, 2):
            assert abs(m["fold_counts"][f][c] - train[c] / 2) <= 4, m["fold_counts"]
    names = [n for s in m["splits"].values() for n in s["shards"]]
    records = {r["sha256"]: r for r in read_shards(staged["storage"], exp.data_uri, names,
                                                   tmp_path)}
    assert {i["sha256"]: i["fold"] for i in images} == {
        sha: r["fold"] for sha, r in records.items()}


def test_data_staged_before_folds_is_kept_as_it_is(image_folder, storage, bucket, tmp_path,
                                                   monkeypatch, caplog):
    from skin.staging import stage as stage_module

    exp = make_exp(bucket, image_folder, name="older")
    monkeypatch.setattr(stage_module, "STAGE_ALGORITHM", 1)  # the fingerprint an older stage wrote
    first = stage(exp, storage, work_dir=tmp_path / "w1")
    monkeypatch.undo()
    caplog.set_level("WARNING", logger="skin.staging.stage")
    before = storage.list_info(exp.data_uri)
    again = stage(exp, storage, work_dir=tmp_path / "w2")
    assert again.already_staged and again.fingerprint == first.fingerprint
    assert storage.list_info(exp.data_uri) == before
    assert "staged by an earlier version, without validation folds" in caplog.text


def test_too_few_images_for_folds_stage_none(image_folder, storage, bucket, tmp_path):
    # train 0.45 / validation 0.45 -> round(1.0) = 1 part of the train split: no folds
    exp = make_exp(bucket, image_folder, name="nofolds", validation_fraction=0.45,
                   test_fraction=0.1)
    report = stage(exp, storage, work_dir=tmp_path)
    m = storage.read_json(join(exp.data_uri, "manifest.json"))
    assert m["folds"] == 1 and len(report.folds) == 1
    assert {i["fold"] for i in m["images"] if i["split"] != "validation"} == {-1}
    assert "validation folds" not in report.summary()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_groups_is_the_split_of_before_folds(seed):
    # sha256 of the split of these groups as the stage computed it before folds existed
    # (STAGE_ALGORITHM 1): folds must not move an image between train/validation/test
    before = {0: "189ae27ee77330ac", 1: "068e8ca03eedc279", 2: "3f0dd98e5a81f478"}
    groups = random_groups(seed)
    chosen = split_groups(groups, {"train": 0.6, "validation": 0.25, "test": 0.15}, seed)
    assert hashlib.sha256(json.dumps(chosen).encode()).hexdigest()[:16] == before[seed]


def test_fold_groups_are_stratified_and_deterministic():
    rng = np.random.default_rng(5)
    groups = [[s, 0] if rng.random() < 0.7 else [0, s]
              for s in rng.choice([1, 1, 1, 2, 3], size=400).tolist()]
    folds = fold_groups(groups, 4, seed=5)
    assert set(folds) == {0, 1, 2, 3} and fold_groups(groups, 4, seed=5) == folds
    totals = np.sum(groups, axis=0)
    for f in range(4):
        got = np.sum([g for g, k in zip(groups, folds) if k == f], axis=0)
        assert np.all(np.abs(got - totals / 4) <= 3), (f, got, totals / 4)


def test_folds_are_fewer_when_a_class_could_not_fill_them(tmp_path):
    from skin.staging.stage import StageReport, _assign_folds, _Item

    # train 0.8 / validation 0.1 -> 8 parts would be asked for, but the train split holds
    # 3 malignant images: 3 parts, each with both classes
    exp = make_exp("unused", tmp_path, validation_fraction=0.1, test_fraction=0.1)
    items, splits = [], []
    for k in range(40):
        label = 1 if k in (0, 1, 2, 30) else 0
        items.append(_Item(rel=f"x/{k}.jpg", path=tmp_path, label=label, origin="source",
                           group=k))
        splits.append("validation" if k >= 30 else "train")
    report = StageReport(data_uri="", source="")
    _assign_folds(items, splits, exp, report)
    assert len(report.folds) == 4
    assert all(f["benign"] > 0 and f["malignant"] > 0 for f in report.folds)
    assert {it.fold for it, s in zip(items, splits) if s == "validation"} == {0}
    assert sorted(it.fold for it in items[:3]) == [1, 2, 3]
