"""Stage 3: the folds run on the cluster, and their predictions come back into one table.

In: the dataset, the fold plan, a FoldBackend and the run's storage. Out: the stitched
prediction table (dataset order, each image predicted once, by the fold that held it out).

    _state     the run dir's state: created, fingerprinted, reopened on --resume, finished
    _driver    one fold actor per fold; retries; resumes from checkpoints and persisted parts
    _actor     the fold actor: runs the backend, streams its events (a Ray streaming generator)
    _workers   a fold of several Ray Train workers (DDP), their events forwarded by the actor
    _progress  one line per fold on the driver
    _reduce    the reducer: persists batches as they arrive (_parts), then stitches (_stitch)
"""
