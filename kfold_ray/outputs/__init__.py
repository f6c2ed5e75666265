"""Stage 4: the stitched predictions written in the formats the next tools read, and COCO AP.

In: the stitched prediction table, the box losses and the dataset. Out: files in the run dir.

    _writers   predictions.parquet, cleanlab pickles, coco_results.json, categories.json,
               box_losses.parquet
    _pickles   cleanlab's nested lists pickled in slices (COCO-train scale in bounded memory)
    _metrics   per-fold and pooled out-of-fold COCO AP (pycocotools' numbers)
"""
