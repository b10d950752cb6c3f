"""The run folders of a study, found by what they ran: every config.json under a runs folder is
read back into the key of its run_all setting (study.Cass / Dino / Finetune.key()), so a table cell
finds its seeds' folders whatever their names, and a fine-tuning run is matched to the pretraining
run its --weights came from."""

import csv
import json
from pathlib import Path

import numpy as np

from study import cells as S
from study.aggregate import aggregate

ROOT = Path(__file__).resolve().parents[1]


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _resolve(path: str, bases) -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    for b in bases:
        if (Path(b) / p).exists():
            return Path(b) / p
    return Path(bases[0]) / p


def pretrain_key(cfg: dict):
    """run_all's key of a pretraining run from its config.json (None if it is not one)."""
    if "cnn" in cfg and "vit" in cfg:
        return S.Cass(cfg["data"], cfg["cnn"], cfg["vit"], int(cfg["bs"]), int(cfg["epochs"]), str(cfg["init"]),
                       S._aug_key(cfg.get("extra_aug", ())), cfg.get("cnn_opt", "adam"),
                       cfg.get("head_act", "none"), cnn_init=cfg.get("cnn_init") or None, predictor=bool(cfg.get("predictor", False)),
                       projector=int(cfg.get("projector", 0)), var_reg=float(cfg.get("var_reg", 0.0))).key()
    if "arch" in cfg and "out_dim" in cfg:
        return S.Dino(cfg["data"], cfg["arch"], int(cfg["bs"]), int(cfg["epochs"]), str(cfg["init"])).key()
    return None


def finetune_key(cfg: dict, bases):
    """run_all's key of a fine-tuning run or frozen-feature evaluation (--eval knn / linear) from its
    config.json, or None (not such a run, or weights whose pretraining folder is gone or unknown)."""
    if "label_frac" not in cfg or "arch" not in cfg:
        return None
    frac = round(float(cfg["label_frac"]), 6)
    ev = cfg.get("eval", "finetune")
    probe = (ev,) if ev != "finetune" else ()
    cw = cfg.get("class_weights", "minmax")
    probe += (("class_weights", cw),) if cw != "minmax" else ()
    w = cfg.get("weights")
    if not w:
        return (cfg["data"], cfg["arch"], frac, ("supervised", str(cfg.get("init", "imagenet"))), None) + probe
    wpath = _resolve(w, bases)
    pcfg = read_json(wpath.parent / "config.json")
    src = pretrain_key(pcfg) if pcfg else None
    if src is None:
        return None
    arm = wpath.name.split(".")[0] if src[0] == "cass" else None  # cnn | vit (cnn_last etc. never match)
    return (cfg["data"], cfg["arch"], frac, src, arm) + probe


class Runs:
    """Every run folder under `root`: fine-tuning runs by key, pretraining runs by key."""

    def __init__(self, root):
        self.root = Path(root)
        self.bases = [Path.cwd(), ROOT, self.root.parent.parent, self.root.parent]
        self.finetune, self.unfinished, self.pretrain = {}, {}, {}
        for cfg_path in sorted(self.root.rglob("config.json")) if self.root.is_dir() else []:
            d = cfg_path.parent
            cfg = read_json(cfg_path)
            if not isinstance(cfg, dict):
                continue
            pk = pretrain_key(cfg)
            if pk is not None:
                self.pretrain.setdefault(pk, []).append(d)
                continue
            fk = finetune_key(cfg, self.bases)
            if fk is None:
                continue
            target = self.finetune if (d / "metrics.json").is_file() else self.unfinished
            target.setdefault(fk, []).append(d)

    def cell(self, ft, metric):
        """(mean, std, n) of `metric` over the finished runs of setting `ft`, or None; and the number
        of unfinished run folders of that setting."""
        key = ft.key()
        dirs = self.finetune.get(key, [])
        stat = aggregate(dirs, [metric]).get(metric) if dirs else None
        return stat, len(self.unfinished.get(key, []))

    def pretrain_seconds(self, src):
        """Mean and std over the finished runs of a pretraining setting of the summed per-epoch seconds,
        and n. A run counts when its weight files exist and its log has every epoch."""
        totals = []
        for d in self.pretrain.get(src.key(), []):
            if not all((d / f).exists() for f in src.done_files()):
                continue
            rows = read_log(d / "log.csv")
            if rows is None or len(rows) < src.epochs:
                continue
            totals.append(sum(float(r["seconds"]) for r in rows))
        if not totals:
            return None
        a = np.asarray(totals)
        return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan"), len(a)


def read_log(path):
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return None
