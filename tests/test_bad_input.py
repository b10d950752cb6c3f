"""Every kind of bad input, given on the command line as a user would: the scripts stop with exit
status 2 and ONE line "error: ..." on stderr that names the culprit (the flag, the file, the CSV
column), never a traceback; --skip-bad-images leaves unreadable images out and the run goes on.

Each command-line case is a subprocess (about 5 s each, most of it importing torch and timm). To keep
the file near a minute on two cores, the cases a test session selects are all started at once by the
module fixture `cli`, two at a time, and each test waits for its own. The second part checks the
pieces behind --skip-bad-images and the empty --data-root errors in-process."""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import datasets as D
from conftest import run_script
from pipeline import decoded_cache as DC
from pipeline import images as IM
from runtime.errors import UserError

SIZE = ["--img-size", "32", "--workers", "0", "--bs", "4", "--epochs", "1"]


def finetune(data_root, out, *more, data="folder"):
    return ("finetune.py", "--data", data, "--data-root", data_root, "--arch", "test_resnet", "--init", "random",
            *SIZE, "--out", out, *more)


def pretrain_cass(data_root, out, *more, init="random"):
    return ("pretrain_cass.py", "--data", "folder", "--data-root", data_root, "--cnn", "test_resnet",
            "--vit", "test_vit", "--init", init, *SIZE, "--out", out, *more)


def make_images(root: Path, classes=3, per_class=10, size=40) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


BAD = ("class1/corrupt.jpg", "class2/truncated.jpg")


def make_bad_images(root: Path) -> Path:
    """3 x 10 good images, plus random bytes named .jpg and a valid JPEG cut in half."""
    make_images(root)
    (root / BAD[0]).write_bytes(np.random.default_rng(1).integers(0, 256, 600, dtype=np.uint8).tobytes())
    whole = (root / "class0" / "0.jpg").read_bytes()
    (root / BAD[1]).write_bytes(whole[: len(whole) // 2])
    return root


def split_seed_separating_bad(root: Path) -> int:
    """A --split-seed that puts one bad image in the training part and the other in the test part,
    so that both the labelled ids and the predictions are seen to leave them out."""
    table = D.load_table("folder", root)
    rows = [table.ids.index(b) for b in BAD]
    for seed in range(500):
        s = D.make_split(table, seed)
        if rows[0] in s["train"] and rows[1] in s["test"]:
            return seed
    raise AssertionError("no such split seed")


def one_error_line(proc, *names):
    """Exit status 2, exactly one 'error:' line on stderr, no traceback; returns the line after
    checking that it contains every one of `names`."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.strip()][-1] == errors[0]  # the last word
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


def succeeded(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc


class Evil:
    """Unpickled, it would create `marker` (weights_only=True loading must refuse it)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- the command-line cases
# Each case prepares its inputs in its own folder (also the working directory, so runs/splits lands
# there) and returns the commands to run one after the other; its result is [(proc, files after it)].

def case_unknown_data(d):
    return [finetune(d / "data", d / "out", data="nosuch")]


def case_missing_root(d):
    return [finetune(d / "nope", d / "out")]


def case_empty_root(d):
    (d / "empty").mkdir()
    return [finetune(d / "empty", d / "out")]


def case_bad_images_cache(d):
    make_bad_images(d / "data")
    return [finetune(d / "data", d / "out", "--cache-dir", d / "cache")]


def case_bad_images_no_cache(d):
    make_bad_images(d / "data")
    return [finetune(d / "data", d / "out", "--no-cache")]


def case_skip_finetune(d):
    """--skip-bad-images with the cache; the same --out with another --epochs (refused); then --force
    with --no-cache (a run-time flag), which checks every file before training."""
    make_bad_images(d / "data")
    seed = ["--split-seed", str(split_seed_separating_bad(d / "data")), "--skip-bad-images"]
    return [finetune(d / "data", d / "out", *seed, "--cache-dir", d / "cache"),
            finetune(d / "data", d / "out", *seed, "--cache-dir", d / "cache", "--epochs", "2"),
            finetune(d / "data", d / "out", *seed, "--cache-dir", d / "cache", "--epochs", "2", "--force",
                     "--no-cache")]


def case_skip_cass(d):
    make_bad_images(d / "data")
    return [pretrain_cass(d / "data", d / "out", "--skip-bad-images", "--cache-dir", d / "cache")]


def csv_case(text):
    """A CSV data set: data.csv beside a.png (an image)."""
    def case(d):
        d.mkdir(exist_ok=True)
        Image.new("RGB", (40, 40), (200, 30, 60)).save(d / "a.png")
        (d / "data.csv").write_text(text)
        return [finetune(d / "data.csv", d / "out", data="csv")]
    return case


def case_bs_too_large(d):
    make_images(d / "data")
    return [pretrain_cass(d / "data", d / "out", "--bs", "64"), finetune(d / "data", d / "out", "--bs", "64")]


def case_class_without_example(d):
    """A split file (e.g. a colleague's) that puts every image of class2 in validation and test."""
    make_images(d / "data")
    ids = sorted(str(p.relative_to(d / "data")) for p in (d / "data").rglob("*.jpg"))
    c2 = [i for i in ids if i.startswith("class2/")]
    rest = [i for i in ids if i not in c2]
    (d / "split.json").write_text(json.dumps({"train": rest[:14], "val": rest[14:17] + c2[:3],
                                              "test": rest[17:] + c2[3:]}))
    return [finetune(d / "data", d / "out", "--split-file", d / "split.json", "--label-frac", "0.1")]


def case_weights_other_arch(d):
    import timm

    from models import save_weights
    save_weights(timm.create_model("test_vit", img_size=32, num_classes=0), d / "vit.safetensors")
    make_images(d / "data")
    return [finetune(d / "data", d / "out", "--weights", d / "vit.safetensors")]


def case_weights_text(d):
    (d / "notes.pth").write_text("these are not weights\n")
    make_images(d / "data")
    return [finetune(d / "data", d / "out", "--weights", d / "notes.pth")]


def case_pickle_finetune(d):
    torch.save({"state_dict": Evil(d / "marker")}, d / "evil.pth")
    make_images(d / "data")
    return [finetune(d / "data", d / "out", "--weights", d / "evil.pth")]


def case_pickle_cass(d):
    torch.save({"state_dict": Evil(d / "marker")}, d / "evil.pth")
    make_images(d / "data")
    return [pretrain_cass(d / "data", d / "out", init=d / "evil.pth")]


CASES = {  # the slow ones (they train) first, so they overlap with the others
    "skip_finetune": case_skip_finetune,
    "skip_cass": case_skip_cass,
    "bad_images_no_cache": case_bad_images_no_cache,
    "bad_images_cache": case_bad_images_cache,
    "unknown_data": case_unknown_data,
    "missing_root": case_missing_root,
    "empty_root": case_empty_root,
    "csv_no_path_column": csv_case("label\nx\n"),
    "csv_bad_label_value": csv_case("path,T cells,B cells\na.png,1,yes\n"),
    "csv_missing_file": csv_case("path,label\na.png,x\nmissing.png,y\n"),
    "bs_too_large": case_bs_too_large,
    "class_without_example": case_class_without_example,
    "weights_other_arch": case_weights_other_arch,
    "weights_text": case_weights_text,
    "pickle_finetune": case_pickle_finetune,
    "pickle_cass": case_pickle_cass,
}

SNAPSHOT = ("labelled_ids.json", "predictions.csv", "skipped_images.txt")


def _run_case(name, folder: Path):
    folder.mkdir(parents=True)
    results = []
    for cmd in CASES[name](folder):
        proc = run_script(*cmd, cwd=folder, check=False, timeout=300)
        out = folder / "out"
        files = {f: (out / f).read_text() for f in SNAPSHOT if (out / f).exists()}
        if out.exists():
            files["."] = ""  # the output folder exists
        results.append((proc, files))
    return results


def uses(*cases):
    """Decorator: the command-line cases a test reads (besides a `case` parameter)."""
    def mark(test):
        test.cases = cases
        return test
    return mark


@pytest.fixture(scope="module")
def cli(request, tmp_path_factory):
    """Every case that a selected test of this module reads, started at once, two subprocesses at a
    time: .futures maps a case name to the future of its [(proc, files)], .base is their folder."""
    wanted = set()
    for item in request.session.items:
        if getattr(item, "module", None) is request.module:
            wanted.update(getattr(item.function, "cases", ()))
            callspec = getattr(item, "callspec", None)
            if callspec is not None and callspec.params.get("case") in CASES:
                wanted.add(callspec.params["case"])
    base = tmp_path_factory.mktemp("cli")
    pool = ThreadPoolExecutor(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # two runs at a time on two cores: one thread each
        futures = {name: pool.submit(_run_case, name, base / name) for name in CASES if name in wanted}
        yield SimpleNamespace(futures=futures, base=base)
        pool.shutdown(wait=True, cancel_futures=True)


def result(cli, name):
    return cli.futures[name].result()


@pytest.mark.slow
@uses("unknown_data")
def test_unknown_data_name(cli):
    one_error_line(result(cli, "unknown_data")[0][0], "--data nosuch", "unknown data set")


@uses("missing_root")
def test_missing_data_root(cli):
    one_error_line(result(cli, "missing_root")[0][0], f"--data-root {cli.base / 'missing_root' / 'nope'}",
                   "no such folder")


@uses("empty_root")
def test_empty_data_root(cli):
    one_error_line(result(cli, "empty_root")[0][0], f"--data-root {cli.base / 'empty_root' / 'empty'}",
                   "no images found", "expected")


@uses("bad_images_cache")
def test_unreadable_images_stop_the_run_with_the_cache(cli):
    line = one_error_line(result(cli, "bad_images_cache")[0][0], "2 images", "--skip-bad-images")
    assert str(cli.base / "bad_images_cache" / "data" / BAD[0]) in line  # the first one, with its reason
    assert "not an image" in line


@uses("bad_images_no_cache")
def test_unreadable_image_stops_the_run_without_the_cache(cli):
    line = one_error_line(result(cli, "bad_images_no_cache")[0][0], "cannot read image", "--skip-bad-images")
    assert any(str(cli.base / "bad_images_no_cache" / "data" / b) in line for b in BAD)


@uses("skip_finetune")
def test_skip_bad_images_finetune_leaves_them_out_of_every_part(cli):
    (first, files), _, (no_cache, files_no_cache) = result(cli, "skip_finetune")
    data = cli.base / "skip_finetune" / "data"
    split = json.loads(next((cli.base / "skip_finetune" / "runs" / "splits").glob("*.json")).read_text())
    assert BAD[0] in split["train"] and BAD[1] in split["test"]  # the split file keeps them
    for proc, got in ((first, files), (no_cache, files_no_cache)):
        succeeded(proc)
        assert "warning: --skip-bad-images: left out 2 of 32 images that cannot be read:" in proc.stderr
        for b in BAD:
            assert f"  {data / b}: " in proc.stderr
        labelled = json.loads(got["labelled_ids.json"])
        assert labelled["n_labelled"] == len(split["train"]) - 1 and BAD[0] not in labelled["ids"]
        test_ids = [line.split(",")[0] for line in got["predictions.csv"].splitlines()[1:]]
        assert len(test_ids) == len(split["test"]) - 1 and BAD[1] not in test_ids


@uses("skip_finetune")
def test_out_folder_of_another_run_is_refused_unless_force(cli):
    runs = result(cli, "skip_finetune")
    succeeded(runs[0][0])
    line = one_error_line(runs[1][0], f"--out {cli.base / 'skip_finetune' / 'out'}", "epochs", "--force")
    differ = line.split("differs in: ")[1].split(")")[0].split(", ")
    assert "epochs" in differ and "cache" not in differ  # --no-cache is a run-time flag
    succeeded(runs[2][0])
    config = json.loads((cli.base / "skip_finetune" / "out" / "config.json").read_text())
    assert config["epochs"] == 2


@uses("skip_cass")
def test_skip_bad_images_pretrain_cass(cli):
    proc = succeeded(result(cli, "skip_cass")[0][0])
    data = cli.base / "skip_cass" / "data"
    assert "warning: --skip-bad-images: left out 2 of 32 images that cannot be read:" in proc.stderr
    assert all(f"  {data / b}: " in proc.stderr for b in BAD)
    assert (cli.base / "skip_cass" / "out" / "cnn.safetensors").exists()


@pytest.mark.parametrize("case", ["skip_finetune", "skip_cass"])
def test_skipped_images_are_listed_in_the_run_folder(cli, case):
    got = result(cli, case)[0][1].get("skipped_images.txt", "")
    data = cli.base / case / "data"
    assert sorted(line.split("\t")[0] for line in got.splitlines()) == [str(data / b) for b in BAD]


@pytest.mark.parametrize("case,names", [
    ("csv_no_path_column", ["data.csv", "no image path column"]),
    ("csv_bad_label_value", ["data.csv", "column 'B cells' row 2 is 'yes'", "expected 0 or 1"]),
    ("csv_missing_file", ["data.csv", "'missing.png' not found"]),
])
def test_bad_csv(cli, case, names):
    one_error_line(result(cli, case)[0][0], *names)


@pytest.mark.slow
@uses("bs_too_large")
def test_batch_larger_than_the_training_set(cli):
    for proc, _ in result(cli, "bs_too_large"):  # pretrain_cass.py, finetune.py
        one_error_line(proc, "--bs 64", "larger than the training set (21 images)")


@uses("class_without_example")
def test_a_class_without_a_labelled_training_example(cli):
    one_error_line(result(cli, "class_without_example")[0][0], "class 'class2' has no labelled training example",
                   "validation 3, test 7", "--split-file")


# --no-cache without --skip-bad-images meets a bad file only when the loader reads it, during training
ERROR_CASES = [c for c in CASES if not c.startswith("skip_") and c != "bad_images_no_cache"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_input_leaves_no_output_folder(cli, case):
    """The run folder is written only once the data and start weights have been read."""
    for proc, files in result(cli, case):
        assert proc.returncode == 2 and "." not in files, case


@uses("weights_other_arch")
def test_weights_of_another_architecture(cli):
    one_error_line(result(cli, "weights_other_arch")[0][0],
                   f"--weights {cli.base / 'weights_other_arch' / 'vit.safetensors'}", "does not fit test_resnet")


@uses("weights_text")
def test_weights_that_are_not_a_weight_file(cli):
    one_error_line(result(cli, "weights_text")[0][0], f"--weights {cli.base / 'weights_text' / 'notes.pth'}",
                   "not a readable weight file")


@pytest.mark.parametrize("case", ["pickle_finetune", "pickle_cass"])
def test_weight_files_are_never_unpickled(cli, case):
    folder = cli.base / case
    flag = "--weights" if case == "pickle_finetune" else "--init"
    one_error_line(result(cli, case)[0][0], f"{flag} {folder / 'evil.pth'}", "never unpickled")
    assert not (folder / "marker").exists()
    # and the file is a real threat: loaded unsafely, it does create the marker
    torch.load(folder / "evil.pth", weights_only=False)
    assert (folder / "marker").exists()


# ---------------------------------------------------------------- in-process: the pieces behind it

@pytest.mark.parametrize("name", ["folder", "dermofit", "brain-mri", "isic2019", "csv", "autoimmune"])
def test_every_file_loader_names_an_empty_data_root(tmp_path, name):
    with pytest.raises(UserError, match=f"--data-root {tmp_path}") as e:
        D.load_table(name, tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("layout", ["class folders without images", "images without class folders"])
def test_a_data_root_without_images_says_what_it_expects(tmp_path, layout):
    if layout == "class folders without images":
        for c in ("a", "b"):
            (tmp_path / c).mkdir()
            (tmp_path / c / "notes.txt").write_text("x")
        match = "no images found for --data folder"
    else:
        make_images(tmp_path / "x", classes=1, per_class=2)
        for p in (tmp_path / "x" / "class0").iterdir():
            os.replace(p, tmp_path / p.name)
        (tmp_path / "x" / "class0").rmdir()
        (tmp_path / "x").rmdir()
        match = "no images found in class sub-folders, 2 lie directly in it"
    with pytest.raises(UserError, match=match) as e:
        D.load_table("folder", tmp_path)
    assert "expected one sub-folder per class" in str(e.value)


def load_args(tmp_path, **kw):
    return SimpleNamespace(**{**dict(data="folder", data_root=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
                                     split_file=str(tmp_path / "split.json"), split_seed=77, img_size=16, workers=0,
                                     cache=True, skip_bad_images=True), **kw})


def test_the_cache_marker_remembers_the_bad_images(tmp_path, monkeypatch):
    make_bad_images(tmp_path / "data")
    table = D.load_table("folder", tmp_path / "data")
    bad_rows = [table.ids.index(b) for b in BAD]
    with pytest.raises(UserError, match="2 images of 32 cannot be read"):
        DC.cached_table(table, 16, tmp_path / "cache")
    marker = json.loads(Path(next((tmp_path / "cache" / "decoded").glob("*.done.json"))).read_text())
    assert [(b["row"], b["path"]) for b in marker["bad"]] == [(r, table.paths[r]) for r in bad_rows]
    monkeypatch.setattr(DC, "decode_resized", lambda *a: pytest.fail("the cache was decoded again"))
    ct = DC.cached_table(table, 16, tmp_path / "cache", skip_bad=True)
    assert [r for r, _, _ in ct.extra["bad_images"]] == bad_rows
    with pytest.raises(IndexError):  # never a black image
        ct.array[bad_rows[0]]
    assert ct.array[0].shape == (16, 16, 3)


def test_worker_processes_find_the_same_bad_images(tmp_path):
    make_bad_images(tmp_path / "data")
    make_images(tmp_path / "data", classes=3, per_class=25, size=20)  # over 64 images: the pool is used
    table = D.load_table("folder", tmp_path / "data")
    serial = DC.cached_table(table, 8, tmp_path / "c0", skip_bad=True)
    pooled = DC.cached_table(table, 8, tmp_path / "c2", workers=2, skip_bad=True)
    assert len(serial.extra["bad_images"]) == 2 and serial.extra["bad_images"] == pooled.extra["bad_images"]
    assert DC.check_images(table, workers=2) == DC.check_images(table) == serial.extra["bad_images"]
    assert np.array_equal(np.load(serial.array.path), np.load(pooled.array.path))


@pytest.mark.parametrize("cache", [True, False])
def test_load_data_leaves_them_out_and_reports_at_most_20(tmp_path, capsys, cache):
    make_images(tmp_path / "data", per_class=12, size=20)
    for i in range(23):
        (tmp_path / "data" / "class1" / f"bad{i:02d}.png").write_bytes(b"not a png")
    args = load_args(tmp_path, cache=cache)
    table, split = D.load_data(args)
    bad = {r for r, i in enumerate(table.ids) if "bad" in i}
    assert not bad & {int(r) for part in split.values() for r in part}
    assert sum(len(v) for v in split.values()) == len(table) - 23
    assert sorted(p for p, _ in table.extra["skipped_images"]) == sorted(table.paths[r] for r in bad)
    err = capsys.readouterr().err
    assert f"left out 23 of {len(table)} images that cannot be read:" in err
    assert err.count("  " + str(tmp_path / "data")) == 20 and "  ... and 3 more" in err
    D.write_skipped(tmp_path / "run", table)
    lines = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert len(lines) == 23 and lines[0] == f"{table.paths[min(bad)]}\tnot an image (unknown or damaged format)"
    saved = json.loads((tmp_path / "split.json").read_text())  # the split file still lists them
    assert sum(i.startswith("class1/bad") for part in ("train", "val", "test") for i in saved[part]) == 23


def test_nothing_to_skip(tmp_path):
    make_images(tmp_path / "data", per_class=4, size=20)
    for cache in (True, False):
        table, split = D.load_data(load_args(tmp_path, cache=cache))
        assert table.extra["skipped_images"] == [] and sum(map(len, split.values())) == 12
    D.write_skipped(tmp_path / "run", table)
    assert not (tmp_path / "run").exists()
    rng = np.random.default_rng(0)  # data held in arrays: no files, nothing to check
    np.savez(tmp_path / "m.npz", **{f"{p}_{k}": (rng.integers(0, 255, (4, 8, 8), dtype=np.uint8) if k == "images"
                                                 else rng.integers(0, 2, (4, 1)))
                                    for p in ("train", "val", "test") for k in ("images", "labels")})
    table, _ = D.load_data(load_args(tmp_path, data="medmnist", data_root=str(tmp_path / "m.npz"),
                                     split_file=str(tmp_path / "m.json")))
    assert table.extra["skipped_images"] == []


def test_without_the_flag_the_error_is_one_line_with_the_hint(tmp_path):
    make_bad_images(tmp_path / "data")
    for cache in (True, False):
        args = load_args(tmp_path, cache=cache, skip_bad_images=False)
        if cache:
            with pytest.raises(UserError, match="^2 images of 32 cannot be read .*pass --skip-bad-images"):
                D.load_data(args)
        else:  # found when the loader meets the file
            table, split = D.load_data(args)
            with pytest.raises(UserError, match=r"corrupt.jpg: .*\(--skip-bad-images leaves unreadable"):
                IM.load_rgb(table.paths[table.ids.index(BAD[0])])


def test_when_no_image_can_be_read_skipping_them_is_no_way_out(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        (tmp_path / "data" / c / "x.jpg").write_bytes(b"nothing")
    for cache in (True, False):
        with pytest.raises(UserError, match=f"--data-root {tmp_path / 'data'}: none of the 2 images can be read"):
            D.load_data(load_args(tmp_path, cache=cache))
