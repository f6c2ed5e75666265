"""The run's storage: where everything that outlives a process goes (a local folder or a URI).

In: paths and URIs (``s3://``, ``gs://``, ``hdfs://``, ``file://``; anything ``pyarrow.fs`` opens).
Out: `Storage` (one set of calls for every store), atomic writes, and the names of the run dir.

    _storage      Storage over pyarrow.fs: read, write (atomically), list, copy up and down
    _atomic       local writes to a temporary name, flushed and renamed
    _locations    joining and showing locations, one line for an unreachable store
    _rundir       the run dir's layout: the one place that names its files
    _checkpoints  a fold's scratch folder mirrored to the run dir as checkpoints appear
"""
