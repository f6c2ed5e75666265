"""Every number the ranking needs from the (given box, prediction) pairs, in one pass over them
(`kfold_ray.report._pairs`), and cleanlab's ObjectLab scores from it, flat.

`kfold_ray.report._objectlab` computes cleanlab's scores per image from its ``auxiliary_inputs``
(tests check it against cleanlab's own functions); this module computes the same numbers for
every box of the dataset at once, a chunk of images at a time (tests check it against
`_objectlab`), which is what makes the ranking of COCO train take about a minute in ~1 GB.

Per prediction: ``best_iou`` (with any given box), ``near_same`` (largest similarity to a
given box of its class; -inf: none), ``best_same_iou``/``best_same_label`` (its best given box
of its class, for cleanlab's per-class AP). Per given box: ``close_other`` (largest similarity
to a confident prediction of another class), ``near_conf`` (largest similarity to an
overlapping same-class prediction scoring > 0.5), ``conflict`` (another class's given box on
it), and for `kfold_ray.report._box_signals`: ``claim``/``claim_iou`` (its best box: the
prediction of largest IoU x raw score among those overlapping it), ``cover_same``/
``cover_other``/``cover_other_class`` (best raw score of a prediction of its class / another
class with IoU >= 0.5). ``floor``: cleanlab's ``min_possible_similarity``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._pairs import FlatBoxes, given_pairs, pair_chunks

__all__ = ["PairStats", "cleanlab_scores", "pair_stats"]

COVER_IOU = 0.5


@dataclass
class PairStats:
    best_iou: np.ndarray
    near_same: np.ndarray
    best_same_iou: np.ndarray
    best_same_label: np.ndarray
    close_other: np.ndarray
    near_conf: np.ndarray
    conflict: np.ndarray
    claim: np.ndarray
    claim_iou: np.ndarray
    cover_same: np.ndarray
    cover_other: np.ndarray
    cover_other_class: np.ndarray
    floor: float


def pair_stats(flat: FlatBoxes, probs: np.ndarray) -> PairStats:
    """One pass over every pair. ``probs`` (P,): the scores cleanlab reads (calibrated or raw);
    the claims and covers read the raw ``flat.p_score``."""
    from cleanlab.internal.constants import (
        ALPHA,
        EUC_FACTOR,
        HIGH_PROBABILITY_THRESHOLD,
        LABEL_OVERLAP_THRESHOLD,
        LOW_PROBABILITY_THRESHOLD,
    )

    G, P = flat.g_image.size, flat.p_image.size
    ninf = lambda n: np.full(n, -np.inf)  # noqa: E731
    s = PairStats(best_iou=np.zeros(P, np.float32), near_same=ninf(P), best_same_iou=np.full(P, -1.0),
                  best_same_label=np.zeros(P, np.int64 if G >= 2**31 else np.int32), close_other=ninf(G), near_conf=ninf(G),
                  conflict=np.zeros(G, bool), claim=np.full(G, -1, np.int64), claim_iou=np.zeros(G),
                  cover_same=np.zeros(G), cover_other=np.zeros(G),
                  cover_other_class=np.full(G, -1, np.int64), floor=1.0)
    for c in pair_chunks(flat):
        g, p, iou = c.g, c.p, c.iou
        # centre distance as cleanlab computes it (float64 centres of each box)
        d = (c.g_box[:, :2] + c.g_box[:, 2:]) / 2 - (c.p_box[:, :2] + c.p_box[:, 2:]) / 2
        sim = iou * ALPHA + (1 - ALPHA) * np.exp(-np.sqrt(d[:, 0] ** 2 + d[:, 1] ** 2) * EUC_FACTOR)
        del d
        nonzero = sim[sim != 0]
        if nonzero.size:
            s.floor = min(s.floor, float(nonzero.min()))
        same = flat.g_class[g] == flat.p_class[p]
        prob = probs[p]
        # per prediction
        np.maximum.at(s.best_iou, p, iou.astype(np.float32))
        np.maximum.at(s.near_same, p[same], sim[same])
        _best_same(s, g[same], p[same], iou[same])
        # per given box (its pairs are contiguous)
        gs = c.seg_g
        s.close_other[gs] = c.per_given_max(np.where(~same & (prob > HIGH_PROBABILITY_THRESHOLD), sim, -np.inf))
        s.near_conf[gs] = c.per_given_max(
            np.where(same & (prob > LOW_PROBABILITY_THRESHOLD) & (iou > 0), sim, -np.inf))
        _claims(s, c, flat.p_score[p], same, flat.p_class)
    for pairs in given_pairs(flat):
        hit = (pairs.iou >= LABEL_OVERLAP_THRESHOLD) & (flat.g_class[pairs.a] != flat.g_class[pairs.b])
        s.conflict[pairs.a[hit]] = True
    return s


def _best_same(s: PairStats, g: np.ndarray, p: np.ndarray, iou: np.ndarray) -> None:
    """Per prediction: its largest IoU with a given box of its class, and the first (lowest
    index) such box, as cleanlab's argmax picks it."""
    if not p.size:
        return
    np.maximum.at(s.best_same_iou, p, iou)
    at_best = iou == s.best_same_iou[p]
    # Each image lies in one chunk: its predictions are a range, and no other chunk has them.
    lo, none = int(p.min()), np.iinfo(np.int64).max
    first = np.full(int(p.max()) - lo + 1, none)
    np.minimum.at(first, p[at_best] - lo, g[at_best])
    found = np.flatnonzero(first != none)
    s.best_same_label[lo + found] = first[found]


def _claims(s: PairStats, c, raw: np.ndarray, same: np.ndarray, p_class: np.ndarray) -> None:
    g, p, iou, gs = c.g, c.p, c.iou, c.seg_g
    weight = iou * raw
    best = c.per_given_max(weight)
    is_best = (weight == np.repeat(best, np.diff(np.r_[c.seg, g.size]))) & (weight > 0)
    first = np.flatnonzero(is_best)
    if first.size:
        first = first[np.r_[True, g[first][1:] != g[first][:-1]]]
        s.claim[g[first]] = p[first]
        s.claim_iou[g[first]] = iou[first]
    covers = iou >= COVER_IOU
    s.cover_same[gs] = c.per_given_max(np.where(covers & same, raw, 0.0))
    other = np.where(covers & ~same, raw, 0.0)
    s.cover_other[gs] = c.per_given_max(other)
    top = np.flatnonzero(other > 0)
    if top.size:  # the class of the best other-class cover: the last write of a sort wins
        top = top[np.argsort(other[top], kind="stable")]
        s.cover_other_class[g[top]] = p_class[p[top]]


# ---- cleanlab's scores from the pair stats ---------------------------------------------------------
def cleanlab_scores(flat: FlatBoxes, probs: np.ndarray, s: PairStats, num_classes: int
                    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(pooled subtype scores per image, quality per image, is_issue per image), as
    `kfold_ray.report._objectlab` computes them (cleanlab's defaults)."""
    from cleanlab.internal.constants import (
        AP_SCALE_FACTOR,
        BADLOC_THRESHOLD_FACTOR,
        HIGH_PROBABILITY_THRESHOLD,
        OVERLOOKED_THRESHOLD_FACTOR,
        SWAP_THRESHOLD_FACTOR,
    )

    from ._objectlab import label_quality_scores, per_class_ap_flat

    n = flat.num_images
    candidate = (probs >= HIGH_PROBABILITY_THRESHOLD) & (s.best_iou <= 0)
    has_same = s.near_same > -np.inf
    overlooked = np.where(candidate, np.where(has_same, s.near_same, s.floor * (1 - probs)), np.nan)
    swap = np.where(s.close_other > -np.inf, np.maximum(s.floor, 1 - s.close_other), 1.0)
    swap = np.where(s.conflict, s.floor, swap)
    badloc = np.where(s.near_conf > -np.inf, s.near_conf, 1.0)
    per_box = {"overlooked": (overlooked, flat.p_image), "swapped": (swap, flat.g_image),
               "badly_located": (badloc, flat.g_image)}
    pooled = {k: _softmin_per_image(v, img, n) for k, (v, img) in per_box.items()}
    quality = label_quality_scores(pooled)
    num_gts = np.bincount(flat.g_class, minlength=num_classes)
    threshold = per_class_ap_flat(flat.p_class, probs, s.best_same_iou, s.best_same_label,
                                  num_gts, num_classes) * AP_SCALE_FACTOR
    issue = np.zeros(n, dtype=bool)
    for (values, img), cls, factor in (
            (per_box["overlooked"], flat.p_class, OVERLOOKED_THRESHOLD_FACTOR),
            (per_box["badly_located"], flat.g_class, BADLOC_THRESHOLD_FACTOR),
            (per_box["swapped"], flat.g_class, SWAP_THRESHOLD_FACTOR)):
        flagged = np.where(np.isnan(values), 1.0, values) <= threshold[cls] * factor
        issue[img[flagged]] = True
    return pooled, quality, issue


def _softmin_per_image(values: np.ndarray, image: np.ndarray, n: int) -> np.ndarray:
    """cleanlab's ``pool_box_scores_per_image``: per image the softmin (its temperature) of
    its non-NaN box scores; 1.0 for an image without any."""
    from cleanlab.object_detection.rank import _get_valid_subtype_score_params

    temperature = _get_valid_subtype_score_params(None, None, None, None)[3]
    ok = ~np.isnan(values)
    v, img = values[ok], image[ok]
    low = np.full(n, np.inf)
    np.minimum.at(low, img, v)
    w = np.exp((low[img] - v) / temperature)
    total = np.bincount(img, weights=w, minlength=n)
    out = np.ones(n)
    has = total > 0
    out[has] = np.bincount(img, weights=w * v, minlength=n)[has] / total[has]
    return out
