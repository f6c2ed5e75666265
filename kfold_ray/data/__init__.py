"""Stage 1 and 2: the dataset, loaded and checked up front, and the fold plan.

In: a COCO annotations json and its images (paths or URIs). Out: a `CocoDataset` (numpy arrays
in json order, cleanlab's labels) and a `FoldPlan` (the fold that holds out each image).

    _dataset     load_coco: CocoDataset, its fingerprint, reading an image through any store
    validate/    every check of the json, the image files and the masks (nothing is reserved before)
    _fold_plan   FoldPlan: a partition of the images, saved to and read back from folds.json
    _split       make_fold_plan: kfold, group, stratified, or any scikit-learn splitter
    _example     the built-in example: handwritten digits with recorded label errors
"""
