"""Stage "report", part 3: a self-contained page a person can look at.

`write_report` writes ``RUN_DIR/report/``:

    index.html              the page: one file that can be mailed or moved alone. Its pictures
                            are embedded (data: URIs): the plots as they are, each suspect's
                            overlay as a thumbnail of at most `THUMB_SIDE` px and
                            `THUMB_MAX_BYTES` (linked to its full-size file). No script, no
                            network, every text HTML-escaped.
    ap.png                  per-fold, pooled (and in-sample) COCO AP and AP50
    quality.png             distribution of cleanlab's label quality scores
    suspects/rank_0001.png  one overlay per suspect image, worst first, full size

The overlays come from `kfold_ray.report._overlays`; matplotlib (Agg) draws the plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

from ..storage._atomic import atomic_path, write_text
from ._injected import INJECTED_ERRORS, injected_errors_of, score_against_injected
from ._box_issues import BOX_KINDS
from ._overlays import CONCERNED, GIVEN, PRED_MIN_SCORE, PREDICTED, draw_overlay

if TYPE_CHECKING:
    from ._finished_run import FinishedRun

__all__ = ["write_report"]

REPORT_DIR = "report"
#: A suspect's thumbnail on the page: at most this many px on its long side, and this many bytes
#: (20 suspects stay under ~2 MB: a page that can be mailed).
THUMB_SIDE = 384
THUMB_MAX_BYTES = 100_000
KIND_TEXT = {"overlooked": "overlooked object", "swapped": "swapped class",
             "badly_located": "badly located box", "spurious": "spurious box",
             "": "no specific problem found"}


def write_report(run: FinishedRun, rankings: dict[str, pa.Table], *, top: int = 20) -> Path:
    """Write the report page of a finished run; return the path of ``index.html``.

    Args:
        run: the finished run (`kfold_ray.report._finished_run.read_finished_run`).
        rankings: ``{"out_of_fold": table}`` and, where the run has one, ``"in_sample": table``:
            tables from `kfold_ray.report._rank.rank_label_issues`.
        top: how many suspects (worst first) to show as overlays.
    """
    if "out_of_fold" not in rankings:
        raise ValueError("rankings must hold the out-of-fold ranking ('out_of_fold')")
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise ValueError(f"top must be an integer >= 0, got {top!r}")
    import matplotlib

    matplotlib.use("Agg", force=False)
    out = run.run_dir / REPORT_DIR
    (out / "suspects").mkdir(parents=True, exist_ok=True)
    _plot_ap(out / "ap.png", run.metrics)
    _plot_quality(out / "quality.png", rankings)
    suspects = rankings["out_of_fold"].slice(0, top).to_pylist()
    detections = _read_detections(run.run_dir / "predictions.parquet",
                                  [s["image_index"] for s in suspects])
    written = set()
    for s in suspects:
        name = f"rank_{s['rank']:04d}.png"
        draw_overlay(out / "suspects" / name, run.dataset, s, detections.get(s["image_index"]))
        written.add(name)
    for stale in (out / "suspects").glob("rank_*.png"):
        if stale.name not in written:
            stale.unlink()
    page = _page(run, rankings, suspects, out)
    write_text(out / "index.html", page)  # last: its presence means the folder is whole
    return out / "index.html"


def _embedded(path: Path, *, thumbnail: bool = False) -> str:
    """The picture at ``path`` as a data: URI; a thumbnail (`THUMB_SIDE`, `THUMB_MAX_BYTES`:
    PNG when it fits, else JPEG, smaller until it fits) when asked."""
    data = path.read_bytes()
    if not thumbnail:
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        side = THUMB_SIDE
        while True:
            small = im.copy()
            small.thumbnail((side, side), Image.LANCZOS)
            for fmt, options in (("PNG", {"optimize": True}), ("JPEG", {"quality": 85})):
                buffer = io.BytesIO()
                small.save(buffer, format=fmt, **options)
                if buffer.tell() <= THUMB_MAX_BYTES or side <= 64:
                    kind = "png" if fmt == "PNG" else "jpeg"
                    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
            side = int(side * 0.8)


# ---- data -------------------------------------------------------------------------------------------
def _read_detections(path: Path, image_indices: Sequence[int]) -> dict[int, dict[str, np.ndarray]]:
    """Per image index asked for: the predicted boxes (float (M, 4)), classes and scores."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not image_indices:
        return {}
    table = pq.read_table(path, columns=["image_index", "class_index", "x1", "y1", "x2", "y2", "score"],
                          filters=[("image_index", "in", list(map(int, image_indices)))])
    img = table.column("image_index").to_numpy()
    out = {}
    for i in np.unique(img):
        rows = table.filter(pc.equal(table.column("image_index"), int(i)))
        out[int(i)] = {
            "boxes": np.stack([rows.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1),
            "classes": rows.column("class_index").to_numpy(),
            "scores": rows.column("score").to_numpy(),
        }
    return out


# ---- plots --------------------------------------------------------------------------------------------
def _fold_stats(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(row name, stats)] for each fold, pooled and in-sample, as far as metrics.json has them."""
    folds = metrics.get("folds") or metrics.get("per_fold") or {}
    rows = [(f"fold {f}", s) for f, s in sorted(folds.items(), key=lambda kv: int(kv[0]))
            if isinstance(s, dict)]
    if isinstance(metrics.get("pooled"), dict):
        rows.append(("pooled out-of-fold", metrics["pooled"]))
    if isinstance(metrics.get("in_sample"), dict):
        rows.append(("in-sample", metrics["in_sample"]))
    return rows


def _stat(stats: dict[str, Any], key: str) -> float:
    v = stats.get(key)
    return float(v) if isinstance(v, (int, float)) and v >= 0 else math.nan


def _plot_ap(path: Path, metrics: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    rows = _fold_stats(metrics)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.2), dpi=100)
    x = np.arange(len(rows))
    for offset, key, colour in ((-0.2, "AP", "#4c72b0"), (0.2, "AP50", "#dd8452")):
        ax.bar(x + offset, [_stat(s, key) for _, s in rows], width=0.4, label=key, color=colour)
    ax.set_xticks(x, [name for name, _ in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("COCO box AP")
    ax.legend(fontsize=8, ncol=2, loc="upper right")
    ax.set_title("AP of each fold's model on its held-out images", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _plot_quality(path: Path, rankings: dict[str, pa.Table]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.2), dpi=100)
    bins = np.linspace(0.0, 1.0, 41)
    oof = rankings["out_of_fold"].column("quality_score").to_numpy()
    ax.hist(oof, bins=bins, color="#4c72b0", alpha=0.8, label="out-of-fold")
    if "in_sample" in rankings:
        ins = rankings["in_sample"].column("quality_score").to_numpy()
        ax.hist(ins, bins=bins, histtype="step", color="#c44e52", linewidth=1.5, label="in-sample")
    ax.set_xlabel("label quality score (low = likely mislabelled)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


# ---- the page -----------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #ccc;border-radius:4px;padding:8px;width:520px}
.card img{display:block;max-width:100%;height:auto;image-rendering:pixelated}
.card p{margin:.3em 0;font-size:.88em}.kind{font-weight:bold;color:#b00020}
.legend span{display:inline-block;margin-right:1.4em}
.card.injected{border:3px solid #7b2cbf}.injected-tag{font-weight:bold;color:#7b2cbf}
.sw{display:inline-block;width:26px;height:0;vertical-align:middle;margin-right:4px}
""".strip()


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) or v < 0 else f"{v:.{digits}f}"
    return "n/a" if v is None else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join(
        "<tr>" + "".join(
            f'<td class="n">{_e(_fmt(c))}</td>' if isinstance(c, (int, float)) else f"<td>{_e(c)}</td>"
            for c in row) + "</tr>"
        for row in rows)
    return f"<table>{head}{body}</table>"


def _page(run: FinishedRun, rankings: dict[str, pa.Table], suspects: list[dict[str, Any]],
          out: Path) -> str:
    injected = injected_errors_of(run.dataset)  # the example's answer key, when the dataset has one
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e('kfold-ray label issues: ' + run.run_dir.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Label-issue report: {_e(run.run_dir.name)}</h1>",
        _summary_section(run, rankings),
        _injected_section(rankings, injected),
        _ap_section(run, out),
        _quality_section(rankings, out),
    ]
    if "in_sample" in rankings:
        parts.append(_comparison_section(run, rankings, len(suspects)))
    parts += [_boxes_section(run), _suspects_section(run, rankings, suspects, out, injected),
              "</body></html>"]
    return "\n".join(parts) + "\n"


def _summary_section(run: FinishedRun, rankings: dict[str, pa.Table]) -> str:
    cfg = run.config.get("config", {}) if isinstance(run.config.get("config"), dict) else {}
    train = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
    ds = run.dataset
    seconds = run.metrics.get("seconds")
    rows = [
        ("annotations", str(ds.annotations_path)),
        ("images", f"{ds.num_images} images, {int((~ds.iscrowd).sum())} boxes, {ds.num_classes} classes"),
        ("folds", f"k = {cfg.get('k', '?')} ({cfg.get('split', '?')} split, seed {cfg.get('seed', '?')})"),
        ("model", str(train.get("model", "?"))),
        ("overrides", " ".join(map(str, train.get("overrides", []))) or "none"),
        ("run time", f"{seconds:.0f} s" if isinstance(seconds, (int, float)) else "?"),
        ("started / finished", f"{run.state.get('started', '?')} / {run.state.get('finished', '?')}"),
        ("cleanlab", str(run.config.get("versions", {}).get("cleanlab", "?"))),
    ]
    oof = rankings["out_of_fold"]
    flagged = int(np.sum(oof.column("is_issue").to_numpy(zero_copy_only=False)))
    by_signal = oof.column("combined_score").null_count < oof.num_rows
    order = ("their worst box in the per-box ranking (<code>box_score</code>; every box: "
             "<code>box_issues.parquet</code>)" if by_signal else "cleanlab's label quality score")
    return ("<h2>Run</h2>" + _table([], rows)
            + f"<p>cleanlab flags <b>{flagged}</b> of {oof.num_rows} images as likely mislabelled "
              "(out-of-fold predictions, scored once over the whole dataset). Images are ranked by "
              f"{order}. Full ranking: "
              "<code>label_issues.csv</code> / <code>label_issues.parquet</code> in the run dir.</p>")


def _injected_section(rankings: dict[str, pa.Table], injected: list[dict[str, Any]] | None) -> str:
    """How many of the dataset's known (injected) errors the ranking finds; "" without any."""
    if not injected:
        return ""
    oof = score_against_injected(rankings["out_of_fold"], injected)
    rows = [("out-of-fold", oof["in_top_n"], oof["precision"], oof["auroc"])]
    if "in_sample" in rankings:
        ins = score_against_injected(rankings["in_sample"], injected)
        rows.append(("in-sample", ins["in_top_n"], ins["precision"], ins["auroc"]))
    n = oof["n"]
    rows = [(name, f"{found} of {n}", _fmt(p), "n/a" if a is None else _fmt(a)) for name, found, p, a in rows]
    return (f"<h2>Known label errors</h2><p>The dataset lists {n} images with an injected label "
            f"error (<code>{_e(INJECTED_ERRORS)}</code> beside its annotations); their cards below "
            "are framed and tagged <span class=\"injected-tag\">injected error</span>.</p>"
            + _table(["ranking", f"in the top {n}", f"precision@{n}", "AUROC"], rows))


def _ap_section(run: FinishedRun, out: Path) -> str:
    rows = [(name, _stat(s, "AP"), _stat(s, "AP50"), _stat(s, "AP75"), s.get("num_images", "?"),
             s.get("num_detections", "?")) for name, s in _fold_stats(run.metrics)]
    return ("<h2>Detection quality (COCO box AP)</h2>"
            + _table(["", "AP", "AP50", "AP75", "images", "detections"], rows)
            + f'<p><img src="{_embedded(out / "ap.png")}" alt="bar plot of AP and AP50 per fold and pooled"></p>')


def _quality_section(rankings: dict[str, pa.Table], out: Path) -> str:
    oof = rankings["out_of_fold"]
    kinds = oof.column("issue_kind").to_pylist()
    named = (oof.column("named").to_pylist() if "named" in oof.column_names
             else [bool(k) for k in kinds])
    counts = ", ".join(f"{KIND_TEXT[k]}: {sum(1 for x, n in zip(kinds, named) if x == k and n)}"
                       for k in BOX_KINDS)
    return ("<h2>Label quality scores</h2>"
            f'<p><img src="{_embedded(out / "quality.png")}" alt="histogram of label quality scores"></p>'
            f"<p>Images with a problem named (evidence: an outlier, or the model's own call; "
            f"the rest show no sign of one): {_e(counts)}.</p>")


def _comparison_section(run: FinishedRun, rankings: dict[str, pa.Table], top: int) -> str:
    oof, ins = rankings["out_of_fold"], rankings["in_sample"]

    def summary(t: pa.Table) -> list[Any]:
        q = t.column("quality_score").to_numpy()
        return [int(np.sum(t.column("is_issue").to_numpy(zero_copy_only=False))), float(np.median(q)),
                float(np.mean(q < 0.5))]

    pooled, in_ap = run.metrics.get("pooled", {}), run.metrics.get("in_sample", {})
    a, b = summary(oof), summary(ins)
    n = max(1, min(top, oof.num_rows))
    worst = [set(t.column("image_index").to_pylist()[:n]) for t in (oof, ins)]
    shared = len(worst[0] & worst[1])
    rows = [
        ("pooled AP", _stat(pooled, "AP"), _stat(in_ap, "AP") if isinstance(in_ap, dict) else math.nan),
        ("images flagged by cleanlab", a[0], b[0]),
        ("median quality score", a[1], b[1]),
        ("share of images scoring < 0.5", a[2], b[2]),
    ]
    return ("<h2>Out-of-fold vs in-sample</h2>"
            "<p>In-sample predictions come from one model trained on every image, so it has seen the "
            "wrong labels it is asked to judge: a higher AP and fewer suspects are what memorising "
            "the labels looks like.</p>"
            + _table(["", "out-of-fold", "in-sample"], rows)
            + f"<p>{shared} of the top {n} suspects are the same in both rankings.</p>")


def _boxes_section(run: FinishedRun, top: int = 20) -> str:
    """The worst boxes of the per-box ranking (box_issues.parquet), with the kind named on each."""
    import pyarrow.parquet as pq

    path = run.run_dir / "box_issues.parquet"
    if not path.is_file():
        return ""
    rows = pq.read_table(path).slice(0, top).to_pylist()
    names = run.dataset.class_names
    files = run.dataset.file_names
    body = []
    for r in rows:
        suggested = r["suggested_class_index"]
        what = (f"given '{names[r['class_index']]}' (annotation {r['annotation_id']})"
                if r["source"] == "given" else f"predicted '{names[r['class_index']]}' ({r['best_score']:.2f})")
        instead = names[suggested] if r["kind"] == "swapped" and suggested >= 0 else ""
        body.append((r["rank"], KIND_TEXT[r["kind"]] + ("" if r["named"] else " (not named)"),
                     files[r["image_index"]], what, instead,
                     "[" + ", ".join(f"{r[c]:.0f}" for c in ("x1", "y1", "x2", "y2")) + "]", r["score"]))
    return (f"<h2>Top {len(rows)} boxes</h2><p>Every given box and every unmatched prediction is "
            "ranked by the signal of its likeliest kind of error (<code>box_issues.parquet</code>); "
            "a kind is named where its signal is evidence.</p>"
            + _table(["rank", "kind", "image", "box", "model sees", "bbox", "score"], body))


def _suspects_section(run: FinishedRun, rankings: dict[str, pa.Table], suspects: list[dict[str, Any]],
                      out: Path, injected: list[dict[str, Any]] | None = None) -> str:
    in_rank = {}
    if "in_sample" in rankings:
        ins = rankings["in_sample"]
        in_rank = dict(zip(ins.column("image_index").to_pylist(),
                           zip(ins.column("rank").to_pylist(), ins.column("quality_score").to_pylist())))
    legend = ('<p class="legend">'
              f'<span><i class="sw" style="border-top:3px solid rgb{GIVEN}"></i>given box</span>'
              f'<span><i class="sw" style="border-top:3px dashed rgb{PREDICTED}"></i>'
              f"predicted box (out-of-fold, score &ge; {PRED_MIN_SCORE})</span>"
              f'<span><i class="sw" style="border-top:4px solid rgb{CONCERNED}"></i>box concerned</span></p>')
    known: dict[int, list[dict[str, Any]]] = {}
    for e in injected or []:
        known.setdefault(int(e["image_id"]), []).append(e)
    cards = [_card(run, s, out, in_rank.get(s["image_index"]), known.get(int(s["image_id"])))
             for s in suspects]
    return (f"<h2>Top {len(suspects)} suspects</h2>" + legend
            + '<div class="cards">' + "".join(cards) + "</div>")


def _card(run: FinishedRun, s: dict[str, Any], out: Path, in_sample: tuple[int, float] | None,
          injected: list[dict[str, Any]] | None = None) -> str:
    name = f"suspects/rank_{s['rank']:04d}.png"
    lines = [_injected_line(e) for e in injected or []] + [
        f"<p><b>#{s['rank']}</b> · image id {_e(s['image_id'])} · fold {_e(s['fold'])} · "
        f"<code>{_e(s['file_name'])}</code></p>",
        f"<p>quality {_e(_fmt(s['quality_score'], 4))} · flagged: {'yes' if s['is_issue'] else 'no'} · "
        f"<span class=\"kind\">{_e(KIND_TEXT.get(s['issue_kind'], s['issue_kind']))}</span>"
        f"{'' if s.get('named', True) else ' (likeliest kind; not an outlier)'}</p>",
        f"<p>subtype scores: overlooked {_e(_fmt(s['overlooked_score']))}, swapped "
        f"{_e(_fmt(s['swap_score']))}, badly located {_e(_fmt(s['badloc_score']))}</p>",
    ]
    if s.get("combined_score") is not None:
        lines.append(f"<p>signals: worst box {_e(_fmt(s.get('box_score')))}, box loss "
                     f"{_e(_fmt(s['loss_score']))}, unmatched prediction "
                     f"{_e(_fmt(s['unmatched_score']))}</p>")
    if in_sample is not None:
        lines.append(f"<p>in-sample: rank {_e(in_sample[0])}, quality {_e(_fmt(in_sample[1], 4))}</p>")
    for b in json.loads(s["boxes"]):
        lines.append(f"<p>{_e(_describe(b))}</p>")
    alt = f"image {s['image_id']} with given and predicted boxes"
    frame = "card injected" if injected else "card"
    thumb = _embedded(out / name, thumbnail=True)  # the page stands alone; the link: full size
    return (f'<div class="{frame}"><a href="{name}"><img src="{thumb}" alt="{_e(alt)}"></a>'
            + "".join(lines) + "</div>")


def _injected_line(e: dict[str, Any]) -> str:
    """A known error of the image, as the dataset's answer key records it."""
    what = {"missing": "a box was removed (an overlooked object)", "swapped": "the class was swapped",
            "shifted": "the box was shifted", "spurious": "a box was added where there is no object"
            }.get(str(e.get("kind")), str(e.get("kind", "?")))
    ann = f" (annotation {e['annotation_id']})" if e.get("annotation_id") is not None else ""
    return f'<p><span class="injected-tag">injected error</span>: {_e(what)}{_e(ann)}</p>'


def _describe(b: dict[str, Any]) -> str:
    box = "[" + ", ".join(f"{v:g}" for v in b["bbox"]) + "]"
    if b["kind"] == "overlooked":
        return f"overlooked: predicted '{b['class']}' ({b['score']:.2f}) at {box} matches no given box"
    p = b.get("predicted")
    given = f"given '{b['class']}' (annotation {b['annotation_id']}) at {box}"
    if b["kind"] == "swapped":
        if b.get("suggested") and b.get("p_other") is not None:
            return (f"swapped? {given}; the model sees '{b['suggested']['class']}' "
                    f"({b['p_other']:.2f}) rather than '{b['class']}' ({b['p_given']:.2f})")
        said = f"; predicted '{p['class']}' ({p['score']:.2f})" if p else ""
        return f"swapped? {given}{said}"
    if b["kind"] == "spurious":
        bg = f" (background {b['p_background']:.2f})" if b.get("p_background") is not None else ""
        return f"spurious? {given}: the model sees no object there{bg}"
    said = ("; best overlapping prediction at [" + ", ".join(f"{v:g}" for v in p["bbox"])
            + f"] ({p['score']:.2f})") if p else ""
    return f"badly located? {given}{said}"
