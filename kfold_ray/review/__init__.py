"""Stage 6: from suspects to corrected labels.

In: a finished run dir (its ranking, predictions, box losses and dataset). Out: files the review
tools open, and, from what the reviewer corrected, the dataset's corrected COCO json with a table
of every change.

    _suspects             the worst images as plain records; what each box carries (the one
                          place a per-box ranking plugs in: `_suspects.box_signals`)
    _export_fiftyone      a folder `fo.Dataset.from_dir` reads (ground_truth, predictions, scores)
    _export_labelstudio   Label Studio tasks (pre-annotations, predictions) and their config
    _export_coco          the suspects as a COCO subset, ids kept (CVAT's COCO 1.0 import)
    _reviewed             a review, whatever tool it came from
    _fixes_labelstudio    reads a Label Studio JSON export
    _fixes_coco           reads a COCO json from CVAT, FiftyOne or our own COCO subset
    _apply                matches the reviewed boxes back (by id, else IoU) and edits the json
    _coco_document        the dataset's json as its own objects; atomic JSON files
    _commands             export_run and apply_fixes, end to end (what kfold_ray._api exposes)
"""
