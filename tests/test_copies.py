"""Copies across splits (pipeline/copies.py, datasets.get_split, check_data.py) and the clean test of finetune.py:
one planted copy of each kind the docs claim to catch, the kinds they say are not caught, splits that
never leak a group, and metrics on the clean test checked against scikit-learn."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from sklearn import metrics as skm

import check_data
import datasets as D
import finetune as FT
from pipeline import copies as CP


def photo(seed: int, size=(96, 80)) -> Image.Image:
    """A distinct textured picture: smooth random blobs plus fine noise, different for each seed."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 5, 3)) * 255
    im = Image.fromarray(coarse.astype(np.uint8)).resize(size, Image.BICUBIC)
    a = np.asarray(im).astype(np.int32) + rng.integers(-12, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg(im, quality):
    b = io.BytesIO()
    im.save(b, "JPEG", quality=quality)
    return Image.open(io.BytesIO(b.getvalue())).convert("RGB")


def crop(im, frac):
    w, h = im.size
    return im.crop((int(frac * w), int(frac * h), w - int(frac * w), h - int(frac * h)))


CAUGHT = {  # the kinds of near copy the docs say are found (docs/datasets.md, "Copies and leaks")
    "jpeg q50": lambda im: jpeg(im, 50),
    "png of a jpeg": lambda im: jpeg(im, 90),  # saved as PNG below: other bytes, near-identical pixels
    "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR),
    "double size": lambda im: im.resize((im.width * 2, im.height * 2), Image.BICUBIC),
    "other aspect": lambda im: im.resize((im.width, int(im.height * 0.9)), Image.BILINEAR),
    "contrast x1.3": lambda im: ImageEnhance.Contrast(im).enhance(1.3),
    "20% darker": lambda im: ImageEnhance.Brightness(im).enhance(0.8),
}
NOT_CAUGHT = {  # and those they say are not
    "horizontal flip": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
    "5% crop": lambda im: crop(im, 0.05),
    "rotated 90": lambda im: im.transpose(Image.ROTATE_90),
}


def table_of(folder: Path):
    return D.load_table("folder", folder)


def test_exact_copies_by_bytes_and_by_pixels(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(6):
        photo(i).save(tmp_path / "a" / f"{i}.png")
    (tmp_path / "a" / "same_bytes.png").write_bytes((tmp_path / "a" / "0.png").read_bytes())
    Image.open(tmp_path / "a" / "1.png").save(tmp_path / "a" / "same_pixels.bmp")  # other bytes, same pixels
    (tmp_path / "b").mkdir()
    photo(99).save(tmp_path / "b" / "x.png")
    found = CP.find_copies(table_of(tmp_path), progress=False)
    exact = sorted(sorted(Path(i).name for i in g) for g in found["exact_groups"])
    assert exact == [["0.png", "same_bytes.png"], ["1.png", "same_pixels.bmp"]]
    assert sorted(sorted(Path(i).name for i in g) for g in found["near_groups"]) == exact  # near includes exact


def copies_with_one_planted(tmp_path, alter) -> dict:
    """find_copies on eight distinct pictures and `alter` applied to the fourth, saved as copy.png."""
    (tmp_path / "a").mkdir()
    for i in range(8):
        photo(i).save(tmp_path / "a" / f"{i}.png")
    alter(photo(3)).save(tmp_path / "a" / "copy.png")
    return CP.find_copies(table_of(tmp_path), progress=False)


@pytest.mark.parametrize("kind", sorted(CAUGHT))
def test_near_copy_is_found(kind, tmp_path):
    found = copies_with_one_planted(tmp_path, CAUGHT[kind])
    assert found["exact_groups"] == []
    assert [sorted(Path(i).name for i in g) for g in found["near_groups"]] == [["3.png", "copy.png"]]


@pytest.mark.parametrize("kind", sorted(NOT_CAUGHT))
def test_documented_blind_spots_are_not_found(kind, tmp_path):
    assert copies_with_one_planted(tmp_path, NOT_CAUGHT[kind])["near_groups"] == []


def test_distinct_pictures_are_never_copies(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(200):
        photo(i).save(tmp_path / "a" / f"{i}.png")
    found = CP.find_copies(table_of(tmp_path), progress=False)
    assert found["near_groups"] == [] and found["near_pairs"] == []


def test_flat_images_match_only_by_their_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    for i, v in enumerate((10, 60, 200)):  # flat pictures of different greys: no texture to compare
        Image.new("RGB", (20, 20), (v, v, v)).save(tmp_path / "a" / f"{i}.png")
    assert CP.find_copies(table_of(tmp_path), progress=False)["near_groups"] == []


def planted_folder(root: Path, n_per_class=30, copies_of=range(0, 20, 2)) -> Path:
    """Two classes of distinct pictures, and re-encoded copies (JPEG q60) of some of them beside."""
    for c in ("x", "y"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            seed = i + (1000 if c == "y" else 0)
            photo(seed).save(root / c / f"{i:03d}.png")
            if i in copies_of:
                jpeg(photo(seed), 60).save(root / c / f"{i:03d}_copy.jpg")
    return root


def test_a_split_we_make_keeps_every_group_of_copies_in_one_part(tmp_path):
    table = table_of(planted_folder(tmp_path / "data"))
    for seed in range(5):
        split = D.get_split(table, tmp_path / f"split{seed}.json", seed)
        copies = table.extra["copies"]
        assert len(copies["near_groups"]) == 20
        assert CP.leaks(split, table, copies) == {"val": {"exact": 0, "near": 0}, "test": {"exact": 0, "near": 0}}
        part = {int(r): k for k in split for r in split[k]}
        for g in copies["near_groups"]:
            assert len({part[table.ids.index(i)] for i in g}) == 1
        assert (tmp_path / f"split{seed}.copies.json").is_file()  # saved beside the split


def test_singleton_groups_give_the_ungrouped_split():
    rng = np.random.default_rng(0)
    strata = rng.integers(0, 5, 400)
    for seed in (0, 77):
        plain = D.stratified_partition(strata, D.SPLIT_FRACTIONS, seed)
        grouped = D.stratified_partition(strata, D.SPLIT_FRACTIONS, seed, groups=np.arange(400)[::-1].copy())
        # group ids in any order: units follow their first position, so the result is the same
        assert all(np.array_equal(a, b) for a, b in zip(plain, grouped))


def test_grouped_partition_keeps_groups_and_balances_strata():
    strata = np.repeat([0, 1], 300)
    groups = np.arange(600) // 3  # 200 groups of three
    parts = D.stratified_partition(strata, D.SPLIT_FRACTIONS, 1, groups)
    assert sorted(np.concatenate(parts).tolist()) == list(range(600))
    for p in parts:
        assert all(len(set(groups[p]) & set(groups[q])) == 0 for q in parts if q is not p)
    assert [len(p) for p in parts] == [420, 60, 120]


def test_table_groups_stay_together(tmp_path):
    # a CSV with a patient column: --group-col keeps each patient's images in one part
    rows = ["path,label,patient"]
    for i in range(60):
        photo(i).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'ab'[i % 2]},p{i // 4}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    table = D.load_table("csv", tmp_path / "data.csv", group_col="patient")
    assert table.class_names == ["a", "b"]  # the group column is not a label
    split = D.get_split(table, tmp_path / "split.json", 3)
    part = {int(r): k for k in split for r in split[k]}
    for p in range(15):
        assert len({part[i] for i in range(p * 4, p * 4 + 4)}) == 1
    with pytest.raises(D.UserError, match="--group-col ward: CSV .* has no such column"):
        D.load_table("csv", tmp_path / "data.csv", group_col="ward")


def brain_mri_with_leaks(root: Path) -> dict:
    """The curator's layout, with three test images that are re-encoded copies of training images."""
    for c, base in (("glioma", 0), ("notumor", 500)):
        for i in range(16):
            (root / "Training" / c).mkdir(parents=True, exist_ok=True)
            photo(base + i).save(root / "Training" / c / f"tr{i}.png")
        for i in range(5):
            (root / "Testing" / c).mkdir(parents=True, exist_ok=True)
            photo(base + 100 + i).save(root / "Testing" / c / f"te{i}.png")
    for i, c in ((0, "glioma"), (1, "glioma"), (2, "notumor")):
        jpeg(photo((0 if c == "glioma" else 500) + i), 70).save(root / "Testing" / c / f"leak{i}.jpg")
    return {"n_test": 13, "n_clean": 10}


def test_finetune_reports_the_clean_test_beside_the_full_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    want = brain_mri_with_leaks(tmp_path / "mri")
    FT.main(["--data", "brain-mri", "--data-root", str(tmp_path / "mri"), "--arch", "test_resnet", "--init", "random",
             "--img-size", "32", "--bs", "8", "--workers", "0", "--eval", "knn", "--knn-k", "1", "--out", "knn"])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:") and "copy in training" in line]
    assert len(warnings) == 1 and "3 of the 13 test images" in warnings[0] and "check_data.py" in warnings[0]
    m = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert m["n_test"] == want["n_test"] and m["n_test_clean"] == want["n_clean"]
    assert m["leaks"]["test"] == {"exact": 0, "near": 3}
    with open(tmp_path / "knn" / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    clean = [p for p in preds if "leak" not in p["id"]]
    y, yhat = [int(p["y_true"]) for p in clean], [int(p["y_pred"]) for p in clean]
    assert m["accuracy_clean"] == pytest.approx(skm.accuracy_score(y, yhat))
    assert m["f1_macro_clean"] == pytest.approx(skm.f1_score(y, yhat, average="macro"))
    # a 1-NN vote gets every copy right, whatever the features: the copies' own neighbour is the original
    leaked = [p for p in preds if "leak" in p["id"]]
    assert len(leaked) == 3 and all(p["y_true"] == p["y_pred"] for p in leaked)


def test_clean_metrics_are_none_when_every_test_image_leaks():
    table = D.ImageTable("t", ["a", "b", "c"], np.array([0, 1, 0]), ["x", "y"], False)
    table.extra = {"clean_test": np.array([], dtype=np.int64), "leaks": {}}
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    full = FT.compute_metrics(table.labels, probs, table.class_names, False)
    out = FT.clean_test_metrics(full, table, table.labels, np.arange(3), probs, 0.5)
    assert out["n_test_clean"] == 0 and out["f1_macro_clean"] is None and out["accuracy_clean"] is None


def test_check_data_reports_copies_leaks_and_conflicts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    brain_mri_with_leaks(tmp_path / "mri")
    jpeg(photo(3), 80).save(tmp_path / "mri" / "Training" / "notumor" / "conflict.jpg")  # a glioma under notumor
    report = check_data.main(["--data", "brain-mri", "--data-root", str(tmp_path / "mri"), "--json", "out.json",
                              "--sheet", "sheet.png"])
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["n_images"] == 16 * 2 + 5 * 2 + 3 + 1
    assert saved["near_groups"] == 4 and saved["exact_groups"] == 0 and saved["label_conflicts"] == 1
    assert saved["leaks"]["test"] == {"exact": 0, "near": 3} and saved["leaks"]["val"]["exact"] == 0
    assert saved["n_test_clean"] == 10 and report["n_images"] == saved["n_images"]
    assert Image.open(tmp_path / "sheet.png").size[0] > 100
    out = capsys.readouterr().out
    assert "test 3 of 13 have a copy in training or validation" in out


# ---------------------------------------------------------------- HAM10000, PBC, --train-size

def ham_folder(root: Path, one_folder=False) -> Path:
    """HAM10000's layout: the metadata CSV, images in the two part folders (or one); lesions of 1-3 images."""
    root.mkdir(parents=True)
    lines = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    k = 0
    for lesion in range(30):
        dx = ("nv", "nv", "mel", "bkl")[lesion % 4]
        for j in range(1 + lesion % 3):
            image_id = f"ISIC_{k:07d}"
            folder = root / ("HAM10000_images" if one_folder else f"HAM10000_images_part_{1 + k % 2}")
            folder.mkdir(exist_ok=True)
            photo(3000 + k).save(folder / f"{image_id}.jpg")
            lines.append(f"HAM_{lesion:07d},{image_id},{dx},histo,50.0,male,back")
            k += 1
    (root / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("one_folder", [False, True])
def test_ham10000_layout_splits_by_lesion(tmp_path, one_folder):
    table = D.load_table("ham10000", ham_folder(tmp_path / "ham", one_folder))
    assert table.class_names == ["bkl", "mel", "nv"] and len(table) == 60
    assert FT.HEADLINE["ham10000"] == "balanced_accuracy"
    for seed in range(4):
        split = D.get_split(table, tmp_path / f"s{seed}.json", seed)
        part = {int(r): k for k in split for r in split[k]}
        by_lesion = {}
        for r, g in enumerate(table.groups):
            by_lesion.setdefault(g, set()).add(part[r])
        assert all(len(p) == 1 for p in by_lesion.values())


def test_ham10000_bad_metadata_is_one_line(tmp_path):
    root = ham_folder(tmp_path / "ham")
    csv_path = root / "HAM10000_metadata.csv"
    text = csv_path.read_text()
    csv_path.write_text(text.replace("lesion_id,", "lesion,", 1))
    with pytest.raises(D.UserError, match=r"HAM10000_metadata.csv has no column 'lesion_id'"):
        D.load_table("ham10000", root)
    csv_path.write_text(text + "HAM_9,ISIC_9999999,nv,histo,1,male,back\n")
    with pytest.raises(D.UserError, match=r"image_id ISIC_9999999 has no image file"):
        D.load_table("ham10000", root)


def test_pbc_layout_skips_junk(tmp_path):
    root = tmp_path / "pbc" / "PBC_dataset_normal_DIB"
    for c in ("basophil", "neutrophil"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            photo(i + (10 if c == "basophil" else 0)).save(root / c / f"{c[:2]}_{i}.jpg")
    (root / "neutrophil" / ".DS_169665.jpg").write_bytes(b"\x00\x05\x16\x07 not an image")
    (root / "neutrophil" / ".ipynb_checkpoints").mkdir()
    photo(0).save(root / "neutrophil" / ".ipynb_checkpoints" / "ne_0-checkpoint.jpg")
    (root / "__MACOSX" / "basophil").mkdir(parents=True)
    photo(1).save(root / "__MACOSX" / "basophil" / "._ba_0.jpg")
    for where in (tmp_path / "pbc", root):
        table = D.load_table("pbc", where)
        assert table.class_names == ["basophil", "neutrophil"] and len(table) == 6


def test_train_size_draws_a_stratified_subset_once(tmp_path):
    table = table_of(planted_folder(tmp_path / "data", n_per_class=40, copies_of=()))
    full = D.get_split(table, tmp_path / "split.json", 77)
    sub = D.get_split(table, tmp_path / "split.json", 77, train_size=20)
    assert len(sub["train"]) == 20 and np.isin(sub["train"], full["train"]).all()
    assert table.class_counts(sub["train"]).tolist() == [10, 10]
    assert all(np.array_equal(sub[k], full[k]) for k in ("val", "test"))
    saved = tmp_path / "split-train20.json"
    assert saved.is_file()
    again = D.get_split(table, tmp_path / "split.json", 77, train_size=20)
    assert np.array_equal(again["train"], sub["train"])
    with pytest.raises(D.UserError, match="--train-size 500 is larger than the training split"):
        D.get_split(table, tmp_path / "split.json", 77, train_size=500)
    with pytest.raises(D.UserError, match="--train-size 1 is smaller than the number of classes"):
        D.get_split(table, tmp_path / "split.json", 77, train_size=1)


def test_train_size_and_val_size_reach_finetune(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    data = planted_folder(tmp_path / "data", n_per_class=40, copies_of=())
    FT.main(["--data", "folder", "--data-root", str(data), "--arch", "test_resnet", "--init", "random", "--img-size",
             "32", "--bs", "8", "--workers", "0", "--train-size", "20", "--label-frac", "0.5", "--val-size", "4",
             "--epochs", "1", "--out", "ft"])
    labelled = json.loads((tmp_path / "ft" / "labelled_ids.json").read_text())
    assert labelled["n_train"] == 20 and labelled["n_labelled"] == 10
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["n_val"] == 4 and metrics["n_test"] == 16  # the test stays whole


def test_val_size_draws_a_stratified_validation_subset_once(tmp_path):
    table = table_of(planted_folder(tmp_path / "data", n_per_class=40, copies_of=()))
    full = D.get_split(table, tmp_path / "split.json", 77)
    assert table.class_counts(full["val"]).tolist() == [4, 4]
    sub = D.get_split(table, tmp_path / "split.json", 77, val_size=4)
    assert len(sub["val"]) == 4 and np.isin(sub["val"], full["val"]).all()
    assert table.class_counts(sub["val"]).tolist() == [2, 2]
    assert all(np.array_equal(sub[k], full[k]) for k in ("train", "test"))
    assert json.loads((tmp_path / "split-val4.json").read_text())["val_size"] == 4
    assert np.array_equal(D.get_split(table, tmp_path / "split.json", 77, val_size=4)["val"], sub["val"])
    both = D.get_split(table, tmp_path / "split.json", 77, train_size=20, val_size=4)  # independent files
    assert np.array_equal(both["val"], sub["val"]) and len(both["train"]) == 20
    assert np.array_equal(both["test"], full["test"])
    with pytest.raises(D.UserError, match="--val-size 9 is larger than the validation split"):
        D.get_split(table, tmp_path / "split.json", 77, val_size=9)
    with pytest.raises(D.UserError, match="--val-size 1 is smaller than the number of classes in the validation"):
        D.get_split(table, tmp_path / "split.json", 77, val_size=1)
    (tmp_path / "split-val3.json").write_text('{"val": ["no such image"]}')
    with pytest.raises(D.UserError, match="split-val3.json is not a validation-subset file"):
        D.get_split(table, tmp_path / "split.json", 77, val_size=3)


def test_resplit_pools_the_curators_parts_and_keeps_copies_together(tmp_path):
    brain_mri_with_leaks(tmp_path / "mri")
    table = D.load_table("brain-mri", tmp_path / "mri")
    curator = D.get_split(table, tmp_path / "curator.json", 77)
    assert CP.leaks(curator, table, table.extra["copies"])["test"]["near"] == 3
    ours = D.get_split(table, tmp_path / "ours.json", 77, resplit=True)
    assert CP.leaks(ours, table, table.extra["copies"]) == {"val": {"exact": 0, "near": 0},
                                                           "test": {"exact": 0, "near": 0}}
    assert any(table.ids[r].startswith("Training") for r in ours["test"])  # the parts are pooled
    assert sum(len(v) for v in ours.values()) == len(table)
    assert D.default_split_file(table, 77, True).name.endswith("-seed77-resplit.json")
    with pytest.raises(D.UserError, match="--resplit: --data folder has no curator's split"):
        D.get_split(table_of(planted_folder(tmp_path / "f")), tmp_path / "f.json", 77, resplit=True)
