"""What of a fold's training is still alive when it starts predicting: before vs now.

Now `kfold_ray.detectron2._train.train` releases the trainer when training ends (data loader
closed, its worker processes stopped; optimizer, scheduler, checkpointer, hooks dropped), runs
the cycle collector and, on a GPU, gives the cached memory back (`torch.cuda.empty_cache`), so a
neighbour fold on the same GPU (``--gpus-per-fold 0.5``) can have it. "before" is the same
`train` with that release undone. Each case in a fresh child process, the same tiny config:

- plain: Detectron2's DefaultTrainer as it is;
- hook cycle: plus a hook that holds its trainer (a user's hook may; Detectron2's own hooks,
  EvalHook and CallbackHook, drop their closures in after_train), the cycle collector off (it
  runs at moments no one picks: this is the state between two of its full collections).

Reported at the moment prediction would start: trainer / optimizer / data loader alive, loader
worker processes running, and on a GPU the memory PyTorch holds (allocated, and reserved by its
caching allocator: what other processes on the GPU cannot use).

    .venv/bin/python benchmarks/bench_release.py                 # CPU, ~2 min here
    .venv/bin/python benchmarks/bench_release.py --size 640 --model COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml --batch 8   # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def child(mode: str, case: str, args) -> dict:
    import numpy as np
    import psutil
    import torch

    import kfold_ray.detectron2._train as T
    from kfold_ray._config import TrainConfig
    from kfold_ray.data._dataset import load_coco
    from kfold_ray.data._example import make_digits_example
    from kfold_ray.detectron2 import Detectron2Backend
    from kfold_ray.detectron2._config import import_detectron2
    from kfold_ray.detectron2._data import register_split

    import_detectron2()
    from detectron2.engine import DefaultTrainer

    if mode == "before":
        T.release_trainer = lambda trainer: None
        T.free_memory = lambda: None
    refs: dict = {}
    original = DefaultTrainer.__init__

    def init(self, cfg):
        original(self, cfg)
        if case == "hook cycle":
            self.register_hooks([holds(self)])
        refs.update(trainer=weakref.ref(self), optimizer=weakref.ref(self._trainer.optimizer),
                    loader=weakref.ref(self._trainer.data_loader))

    DefaultTrainer.__init__ = init

    from detectron2.engine.hooks import HookBase

    class holds(HookBase):  # noqa: N801 - a user's hook holding its trainer: a reference cycle
        def __init__(self, owner) -> None:
            self.owner = owner
    if case == "hook cycle":
        gc.disable()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        ex = make_digits_example(Path(tmp) / "data", n_images=args.images, image_size=args.size)
        dataset = load_coco(ex.annotations_path, ex.image_dir)
        name = register_split("bench_release", dataset, np.arange(dataset.num_images))
        train = TrainConfig(model=args.model, overrides=(
            "SOLVER.IMS_PER_BATCH", str(args.batch), "SOLVER.MAX_ITER", str(args.iters),
            "MODEL.WEIGHTS", "", *args.opts))
        cfg = Detectron2Backend().build_cfg(train, num_classes=dataset.num_classes, device=device,
                                            output_dir=str(Path(tmp) / "out"), dataset_name=name,
                                            checkpoint_period=10**6, num_workers=args.workers)
        me = psutil.Process()
        loop, kids = T.train(cfg, 0), set()
        try:
            while True:
                next(loop)
                kids |= {p.pid for p in me.children(recursive=True)}
        except StopIteration as done:
            model = done.value
        del loop
        running = [p for p in kids if psutil.pid_exists(p)
                   and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        out = {"alive": sorted(k for k, r in refs.items() if r() is not None),
               "loader_processes": f"{len(running)} of {len(kids)}"}
        if device == "cuda":
            out["allocated_mb"] = torch.cuda.memory_allocated() / 2**20
            out["reserved_mb"] = torch.cuda.memory_reserved() / 2**20
            out["model_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--opts", nargs="*", default=[])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="training loader worker processes")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args)), flush=True)
        return
    rows = []
    for case in ("plain", "hook cycle"):
        for mode in ("before", "now"):
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode, case],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
            rows.append((case, mode, r))
    print(f"model {args.model}, {args.size} px, batch {args.batch}, {args.iters} iterations, "
          f"{args.workers} loader worker(s); at the start of prediction:")
    for case, mode, r in rows:
        gpu = (f" | GPU allocated {r['allocated_mb']:.0f} MB, reserved {r['reserved_mb']:.0f} MB "
               f"(model {r['model_mb']:.0f} MB)") if "reserved_mb" in r else ""
        alive = ", ".join(r["alive"]) or "nothing"
        print(f"  {case:10s} {mode:6s} alive: {alive:32s} loader processes running: "
              f"{r['loader_processes']}{gpu}")


if __name__ == "__main__":
    main()
