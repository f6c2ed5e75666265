"""Stage 5: likely label errors, ranked, explained, and shown on a page.

In: a finished run dir (its predictions, box losses and dataset). Out: label_issues.parquet/.csv
and report/index.html.

    _finished_run  a run dir opened for the report, wherever it lies
    _objectlab     cleanlab's ObjectLab scores, computed in numpy, once over all images
    _calibrate     cross-fitted per-class score calibration (optional)
    _issue_kinds   which kind of problem an image has, and on which boxes
    _rank          the ranking: cleanlab's scores with the loss and unmatched signals
    _injected      known, injected errors and how well a ranking finds them
    _page, _overlays  the page: plots, suspect cards, overlays of given and predicted boxes
"""
