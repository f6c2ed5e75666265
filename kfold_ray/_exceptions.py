"""Errors raised by kfold-ray.

    KfoldRayError
     +-- DatasetError (also ValueError)     bad COCO input: names the file, field and id at fault
     +-- ConfigError (also ValueError)      bad option: names the option, the value and the fix
     |    +-- StorageError                  the run dir / image storage cannot be used (scheme,
     |                                      bucket, credentials, endpoint)
     +-- ResumeError (also ValueError)      a run dir that cannot be resumed with these inputs
     +-- FoldFailedError                    a fold failed after its retries; carries fold and cause
 +-- FoldOutOfMemoryError               a fold ran out of GPU memory (not retried: it would again)
     +-- StitchError                        fold outputs are not a partition of the dataset
     +-- ImageReadError                     a fold's node cannot read an image (not retried)
     +-- NodeSetupError                     a node cannot do what the fold reserved it for (GPUs
                                            CUDA cannot use); names the node and the fix

`will_recur` says which errors a retry would only meet again (never retried).

Every error pickles across Ray processes (``__reduce__`` rebuilds it from its arguments).
The CLI maps DatasetError/ConfigError/ResumeError to one line on stderr and exit code 2.
"""

from __future__ import annotations

from typing import Sequence


class KfoldRayError(Exception):
    """Root of every error kfold-ray raises on purpose."""


class DatasetError(KfoldRayError, ValueError):
    """The dataset is malformed. The message names the file, the field and the id at fault.

    Validation reports every problem it finds in one pass (`load_coco`): ``message`` and
    ``path`` are the first problem's; ``problems`` holds one line per problem (``"<file>:
    <problem>"``, the first `MAX_PROBLEMS` of them) and ``problem_count`` how many were found in
    all. ``str()`` is the first line, followed by ``(+N more problems: ...)`` when there are more.
    """

    #: Problems kept in ``problems`` (and printed by the CLI); the rest are only counted.
    MAX_PROBLEMS = 50

    def __init__(self, message: str, *, path: str | None = None,
                 problems: Sequence[str] | None = None, problem_count: int | None = None) -> None:
        self.message = message
        self.path = path
        first = f"{path}: {message}" if path else message
        self.problems = list(problems) if problems else [first]
        self.problem_count = max(int(problem_count or 0), len(self.problems))
        more = self.problem_count - 1
        if more:
            first += (f" (+{more} more problem{'s' if more > 1 else ''}: one per line in "
                      "DatasetError.problems)")
        super().__init__(first)

    def __reduce__(self):  # keep keyword-only args across pickling
        return (_rebuild_dataset_error, (self.message, self.path, self.problems, self.problem_count))


def _rebuild_dataset_error(message: str, path: str | None, problems: Sequence[str] | None = None,
                           problem_count: int | None = None) -> DatasetError:
    return DatasetError(message, path=path, problems=problems, problem_count=problem_count)


class ConfigError(KfoldRayError, ValueError):
    """An option has a value kfold-ray cannot use."""


class StorageError(ConfigError):
    """The storage (run dir, images, weights) cannot be opened, written or reached."""


class ResumeError(KfoldRayError, ValueError):
    """A run dir cannot be resumed: it was made from another dataset or configuration."""


class FoldFailedError(KfoldRayError):
    """One or more folds failed for good (after their retries); the other folds ran to the end
    and their predictions are persisted, so ``--resume`` after the fix redoes only these.

    Attributes:
        fold, cause, attempts: the first failed fold.
        failures: every failed fold as ``(fold, cause, attempts)``, fold order.
    """

    def __init__(self, fold: int, cause: str, *, attempts: int = 1,
                 others: Sequence[tuple[int, str, int]] = ()) -> None:
        self.fold = fold
        self.cause = cause
        self.attempts = attempts
        self.failures = sorted([(fold, cause, attempts), *others])
        super().__init__("; ".join(_failure_line(*f) for f in self.failures))

    def __reduce__(self):
        first = (self.fold, self.cause, self.attempts)
        return (_rebuild_fold_failed, (*first, [f for f in self.failures if f != first]))


def _failure_line(fold: int, cause: str, attempts: int) -> str:
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    return f"fold {fold} failed{tries}: {cause}"


def _rebuild_fold_failed(fold: int, cause: str, attempts: int, others=()) -> FoldFailedError:
    return FoldFailedError(fold, cause, attempts=attempts, others=[tuple(o) for o in others])


class FoldOutOfMemoryError(KfoldRayError):
    """A fold ran out of GPU memory; says in which stage, at which batch size, and what to lower."""

    def __init__(self, fold: int, stage: str, batch_size: int, advice: str) -> None:
        self.fold, self.stage, self.batch_size, self.advice = fold, stage, batch_size, advice
        super().__init__(
            f"fold {fold} ran out of GPU memory while {stage} (batch size {batch_size}): {advice}"
        )

    def __reduce__(self):
        return (FoldOutOfMemoryError, (self.fold, self.stage, self.batch_size, self.advice))


class StitchError(KfoldRayError):
    """Fold predictions do not cover every image exactly once, by the right fold."""

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[int] = (),
        duplicated: Sequence[int] = (),
        wrong_fold: Sequence[int] = (),
    ) -> None:
        self.message = message
        self.missing = list(missing)
        self.duplicated = list(duplicated)
        self.wrong_fold = list(wrong_fold)
        super().__init__(message)

    def __reduce__(self):
        return (
            _rebuild_stitch_error,
            (self.message, self.missing, self.duplicated, self.wrong_fold),
        )


def _rebuild_stitch_error(message, missing, duplicated, wrong_fold) -> StitchError:
    return StitchError(message, missing=missing, duplicated=duplicated, wrong_fold=wrong_fold)


class ImageReadError(KfoldRayError):
    """A fold's node cannot read an image: names the node, the path and the fix. Retrying on
    the same cluster would fail again, so the driver does not retry it."""

    def __init__(self, node: str, path: str, cause: str) -> None:
        self.node, self.path, self.cause = node, path, cause
        super().__init__(
            f"node {node} cannot read image {path} ({cause}): every node must read the images; "
            "give --images as a URI (s3://, gs://, ...) or mount them at the same path on every node"
        )

    def __reduce__(self):
        return (ImageReadError, (self.node, self.path, self.cause))


class NodeSetupError(KfoldRayError):
    """A fold's node cannot run what the fold reserved: GPUs that CUDA cannot use (no or too old
    an NVIDIA driver for torch's CUDA build, a CPU-only torch). The same node fails again: not
    retried. The message names the node, what it has, and the fix."""

    def __init__(self, node: str, problem: str) -> None:
        self.node, self.problem = node, problem
        super().__init__(f"node {node}: {problem}")

    def __reduce__(self):
        return (NodeSetupError, (self.node, self.problem))


# Errors a retry would meet again, by kind (config, data, model architecture, environment):
# kfold-ray's own, and the Python errors that a fold's code raises the same way every time (a
# model without a method it needs, a wrong key, a NaN loss: seeds and data are the same on a
# retry). Crashes (a killed process, a lost node) and I/O errors (OSError: storage timeouts,
# connection resets) may not recur: those are retried.
RECURRING_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetError, ResumeError, ImageReadError, FoldOutOfMemoryError, NodeSetupError,
    StitchError, NotImplementedError, TypeError, AttributeError, NameError, LookupError,
    ImportError, AssertionError, FloatingPointError, ArithmeticError, ValueError,
)


def will_recur(error: BaseException | None) -> bool:
    """True when retrying the work that raised ``error`` would raise it again."""
    return isinstance(error, RECURRING_ERRORS) and not isinstance(error, OSError)


def one_line(e: BaseException) -> str:
    """An error's message on one line (what the CLI and every wrapped error print)."""
    return " ".join(str(e).split()) or type(e).__name__


# Errors that mean "the user's input is wrong": exit code 2, one line, no traceback.
USER_INPUT_ERRORS: tuple[type[KfoldRayError], ...] = (DatasetError, ConfigError, ResumeError)
