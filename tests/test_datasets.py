import json

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D
from pipeline import images as IM
from pipeline import loading as LD
from pipeline import transforms as TR
from runtime.errors import UserError


def save_png(path, value=100, size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode != "RGB" else (value, value // 2, 255 - value)).save(path)
    return path


# ---------------------------------------------------------------- loaders in their real layouts

def test_folder_tree(tmp_path):
    for c, n in (("benign", 3), ("malignant", 2)):
        for i in range(n):
            save_png(tmp_path / c / f"sub{i % 2}" / f"{i}.png")
    (tmp_path / "benign" / "notes.txt").write_text("not an image")
    t = D.load_table("folder", tmp_path)
    assert t.class_names == ["benign", "malignant"]
    assert t.class_counts().tolist() == [3, 2]
    assert not t.multilabel and len(t) == 5


def test_dermofit_excludes_masks(tmp_path):
    for c in ("AK", "BCC"):
        for lesion in ("A1", "A2"):
            save_png(tmp_path / c / lesion / f"{lesion}.png")
            save_png(tmp_path / c / lesion / f"{lesion}mask.png", mode="L")
    t = D.load_table("dermofit", tmp_path)
    assert len(t) == 4 and not any("mask" in i for i in t.ids)
    assert t.class_names == ["AK", "BCC"]


def test_brain_mri_uses_the_curators_split(tmp_path):
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    for part, n in (("Training", 8), ("Testing", 2)):
        for c in classes:
            for i in range(n):
                # each image its own grey: identical images would be copies, kept in one part
                save_png(tmp_path / part / c / f"{c}{i}.jpg", 3 + i + 10 * classes.index(c) + 50 * (part == "Testing"),
                         mode="L")
    t = D.load_table("brain-mri", tmp_path)
    assert t.class_names == classes
    split = D.get_split(t, tmp_path / "split.json", seed=1)
    assert all(t.ids[r].startswith("Testing") for r in split["test"])
    assert len(split["test"]) == 8
    assert all(t.ids[r].startswith("Training") for r in np.r_[split["train"], split["val"]])
    assert len(split["val"]) == 4  # one per class: 1/8 of each class's 8 training images


def test_isic2019_layout(tmp_path):
    cols = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    rows = ["image," + ",".join(cols)]
    for i, c in enumerate([1, 1, 0, 7, 2]):
        onehot = ["1.0" if j == c else "0.0" for j in range(len(cols))]
        rows.append(f"ISIC_{i:07d}," + ",".join(onehot))
        save_png(tmp_path / "ISIC_2019_Training_Input" / f"ISIC_{i:07d}.jpg")
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text("\n".join(rows) + "\n")
    t = D.load_table("isic2019", tmp_path)
    assert t.class_names == cols[:-1]  # UNK is empty in training and dropped
    assert t.labels.tolist() == [1, 1, 0, 7, 2]


def test_isic2019_row_without_a_class_is_an_error(tmp_path):
    save_png(tmp_path / "ISIC_2019_Training_Input" / "ISIC_0.jpg")
    (tmp_path / "ISIC_2019_Training_GroundTruth.csv").write_text("image,MEL,NV\nISIC_0,0,0\n")
    with pytest.raises(UserError, match="exactly one class"):
        D.load_table("isic2019", tmp_path)


def test_multilabel_csv_with_tiff_images(tmp_path):
    lines = ["path,TFH-1,TFH-217,B cells"]
    labels = [[1, 0, 1], [0, 1, 0], [1, 1, 1]]
    for i, y in enumerate(labels):
        arr = (np.arange(35 * 47).reshape(35, 47) * 17 % 4096).astype(np.uint16)
        (tmp_path / "imgs").mkdir(exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "imgs" / f"{i}.tif")
        lines.append(f"imgs/{i}.tif," + ",".join(map(str, y)))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    t = D.load_table("autoimmune", tmp_path / "labels.csv")
    assert t.multilabel and t.class_names == ["TFH-1", "TFH-217", "B cells"]
    assert t.labels.tolist() == labels
    img = LD.ImageDataset(t, [0], TR.eval_transform(16)).image(0)
    assert img.mode == "RGB" and img.size == (47, 35)


def test_single_label_csv(tmp_path):
    save_png(tmp_path / "a.png")
    save_png(tmp_path / "b.png")
    (tmp_path / "data.csv").write_text("filename,label\na.png,nevus\nb.png,melanoma\n")
    t = D.load_table("csv", tmp_path)
    assert t.class_names == ["melanoma", "nevus"] and t.labels.tolist() == [1, 0]


@pytest.mark.parametrize("content,match", [
    ("label\nx\n", "no image path column"),
    ("path,label\nmissing.png,a\n", "missing.png"),
    ("path,A,B\na.png,1,2\n", "expected 0 or 1"),
    ("path\na.png\n", "no label columns"),
])
def test_bad_csv_names_the_culprit(tmp_path, content, match):
    save_png(tmp_path / "a.png")
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(UserError, match=match):
        D.load_table("csv", tmp_path / "d.csv")


@pytest.mark.parametrize("multilabel", [False, True])
def test_medmnist_npz(tmp_path, multilabel):
    rng = np.random.default_rng(0)
    arrays = {}
    for part, n in (("train", 20), ("val", 4), ("test", 6)):
        arrays[f"{part}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{part}_labels"] = (rng.integers(0, 2, (n, 14)) if multilabel
                                    else rng.integers(0, 3, (n, 1)))
    np.savez(tmp_path / "x.npz", **arrays)
    t = D.load_table("medmnist", tmp_path / "x.npz")
    assert t.multilabel == multilabel and len(t) == 30
    split = D.get_split(t, tmp_path / "s.json")
    assert [len(split[k]) for k in ("train", "val", "test")] == [20, 4, 6]
    x, y, row = LD.ImageDataset(t, split["test"], TR.eval_transform(16))[0]
    assert x.shape == (3, 16, 16) and row == 24


def test_image_modes_become_rgb(tmp_path):
    gray = save_png(tmp_path / "g.png", value=77, mode="L")
    assert np.asarray(IM.load_rgb(gray))[0, 0].tolist() == [77, 77, 77]
    rgba = tmp_path / "a.png"
    Image.new("RGBA", (4, 4), (200, 100, 50, 0)).save(rgba)  # fully transparent: composited on black
    assert np.asarray(IM.load_rgb(rgba))[0, 0].tolist() == [0, 0, 0]
    t16 = tmp_path / "d.tif"
    Image.fromarray(np.array([[1000, 3000], [5000, 1000]], dtype=np.uint16)).save(t16)
    a = np.asarray(IM.load_rgb(t16))
    assert a.dtype == np.uint8 and a.shape == (2, 2, 3)
    assert a[:, :, 0].tolist() == [[0, 128], [255, 0]]  # stretched from its own min..max


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(UserError, match="broken.jpg"):
        IM.load_rgb(bad)


def test_unknown_name_and_missing_root(tmp_path):
    with pytest.raises(UserError, match="unknown data set"):
        D.load_table("imagenet", tmp_path)
    with pytest.raises(UserError, match="no such folder"):
        D.load_table("folder", tmp_path / "nope")
    with pytest.raises(UserError, match="--data-root is required"):
        D.load_table("dermofit", None)
    (tmp_path / "empty" / "classA").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        D.load_table("folder", tmp_path / "empty")


# ---------------------------------------------------------------- splits

def toy_table(counts=(50, 30, 10, 1), multilabel=False):
    labels = np.repeat(np.arange(len(counts)), counts)
    ids = [f"img{i:04d}" for i in range(len(labels))]
    if multilabel:
        rng = np.random.default_rng(0)
        labels = (rng.random((len(ids), 4)) < 0.4).astype(np.float32)
    return D.ImageTable("toy", ids, labels, list("abcd"), multilabel, paths=ids)


def test_split_is_stratified_disjoint_and_complete():
    t = toy_table()
    s = D.make_split(t, seed=77)
    all_rows = np.concatenate([s["train"], s["val"], s["test"]])
    assert sorted(all_rows.tolist()) == list(range(len(t)))  # disjoint and complete
    for c, n in enumerate((50, 30, 10, 1)):
        got = [int((t.labels[s[k]] == c).sum()) for k in ("train", "val", "test")]
        want = [0.7 * n, 0.1 * n, 0.2 * n]
        assert all(abs(g - w) < 1 for g, w in zip(got, want)), (c, got, want)


def test_split_is_deterministic_and_seeded():
    t = toy_table()
    a, b, c = D.make_split(t, 77), D.make_split(t, 77), D.make_split(t, 78)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])


def test_multilabel_split_keeps_label_frequencies():
    t = toy_table(counts=(100, 100, 100, 100), multilabel=True)
    s = D.make_split(t, 77)
    freq = t.labels.mean(0)
    assert np.abs(t.labels[s["test"]].mean(0) - freq).max() < 0.08


def test_saved_split_is_reused(tmp_path):
    t = toy_table()
    f = tmp_path / "split.json"
    first = D.get_split(t, f)
    saved = json.loads(f.read_text())
    assert saved["test"] == [t.ids[r] for r in first["test"]]
    # edit the file: the saved split, not a new one, is what every later script sees
    saved["train"], saved["test"] = saved["train"][1:], saved["test"] + saved["train"][:1]
    f.write_text(json.dumps(saved))
    again = D.get_split(t, f, seed=12345)
    assert [t.ids[r] for r in again["test"]] == saved["test"]


def test_split_file_of_other_data_is_refused(tmp_path):
    f = tmp_path / "split.json"
    D.get_split(toy_table(), f)
    other = toy_table()
    other.ids = [i.replace("img", "other") for i in other.ids]
    with pytest.raises(UserError, match="not in the data set"):
        D.get_split(other, f)


def test_default_split_file_depends_on_the_data():
    a, b = toy_table(), toy_table()
    b.ids = b.ids[:-1] + ["new"]
    assert D.default_split_file(a, 77) != D.default_split_file(b, 77)


# ---------------------------------------------------------------- transforms

def test_cass_augment_and_eval_transform():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    x = TR.cass_augment(32)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    e1, e2 = TR.eval_transform(32)(img), TR.eval_transform(32)(img)
    assert torch.equal(e1, e2)
    torch.manual_seed(0)
    views = [TR.cass_augment(32, ("blur", "solarize"))(img) for _ in range(8)]
    assert any(not torch.equal(v, e1) for v in views)
    with pytest.raises(UserError, match="unknown augmentation"):
        TR.cass_augment(32, ("mixup",))


def test_cass_augment_is_the_papers_chain():
    ops = TR.cass_augment(384).transforms
    names = [type(o).__name__ for o in ops]
    assert names == ["Resize", "RandomApply", "RandomApply", "RandomVerticalFlip", "RandomHorizontalFlip",
                     "ToTensor", "Normalize"]
    assert ops[0].size == (384, 384)
    assert [type(o).__name__ for o in ops[1].transforms] == ["ColorJitter", "RandomPerspective"]
    assert [type(o).__name__ for o in ops[2].transforms] == ["ColorJitter", "RandomAffine"]
    assert ops[1].p == ops[2].p == 0.3 and ops[3].p == ops[4].p == 0.3
    assert ops[1].transforms[1].distortion_scale == 0.2 and ops[2].transforms[1].degrees == [-10.0, 10.0]
    assert ops[-1].mean == TR.IMAGENET_MEAN and ops[-1].std == TR.IMAGENET_STD


@pytest.mark.slow
def test_synthetic_tables_load():
    t = D.load_table("synthetic")
    assert not t.multilabel and len(t.class_names) >= 5 and len(t) >= 2000
    counts = t.class_counts()
    assert counts.max() >= 3 * counts.min()
    m = D.load_table("synthetic-multilabel")
    assert m.multilabel and m.labels.shape[1] == len(m.class_names)
