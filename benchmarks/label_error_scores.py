"""Scores of a finished `bench_label_errors.py` run (the protocol: `label_error_protocol.py`).

`report(out_dir)` ranks the run as `kfold-ray report` does (writing label_issues, box_issues and
the page into the run dir), then scores the rankings against the injected errors and prints the
tables. Also importable on its own:

    auroc, auroc_interval   AUROC (ties count half) and its bootstrap 95 % interval
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.label_error_protocol import NAMED, PROTOCOL_KINDS, COVER_IOU

KIND_ORDER = ("swapped", "badly_located", "spurious", "overlooked")
SIGNALS = {"swapped": "swap_signal", "badly_located": "shift_signal", "spurious": "spurious_signal",
           "overlooked": "overlooked_signal"}


def auroc(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(a positive scores above a negative), ties counting half; None without both."""
    pos, neg = np.asarray(pos, float), np.sort(np.asarray(neg, float))
    if not pos.size or not neg.size:
        return None
    below = np.searchsorted(neg, pos, side="left")
    equal = np.searchsorted(neg, pos, side="right") - below
    return float(np.mean((below + 0.5 * equal) / neg.size))


def auroc_interval(pos, neg, reps: int, seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap 95 % interval: positives and negatives resampled separately."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not pos.size or not neg.size or reps < 1:
        return None
    rng = np.random.default_rng(seed)
    values = [auroc(pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)])
              for _ in range(reps)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def _xyxy(b) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


# ---- per box ------------------------------------------------------------------------------------
def box_positives(boxes, records: list[dict]) -> dict[str, Any]:
    """Rows of the per-box table (a pandas DataFrame) that are the injected errors.

    Returns ``{"rows": {kind: [row positions]}, "drop_scores": [...], "drop_negatives": [...],
    "given_negatives": [row positions]}``: for flip/shift/spawn the corrupted given box's row;
    for a drop the best unmatched prediction covering the dropped box (IoU >= 0.5; None when no
    prediction does), the negatives of drops being each image's best unmatched prediction that
    covers no dropped box.
    """
    given = boxes[boxes["source"] == "given"]
    by_ann = dict(zip(given["annotation_id"].astype(np.int64), given.index))
    rows: dict[str, list] = {k: [] for k in PROTOCOL_KINDS}
    corrupted = set()
    for r in records:
        if r["protocol_kind"] == "drop":
            continue
        corrupted.add(int(r["annotation_id"]))
        if int(r["annotation_id"]) in by_ann:
            rows[r["protocol_kind"]].append(by_ann[int(r["annotation_id"])])
    predicted = boxes[boxes["source"] == "predicted"]
    by_image = {i: g for i, g in predicted.groupby("image_id")}
    drops_of: dict[int, list] = {}
    for r in records:
        if r["protocol_kind"] == "drop":
            drops_of.setdefault(int(r["image_id"]), []).append(_xyxy(r["original_bbox"]))
    drop_rows, drop_negatives = [], []
    for image_id, g in by_image.items():
        xyxy = g[["x1", "y1", "x2", "y2"]].to_numpy(float)
        dropped = np.asarray(drops_of.get(image_id, []), float).reshape(-1, 4)
        iou = _iou_xyxy(dropped, xyxy) if dropped.size else np.zeros((0, len(g)))
        for d in range(len(dropped)):
            hits = np.flatnonzero(iou[d] >= COVER_IOU)
            drop_rows.append(g.index[hits[np.argmax(g["score"].to_numpy()[hits])]] if hits.size else None)
        elsewhere = ~(iou >= COVER_IOU).any(axis=0) if dropped.size else np.ones(len(g), bool)
        if elsewhere.any():
            drop_negatives.append(g.index[np.flatnonzero(elsewhere)[np.argmax(g["score"].to_numpy()[elsewhere])]])
    drop_rows += [None] * sum(len(v) for k, v in drops_of.items() if k not in by_image)
    rows["drop"] = drop_rows
    negatives = [i for a, i in by_ann.items() if a not in corrupted]
    return {"rows": rows, "drop_negatives": drop_negatives, "given_negatives": negatives}


def score_boxes(boxes, records: list[dict], *, exclude_images: set[int], reps: int) -> dict[str, Any]:
    """Per-box AUROC (with interval) and positives per kind, each signal's own AUROC, P@N and the
    confusion of the kind named against the kind injected."""
    pos = box_positives(boxes, records)
    neg_given = [i for i in pos["given_negatives"] if int(boxes.at[i, "image_id"]) not in exclude_images]
    neg_drop = [i for i in pos["drop_negatives"] if int(boxes.at[i, "image_id"]) not in exclude_images]
    score = boxes["score"].to_numpy(float)
    out: dict[str, Any] = {"kinds": {}, "negatives_given": len(neg_given), "negatives_drop": len(neg_drop)}
    for kind in PROTOCOL_KINDS:
        rows = pos["rows"][kind]
        found = [i for i in rows if i is not None]
        p = np.array([score[i] if i is not None else 0.0 for i in rows])
        negs = neg_drop if kind == "drop" else neg_given
        n = score[negs]
        column = SIGNALS[NAMED[kind]]
        sig = boxes[column].to_numpy(float)
        own = (auroc(np.nan_to_num(np.array([sig[i] if i is not None else np.nan for i in rows]), nan=-1e9),
                     np.nan_to_num(sig[negs], nan=-1e9)))
        out["kinds"][kind] = {"positives": len(rows), "predicted": len(found), "auroc": auroc(p, n),
                              "interval": auroc_interval(p, n, reps), f"auroc_{column}": own}
    # P@N over the whole table, N = every injected error that has a row.
    hits = {i for k in PROTOCOL_KINDS for i in pos["rows"][k] if i is not None}
    n_pos = sum(len(pos["rows"][k]) for k in PROTOCOL_KINDS)
    top = boxes.index[:n_pos]
    out["precision_at_n"] = {"n": n_pos, "precision": float(np.mean([i in hits for i in top])) if n_pos else None}
    out["confusion"] = _box_confusion(boxes, pos["rows"])
    out["signals"] = _candidate_signals(boxes, pos["rows"], neg_given)
    return out


def _candidate_signals(boxes, rows: dict[str, list], negatives: list) -> dict[str, dict[str, float]]:
    """Per kind of given-box error, the per-box AUROC of each candidate signal (higher = more
    likely wrong) the box table can give: how the default signals were chosen (on one seed)."""
    b = boxes
    given = np.stack([b[c].to_numpy(float) for c in ("x1", "y1", "x2", "y2")], axis=1)
    best = np.stack([b[f"best_{c}"].to_numpy(float) for c in ("x1", "y1", "x2", "y2")], axis=1)
    lt, rb = np.maximum(given[:, :2], best[:, :2]), np.minimum(given[:, 2:], best[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    claim_iou = np.nan_to_num(inter / (area(given) + area(best) - inter), nan=0.0)
    p_given, p_other = b["p_given"].to_numpy(float), b["p_other"].to_numpy(float)
    eps = 1e-6
    candidates = {
        "flip": {"(1 - p_given - p_background) - p_given (default)":
                 1 - b["p_background"].to_numpy(float) - 2 * p_given,
                 "p_other - p_given": p_other - p_given,
                 "log p_other - log p_given": np.log(p_other + eps) - np.log(p_given + eps),
                 "1 - p_given": 1 - p_given, "loss_cls": b["loss_cls"].to_numpy(float),
                 "loss_cls + loss_box_reg": (b["loss_cls"] + b["loss_box_reg"]).to_numpy(float)},
        "shift": {"1 - refined_iou (default)": 1 - b["refined_iou"].to_numpy(float),
                  "1 - IoU with its best box": 1 - claim_iou,
                  "loss_box_reg": b["loss_box_reg"].to_numpy(float),
                  "loss_cls + loss_box_reg": (b["loss_cls"] + b["loss_box_reg"]).to_numpy(float)},
        "spawn": {"p_background (default)": b["p_background"].to_numpy(float),
                  "1 - p_given": 1 - p_given,
                  "1 - best box IoU x score": 1 - claim_iou * np.nan_to_num(b["best_score"].to_numpy(float)),
                  "loss_cls + loss_box_reg": (b["loss_cls"] + b["loss_box_reg"]).to_numpy(float)},
    }
    out = {}
    for kind, signals in candidates.items():
        idx = [i for i in rows[kind] if i is not None]
        out[kind] = {name: auroc(np.nan_to_num(v[idx], nan=-1e9), np.nan_to_num(v[negatives], nan=-1e9))
                     for name, v in signals.items()}
    return out


def _box_confusion(boxes, rows: dict[str, list]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for kind in PROTOCOL_KINDS:
        counts = {k: 0 for k in (*KIND_ORDER, "not named", "no row")}
        for i in rows[kind]:
            if i is None:
                counts["no row"] += 1
            elif not boxes.at[i, "named"]:
                counts["not named"] += 1
            else:
                counts[boxes.at[i, "kind"]] += 1
        table[kind] = counts
    return table


# ---- per image ----------------------------------------------------------------------------------
def score_images(images, records: list[dict], *, exclude_images: set[int], reps: int) -> dict[str, Any]:
    """Per-image AUROC per kind (the ranking's order), P@N, and the kind named on the images
    with one injected error (in the top N, and all of them)."""
    kinds_of: dict[int, list[str]] = {}
    for r in records:
        kinds_of.setdefault(int(r["image_id"]), []).append(r["protocol_kind"])
    ids = images["image_id"].to_numpy(np.int64)
    order_score = -images["rank"].to_numpy(float)
    clean = np.array([i not in kinds_of and i not in exclude_images for i in ids])
    out: dict[str, Any] = {"kinds": {}, "negatives": int(clean.sum())}
    alt = {"box_score": images["box_score"].to_numpy(float),
           "combined_score": images["combined_score"].to_numpy(float),
           "cleanlab": 1 - images["quality_score"].to_numpy(float)}
    for kind in (*PROTOCOL_KINDS, "any"):
        has = np.array([(kind == "any" and i in kinds_of) or kind in kinds_of.get(i, []) for i in ids])
        entry = {"positives": int(has.sum()), "auroc": auroc(order_score[has], order_score[clean]),
                 "interval": auroc_interval(order_score[has], order_score[clean], reps)}
        for name, v in alt.items():
            if not np.isnan(v).all():
                entry[f"auroc_{name}"] = auroc(np.nan_to_num(v[has], nan=-1), np.nan_to_num(v[clean], nan=-1))
        out["kinds"][kind] = entry
    n = len(kinds_of)
    bad = np.array([i in kinds_of for i in ids])
    out["precision_at_n"] = {"n": n, "precision": float(bad[:n].mean()) if n else None}
    single = np.array([len(kinds_of.get(i, [])) == 1 for i in ids])
    named = images["issue_kind"].to_numpy(object)
    right = np.array([single[j] and named[j] == NAMED[kinds_of[ids[j]][0]] for j in range(ids.size)])
    out["kind_right"] = {
        "top_n_single": int(single[:n].sum()), "top_n_right": int(right[:n].sum()),
        "all_single": int(single.sum()), "all_right": int(right.sum())}
    out["confusion_single"] = {
        k: {name: int(sum(1 for j in range(ids.size) if single[j] and kinds_of[ids[j]][0] == k
                          and (named[j] or "none") == name))
            for name in (*KIND_ORDER, "none")} for k in PROTOCOL_KINDS}
    return out


# ---- the whole report ---------------------------------------------------------------------------
def report(out_dir: Path, *, exclude: Path | None = None, bootstrap: int = 1000) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from kfold_ray._api import report_run

    run_dir = out_dir / "run"
    records = json.loads((out_dir / "data" / "injected_errors.json").read_text())
    result = report_run(run_dir, top=30)
    images = result.rankings["out_of_fold"].to_pandas()
    boxes = pq.read_table(run_dir / "box_issues.parquet").to_pandas()
    excluded = _excluded_ids(exclude, images) if exclude else set()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train = out_dir / "train_seconds.json"
    results = {
        "images": int(len(images)), "given_boxes": int((boxes["source"] == "given").sum()),
        "injected": {k: sum(r["protocol_kind"] == k for r in records) for k in PROTOCOL_KINDS},
        "pooled": {k: metrics.get("pooled", {}).get(k) for k in ("AP", "AP50")},
        "train_seconds": json.loads(train.read_text())["seconds"] if train.is_file() else None,
        "excluded_negative_images": sorted(excluded),
        "per_box": score_boxes(boxes, records, exclude_images=excluded, reps=bootstrap),
        "per_image": score_images(images, records, exclude_images=excluded, reps=bootstrap),
    }
    _print(results)
    return results


def _excluded_ids(path: Path, images) -> set[int]:
    """The image ids named in `path`: one file name a line (the json's or its base name), `#`
    starts a comment. A name that is no image of the run stops the scoring: a typo would
    otherwise leave that image among the negatives without a word."""
    by_name = dict(zip(images["file_name"], images["image_id"]))
    base = {Path(n).name: i for n, i in by_name.items()}
    ids = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        image_id = by_name.get(name, base.get(Path(name).name))
        if image_id is None:
            raise SystemExit(f"{path}: line {number}: {name!r} is no image of this run")
        ids.add(int(image_id))
    return ids


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _print(r: dict[str, Any]) -> None:
    print(f"images {r['images']}, given boxes {r['given_boxes']}, injected {r['injected']}, "
          f"pooled AP {_fmt(r['pooled']['AP'])} / AP50 {_fmt(r['pooled']['AP50'])}")
    b, im = r["per_box"], r["per_image"]
    print("\n| kind | positives | per-box AUROC [95% CI] | own signal | per-image AUROC [95% CI] |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k in PROTOCOL_KINDS:
        e, i = b["kinds"][k], im["kinds"][k]
        own = next(v for n, v in e.items() if n.startswith("auroc_"))
        ci = lambda x: "" if not x["interval"] else f" [{x['interval'][0]:.3f}, {x['interval'][1]:.3f}]"  # noqa: E731
        print(f"| {k} | {e['positives']} | {_fmt(e['auroc'])}{ci(e)} | {_fmt(own)} | "
              f"{_fmt(i['auroc'])}{ci(i)} |")
    a = im["kinds"]["any"]
    print(f"| any | {a['positives']} images | | | {_fmt(a['auroc'])} |")
    print(f"\nper box P@{b['precision_at_n']['n']}: {_fmt(b['precision_at_n']['precision'])}; "
          f"per image P@{im['precision_at_n']['n']}: {_fmt(im['precision_at_n']['precision'])}")
    print("per-image alternatives (any error): " + ", ".join(
        f"{k[6:]} {_fmt(v)}" for k, v in a.items() if k.startswith("auroc_")))
    kr = im["kind_right"]
    print(f"kind named right, single-error images: top N {kr['top_n_right']}/{kr['top_n_single']}, "
          f"all {kr['all_right']}/{kr['all_single']}")
    print("\nconfusion per box (injected -> named):")
    for k, row in b["confusion"].items():
        print(f"  {k:6} " + ", ".join(f"{n} {c}" for n, c in row.items() if c))
    print("candidate per-box signals (AUROC against every uncorrupted given box):")
    for k, row in b["signals"].items():
        print(f"  {k:6} " + ", ".join(f"{n} {_fmt(v)}" for n, v in row.items()))
    print("confusion per image, single-error images (injected -> named):")
    for k, row in im["confusion_single"].items():
        print(f"  {k:6} " + ", ".join(f"{n} {c}" for n, c in row.items() if c))
