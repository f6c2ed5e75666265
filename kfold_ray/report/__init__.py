"""Stage 5: likely label errors, ranked, explained, and shown on a page.

In: a finished run dir (its predictions, box losses and dataset). Out: label_issues.parquet/.csv
(per image), box_issues.parquet (per box) and report/index.html.

    _finished_run  a run dir opened for the report, wherever it lies
    _pairs         flat given boxes and predictions, and their pairs a chunk of images at a time
    _scores        one pass over the pairs: cleanlab's ObjectLab scores and what the box signals need
    _objectlab     cleanlab's ObjectLab scores per image (the reference _scores is tested against)
    _calibrate     cross-fitted per-class score calibration (optional)
    _box_signals   per box, one signal per kind of error, from the fold model that held it out
    _box_issues    the per-box ranking (kinds combined by rank) and each image's worst box
    _rank          the per-image ranking: cleanlab's scores with the loss and box signals
    _injected      known, injected errors and how well a ranking finds them
    _page, _overlays  the page: plots, suspect cards, overlays of given and predicted boxes
"""
