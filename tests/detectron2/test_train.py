"""A fold's training hands over to prediction cleanly: checkpoint uploads never hold up a step,
the final checkpoint is in storage before anything is predicted, and nothing of the trainer but
the model is alive then (trainer, optimizer, data loader, the loader's worker processes).

One real fold (tiny Detectron2 model, CPU, 6 iterations, a checkpoint every 2, one loader worker
process: the fold reserves 2 CPUs) run in this process through `Detectron2Backend.run_fold`, with
a run dir whose first checkpoint upload is slow (it waits until the test lets it go on) and a
look at everything when the backend starts predicting. The trainer also gets a hook that holds
it in a reference cycle (a user's hook may; Detectron2's own hooks drop their references in
after_train), with the cycle collector off, so only an explicit release frees it in time.
"""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import psutil
import pytest
from cocofactory import make_coco

import kfold_ray.detectron2._backend as backend_module
from kfold_ray._backend import FoldTask, Progress
from kfold_ray._config import TrainConfig
from kfold_ray.data._dataset import load_coco
from kfold_ray.detectron2 import Detectron2Backend
from kfold_ray.detectron2._config import import_detectron2
from kfold_ray.storage._storage import Storage

pytestmark = pytest.mark.slow

TINY = ("SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96")


@pytest.fixture(scope="module")
def handover(tmp_path_factory):
    """Run the fold; return what was seen (see the tests)."""
    import_detectron2()
    from detectron2.engine import DefaultTrainer

    tmp = tmp_path_factory.mktemp("fold")
    ann, images = make_coco(tmp / "data", n_images=8, categories=2, size=(64, 64))
    dataset = load_coco(ann, images)
    work_dir = tmp / "run" / "folds" / "fold_000"
    seen: dict = {"refs": {}, "loader_pids": set(), "uploads": [], "steps_during_upload": []}
    step = {"now": 0}
    first_upload_may_end = threading.Event()

    original_init = DefaultTrainer.__init__

    def init(self, cfg):  # weak references to what training holds
        original_init(self, cfg)
        self.register_hooks([_holds_its_trainer(self)])  # a cycle
        seen["refs"] = {"trainer": weakref.ref(self), "optimizer": weakref.ref(self._trainer.optimizer),
                        "data loader": weakref.ref(self._trainer.data_loader)}

    original_put = Storage.put_file

    def slow_put(self, local, name):  # the first checkpoint's upload lasts until step 3 is done
        if name.startswith("model_"):
            seen["uploads"].append(name)
            if len(seen["uploads"]) == 1:
                seen["first_upload_released_by_steps"] = first_upload_may_end.wait(60)
                seen["steps_during_upload"].append(step["now"])
        original_put(self, local, name)

    original_predict = backend_module.predict_halving_on_oom

    def predict(model, cfg, task, dataset, device, **kw):  # what is alive when predicting starts
        seen["alive"] = sorted(k for k, ref in seen["refs"].items() if ref() is not None)
        seen["loaders_running"] = [p for p in seen["loader_pids"] if _running(p)]
        fold = Storage(task.work_dir)
        seen["last_checkpoint"] = fold.read_text("last_checkpoint").strip()
        seen["stored"] = fold.list_names()
        yield from original_predict(model, cfg, task, dataset, device, **kw)

    task = FoldTask(run_name="handover", fold=0, attempt=0, train_indices=np.arange(6),
                    predict_indices=np.arange(6, 8), holdout_indices=np.arange(6, 8),
                    work_dir=str(work_dir), seed=0, num_cpus=2, checkpoint_period=2,
                    keep_checkpoints=5, train=TrainConfig(model="tiny", overrides=TINY))
    me = psutil.Process()
    # Children this process already has (other tests' servers, a Ray node) are no loader workers.
    before = {p.pid for p in me.children(recursive=True)}
    mp = pytest.MonkeyPatch()
    collecting = gc.isenabled()
    gc.disable()
    try:
        mp.setattr(DefaultTrainer, "__init__", init)
        mp.setattr(Storage, "put_file", slow_put)
        mp.setattr(backend_module, "predict_halving_on_oom", predict)
        events = []
        for event in Detectron2Backend().run_fold(task, dataset):
            events.append(event)
            if isinstance(event, Progress) and event.stage == "train":
                step["now"] = event.step
                seen["loader_pids"] |= {p.pid for p in me.children(recursive=True)} - before
                if event.step >= 3:  # a step after the first checkpoint's (step 2)
                    first_upload_may_end.set()
    finally:
        first_upload_may_end.set()
        mp.undo()
        if collecting:
            gc.enable()
    seen["events"] = events
    return seen


def _holds_its_trainer(trainer):
    """A user's hook that keeps a strong reference to its trainer: a reference cycle (Detectron2's
    own hooks drop theirs in after_train)."""
    from detectron2.engine.hooks import HookBase

    class HoldsItsTrainer(HookBase):
        def __init__(self, owner) -> None:
            self.owner = owner

    return HoldsItsTrainer(trainer)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_training_goes_on_while_a_checkpoint_uploads(handover):
    # The first checkpoint's upload (written at step 2) was held until the loop reported step 3:
    # a loop that waited for its uploads would never have got there (the gate would time out).
    assert handover["uploads"][0] == "model_0000001.pth"
    assert handover["first_upload_released_by_steps"] is True
    assert handover["steps_during_upload"][0] >= 3


def test_the_final_checkpoint_is_in_storage_before_anything_is_predicted(handover):
    assert handover["last_checkpoint"] == "model_final.pth"
    assert "model_final.pth" in handover["stored"]
    # one upload at a time, in order: the newest checkpoint each time (Detectron2 writes
    # model_0000005 and model_final at the same last step: the final one goes)
    assert handover["uploads"] == ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]


def test_training_memory_is_released_before_the_first_prediction(handover):
    assert set(handover["refs"]) == {"trainer", "optimizer", "data loader"}
    assert handover["alive"] == [], f"still alive when predicting starts: {handover['alive']}"
    assert handover["loader_pids"], "the fold should have had a data-loader worker process"
    assert handover["loaders_running"] == [], "loader worker processes still running"


def test_the_fold_still_predicts_every_held_out_image(handover):
    from kfold_ray._schema import batch_image_indices

    batches = [e for e in handover["events"] if hasattr(e, "num_rows")]
    covered = sorted(np.concatenate([batch_image_indices(b) for b in batches]).tolist())
    assert covered == [6, 7]
