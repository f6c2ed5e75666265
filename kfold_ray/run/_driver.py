"""The driver: one fold actor per fold, their prediction streams consumed as batches arrive.

Each fold is a Ray actor reserving ``gpus_per_fold`` GPUs (a fold trained by several workers
reserves them through its Ray Train workers instead); its `run` method is a streaming
generator. The driver waits on all fold streams at once (``ray.wait`` over the generators), hands
every prediction batch to the reducer the moment it arrives (it is persisted in the run dir
before anything else happens), and shows progress. A fold whose actor dies (process crash, node
loss) is started again from its last checkpoint with only its not-yet-persisted images to
predict, up to ``max_retries`` times (errors that would happen again are not retried: out of GPU
memory in training, an image the node cannot read, GPUs CUDA cannot use, a bad config, a model
whose code fails: `kfold_ray._exceptions.will_recur`). A fold that fails for good
sinks no other: the rest run to the end and persist, then the run fails with FoldFailedError
naming every failed fold, and ``--resume`` redoes only those.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import RayError, RayTaskError

from .._backend import DiscardParts, FoldBackend, FoldTask, Progress, Trained
from .._config import CVConfig
from .._exceptions import FoldFailedError, will_recur
from ..cluster._plan import FoldLaunch
from ..data._dataset import CocoDataset
from ..data._fold_plan import FoldPlan
from ..storage import _rundir
from ..storage._storage import Storage
from ._actor import RemoteFoldActor
from ._progress import ProgressBoard
from ._reduce import Reducer

log = logging.getLogger(__name__)

# A fold whose node was lost is relaunched after this long: Ray marks a lost node dead
# after ~5 failed health checks 3 s apart (up to ~25 s with their timeouts), and a relaunch placed
# on it before then dies again (seen in tests/test_on_a_cluster.py with 10 s).
NODE_LOSS_RELAUNCH_DELAY_S = 30.0

# Prediction batches a fold may have in flight before it waits for the driver: bounds
# object-store use when the driver (persisting to disk) is slower than the folds.
STREAM_BACKPRESSURE_BATCHES = 16


@dataclass
class _Fold:
    fold: int
    holdout: np.ndarray
    attempt: int = 0
    actor: Any = None
    started: float = field(default_factory=time.monotonic)
    errors: list[str] = field(default_factory=list)
    relaunch_at: float = 0.0
    trained: dict[int, Trained] = field(default_factory=dict)  # by rank, this attempt
    running: bool = False  # its actor has sent something this attempt (else: still waiting)

    def info(self) -> dict[str, Any]:
        """What metrics.json records of the fold: attempts, seconds, errors, who trained it."""
        seconds = round(time.monotonic() - self.started, 1)
        info: dict[str, Any] = {"attempts": self.attempt + 1, "seconds": seconds,
                                "errors": self.errors}
        if self.trained:
            ranks = [self.trained[r] for r in sorted(self.trained)]
            info.update(workers=ranks[0].world_size, nodes=[t.node for t in ranks],
                        weights=[t.weights for t in ranks])
        return info


@dataclass(frozen=True, kw_only=True)
class FoldJob:
    """What every fold of a run shares: where it writes, what it trains, how it is placed."""

    storage: Storage
    run_name: str
    config: CVConfig
    weights: str  # where the driver put MODEL.WEIGHTS in the run's storage ("" = the config's)
    launch: FoldLaunch


def run_folds(*, dataset: CocoDataset, plan: FoldPlan, job: FoldJob, backend: FoldBackend,
              reducer: Reducer, board: ProgressBoard) -> dict[int, dict[str, Any]]:
    """Run every fold not yet done in the run's storage; return per-fold info (attempts, seconds)."""
    config = job.config
    dataset_ref = ray.put(dataset)
    pending = [f for f in range(plan.k) if not reducer.store.is_fold_done(f)]
    for f in set(range(plan.k)) - set(pending):
        board.note(f, "done (resumed from run dir)")
    streams: dict[Any, _Fold] = {}
    for f in pending:
        state = _Fold(f, plan.holdout_indices(f))
        streams[_launch(state, dataset_ref, plan, job, backend, reducer)] = state
    info: dict[int, dict[str, Any]] = {}
    delayed: list[_Fold] = []  # folds to relaunch once their relaunch_at has come
    failed: list[_Fold] = []  # folds that failed for good: the others run on
    waiting = _WaitingNotes(board)
    try:
        while streams or delayed:
            waiting.show([s for s in streams.values() if not s.running])
            for state in [s for s in delayed if s.relaunch_at <= time.monotonic()]:
                delayed.remove(state)
                streams[_launch(state, dataset_ref, plan, job, backend, reducer)] = state
            if not streams:
                time.sleep(0.2)
                continue
            ready, _ = ray.wait(list(streams), num_returns=1, timeout=1.0)
            for stream in ready:
                state = streams.pop(stream)
                next_stream = _advance(stream, state, reducer, board, info, config)
                if next_stream is _RELAUNCH:
                    delayed.append(state)
                elif next_stream is _FAILED:
                    failed.append(state)
                elif next_stream is not None:
                    streams[next_stream] = state
    finally:
        for state in streams.values():
            _kill(state)
    if failed:
        first, *others = sorted(failed, key=lambda s: s.fold)
        raise FoldFailedError(first.fold, first.errors[-1], attempts=first.attempt + 1,
                              others=[(s.fold, s.errors[-1], s.attempt + 1) for s in others])
    return info


_RELAUNCH = object()
_FAILED = object()


def _advance(stream, state: _Fold, reducer: Reducer, board: ProgressBoard,
             info: dict[int, dict[str, Any]], config: CVConfig):
    """Take one item from a ready stream. Returns the stream to keep waiting on, _RELAUNCH,
    _FAILED (for good) or None (done)."""
    try:
        event = ray.get(next(stream))
    except StopIteration:
        missing = np.setdiff1d(state.holdout, reducer.covered_images(state.fold))
        if missing.size:  # a stream that ended early: never DONE, retried like a crash
            return _on_failure(state, StreamEndedEarly(state.fold, missing), board, config)
        info[state.fold] = state.info()
        reducer.mark_fold_done(state.fold, info[state.fold])
        board.note(state.fold, f"done in {info[state.fold]['seconds']:.0f}s")
        _kill(state)  # frees the fold's GPU memory with its process
        return None
    except RayError as e:
        return _on_failure(state, e, board, config)
    state.running = True
    if isinstance(event, Progress):
        board.update(event)
    elif isinstance(event, pa.RecordBatch):
        reducer.add(event)
    elif isinstance(event, Trained):
        state.trained[event.rank] = event
        if len({t.weights for t in state.trained.values()}) > 1:
            log.warning("fold %d: its workers hold different weights after training (%s)",
                        state.fold, {r: t.weights for r, t in sorted(state.trained.items())})
    elif isinstance(event, DiscardParts):
        reducer.discard_fold(state.fold)
        board.note(state.fold, "trained again: its earlier predictions are discarded")
        log.warning("fold %d: its model is not the one that made its persisted predictions "
                    "(%s); they are discarded and every held-out image is predicted again",
                    state.fold, event.model)
    return stream


class _WaitingNotes:
    """While folds wait for resources, say every so often what the autoscaler is launching for
    them (a GPU node takes minutes to boot and set up): the user sees it is coming."""

    def __init__(self, board: ProgressBoard, every_s: float = 20.0) -> None:
        self.board, self.every_s = board, every_s
        self._next = time.monotonic() + every_s
        self._said: dict[int, str] = {}

    def show(self, waiting: list[_Fold]) -> None:
        if not waiting or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every_s
        from ..cluster._autoscaler import launching_now

        line = launching_now()
        for state in waiting:
            if line and self._said.get(state.fold) != line:
                self._said[state.fold] = line
                self.board.note(state.fold, f"waiting for resources: {line}")


class StreamEndedEarly(Exception):
    """A fold's stream ended without predictions for all of its held-out images."""

    def __init__(self, fold: int, missing: np.ndarray) -> None:
        shown = ", ".join(map(str, missing[:10].tolist())) + (", ..." if missing.size > 10 else "")
        super().__init__(f"fold {fold} stopped with {missing.size} held-out images unpredicted "
                         f"(image indices {shown})")


def _on_failure(state: _Fold, error: Exception, board: ProgressBoard, config: CVConfig):
    cause = _describe(error)
    state.errors.append(cause)
    _kill(state)
    if state.attempt >= config.failure.max_retries or _would_fail_again(error):
        board.note(state.fold, f"failed for good ({cause}); the other folds go on")
        log.error("fold %d failed for good: %s", state.fold, cause)
        return _FAILED
    state.attempt += 1
    state.trained.clear()
    state.running = False
    state.relaunch_at = time.monotonic() + (NODE_LOSS_RELAUNCH_DELAY_S if _node_lost(error) else 0.0)
    board.note(state.fold, f"failed ({cause}); retry {state.attempt}/{config.failure.max_retries}")
    log.warning("fold %d failed (%s); retrying from its last checkpoint", state.fold, cause)
    return _RELAUNCH


def _node_lost(error: Exception) -> bool:
    """The fold's node is unreachable or dead (not just its process: that relaunches at once)."""
    from ray.exceptions import ActorUnavailableError, NodeDiedError

    return isinstance(error, (ActorUnavailableError, NodeDiedError)) or "node has died" in str(error)


def _would_fail_again(error: Exception) -> bool:
    """Errors a retry cannot fix (`kfold_ray._exceptions.will_recur`): the same batch size runs
    out of memory again, the node cannot read the images or use its GPUs, the weights, the
    config or the model's architecture are wrong. A crash or a lost node is retried."""
    return isinstance(error, RayTaskError) and will_recur(error.cause)


def _describe(error: Exception) -> str:
    if isinstance(error, RayTaskError):
        cause = error.cause if error.cause is not None else error
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}"
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def _launch(state: _Fold, dataset_ref, plan: FoldPlan, job: FoldJob, backend: FoldBackend,
            reducer: Reducer):
    """Start (or restart) a fold's actor; return its prediction stream."""
    fold, config = state.fold, job.config
    already = reducer.covered_images(fold)
    holdout = plan.holdout_indices(fold)
    task = FoldTask(
        run_name=job.run_name,
        fold=fold,
        attempt=state.attempt,
        train_indices=plan.train_indices(fold),
        predict_indices=np.setdiff1d(holdout, already, assume_unique=True),
        holdout_indices=holdout,
        predicted_with=reducer.predicted_with(fold),
        work_dir=job.storage.uri_of(_rundir.fold_work(fold)),
        seed=config.seed + fold,
        train=config.train,
        predict=config.predict,
        checkpoint_period=config.failure.checkpoint_period,
        num_cpus=job.launch.cpus_per_worker,
        num_gpus=job.launch.gpus_per_worker,
        workers=job.launch.workers,
        workers_across_nodes=job.launch.across_nodes,
        weights=job.weights,
        keep_checkpoints=config.failure.keep_checkpoints,
    )
    # A fold of several workers reserves its GPUs and CPUs through Ray Train's placement group;
    # its actor only forwards their events.
    alone = job.launch.workers == 1
    state.actor = RemoteFoldActor.options(
        name=f"kfold-ray:{job.run_name}:fold{fold}:try{state.attempt}",
        num_gpus=job.launch.num_gpus if alone else 0,
        num_cpus=job.launch.num_cpus if alone else 0,
        max_restarts=0,  # the driver restarts folds itself, with resume information
    ).remote(backend)
    state.started = time.monotonic()
    return state.actor.run.options(
        num_returns="streaming",
        _generator_backpressure_num_objects=STREAM_BACKPRESSURE_BATCHES,
    ).remote(task, dataset_ref)


def _kill(state: _Fold) -> None:
    if state.actor is not None:
        ray.kill(state.actor, no_restart=True)
        state.actor = None
