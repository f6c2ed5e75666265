"""The product's backend: Detectron2 trains a fold and predicts its held-out images in batches.

Everything Detectron2 (``CfgNode``, ``Instances``, catalogs) stays inside this package: what
leaves it is `Progress` and Arrow prediction batches built on the CPU, as Detectron2's own
evaluators do. Detectron2, torch and the compat layer are imported lazily, so ``import kfold_ray``
stays fast. One module per job:

    _config    presets, the merged config, the keys kfold-ray owns, importing Detectron2
    _weights   MODEL.WEIGHTS fetched once on the driver, read by folds from the run's storage
    _files     Detectron2's file reads (images, weights) through pyarrow for URIs
    _data      a fold's split registered with Detectron2; can this node read the images
    _train     the training loop (seeded, resumed, checkpoints mirrored, progress yielded)
    _predict   batched held-out inference into Arrow batches
    _losses    the fold model's losses on each image's given boxes (loss inspection)
    _distributed  a fold of several Ray Train workers: comm's local group, DDP's device, one model
    _backend   Detectron2Backend, which ties them together
    _compat    Detectron2 0.6 Python sources without compiled ops: a stand-in ``_C``, Pillow 10
               (loaded by path at every interpreter start, from a .pth the set-up writes)
"""

from ._backend import Detectron2Backend
from ._config import PRESETS

__all__ = ["PRESETS", "Detectron2Backend"]
