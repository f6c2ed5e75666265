"""A fold's checkpoints: written on the node's local disk, kept in the run's storage.

A fold trains in a scratch folder on whatever node Ray placed it (Detectron2 writes checkpoints
and its log there, as it expects a local ``OUTPUT_DIR``). After every checkpoint the new file is
uploaded to ``folds/fold_XXX/`` of the run's storage, then ``last_checkpoint`` naming it (in that
order, so storage never names a checkpoint it does not hold), and the log. A retry, on any node,
first pulls the latest checkpoint and the log from storage, so Detectron2 resumes from it and the
log goes on where it stopped. Only the newest ``keep`` checkpoints are kept, here and there.

While training, uploads run in a background thread (`push_in_background`): a ~330 MB checkpoint
takes seconds to reach S3, and a step loop that waited for it would idle the GPU (and, with DDP,
every rank at the next all-reduce). One upload at a time, in order: the next checkpoint waits
for the previous one's upload (never a step waits). A process killed mid-upload leaves storage
naming the previous checkpoint, which is complete, so a retry resumes from there. `push` uploads
in the caller's thread, after any upload in flight: the fold's final checkpoint is in storage
before the fold predicts anything (a retry would otherwise train again and discard the
predictions already made).

In a fold trained by several workers every rank pulls (each loads the checkpoint itself) and
rank 0 alone writes: Detectron2 saves checkpoints on rank 0 only, and one log is the fold's.

The layout is Detectron2's own (``last_checkpoint`` holds the file name of the latest
``model_*.pth``), so a fold folder copied out of storage works with Detectron2's tools as is.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from ._rundir import LAST_CHECKPOINT
from ._storage import Storage

LAST = LAST_CHECKPOINT
LOG = "log.txt"
_MODEL_RE = re.compile(r"^model_(\d+|final)\.pth$")
# What a process killed mid-upload leaves on a local disk or a mount (`atomic_path`'s temporary
# name); an object store shows nothing of an unfinished upload.
_PARTIAL_RE = re.compile(r"^\.model_(\d+|final)\.pth\..+\.tmp$")


class CheckpointSync:
    """Mirror a fold's local Detectron2 ``OUTPUT_DIR`` into its folder in the run's storage."""

    def __init__(self, storage: Storage, local_dir: str | Path, *, keep: int = 2,
                 writer: bool = True) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.storage = storage
        self.local_dir = Path(local_dir)
        self.keep = keep
        self.writer = writer  # False: pull only (a fold's ranks other than 0)
        self._pushed: str | None = None  # newest checkpoint in storage (set by the uploader)
        self._started: str | None = None  # newest checkpoint handed to an upload
        self._upload: threading.Thread | None = None
        self._error: BaseException | None = None

    def pull(self) -> str | None:
        """Copy the latest checkpoint (and the log) from storage; return its file name or None."""
        self.local_dir.mkdir(parents=True, exist_ok=True)
        if self.storage.is_file(LOG):
            self.storage.get_file(LOG, self.local_dir / LOG)
        if not self.storage.is_file(LAST):
            return None
        name = self.storage.read_text(LAST).strip()
        if not _MODEL_RE.match(name) or not self.storage.is_file(name):
            return None  # never happens with our upload order; a hand-edited folder trains anew
        self.storage.get_file(name, self.local_dir / name)
        (self.local_dir / LAST).write_text(name)
        self._pushed = self._started = name
        return name

    def latest_local(self) -> str | None:
        last = self.local_dir / LAST
        return last.read_text().strip() if last.is_file() else None

    def _new_checkpoint(self) -> str | None:
        """The newest local checkpoint if it is not yet uploaded nor being uploaded."""
        name = self.latest_local()
        if not self.writer or not name or name == self._started or not (self.local_dir / name).is_file():
            return None
        return name

    def push(self) -> bool:
        """Upload the newest local checkpoint if it is new, in this thread, after the upload in
        flight (if any); prune old ones. True if uploaded. Raises what the upload raised."""
        self.wait()
        name = self._new_checkpoint()
        if name is None:
            return False
        self._started = name
        self._put(name)
        return True

    def push_in_background(self) -> bool:
        """Start uploading the newest local checkpoint if it is new; True if started.

        Waits only for the previous upload (one at a time, in order); an error of that upload is
        raised here (else at `wait` or `push`).
        """
        name = self._new_checkpoint()
        if name is None:
            return False
        self.wait()
        self._started = name
        self._upload = threading.Thread(target=self._put_catching, args=(name,),
                                        name="kfold-ray-checkpoint-upload", daemon=True)
        self._upload.start()
        return True

    def wait(self, *, raise_error: bool = True) -> None:
        """Until the upload in flight (if any) is in storage; then raise its error, if any."""
        if self._upload is not None:
            self._upload.join()
            self._upload = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error

    def _put_catching(self, name: str) -> None:
        try:
            self._put(name)
        except BaseException as e:  # noqa: BLE001 - raised in the training thread
            self._error = e

    def _put(self, name: str) -> None:
        # The file first, then the name pointing at it: storage never names a missing file.
        self.storage.put_file(self.local_dir / name, name)
        self.storage.write_text(LAST, name)
        self._pushed = name
        self.push_log()
        self._prune()

    def push_log(self) -> None:
        log = self.local_dir / LOG
        if self.writer and log.is_file():
            self.storage.put_file(log, LOG)

    def _prune(self) -> None:
        """Keep the newest ``keep`` checkpoints here and in storage (never the one storage names),
        and remove from storage what an upload killed midway left (run by the one writer,
        between its uploads, so no upload of its own is in flight)."""
        local = sorted(p.name for p in self.local_dir.iterdir())
        for old in _beyond_newest(local, self.keep):
            if old != self._pushed:
                (self.local_dir / old).unlink(missing_ok=True)
        stored = self.storage.list_names()
        for old in [*_beyond_newest(stored, self.keep), *(n for n in stored if _PARTIAL_RE.match(n))]:
            if old != self._pushed:
                self.storage.delete(old)


def _beyond_newest(names: list[str], keep: int) -> list[str]:
    """The numbered checkpoints among ``names`` older than the newest ``keep`` (model_final stays)."""
    models = sorted((n for n in names if _MODEL_RE.match(n) and n != "model_final.pth"), key=_iteration)
    return models[:-keep]


def _iteration(name: str) -> int:
    m = _MODEL_RE.match(name)
    return int(m.group(1)) if m and m.group(1).isdigit() else -1
