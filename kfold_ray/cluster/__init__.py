"""The Ray cluster a run goes on: joined like Ray does, and sized for the folds.

In: an address (or none) and the run's CVConfig. Out: `ClusterInfo` (what the cluster offers)
and `FoldLaunch` (each fold's GPUs, CPUs and workers), with the lines that tell the user.

    _connect  join: an address, RAY_ADDRESS, the cluster on this node, or a new local one
    _plan     each fold's resources, and how the folds map onto the cluster in waves
"""
