"""Detectron2 in one of a fold's Ray Train workers: its ``comm`` on the Train process group.

Ray Train starts the processes and the default ``torch.distributed`` group (world size, ranks);
Detectron2 reads world size and rank from that group, which makes its training loader give each
rank ``SOLVER.IMS_PER_BATCH / world size`` images of a shared shuffled order, its trainer wrap the
model in DistributedDataParallel and save checkpoints on rank 0 only, as in Detectron2's own
multi-GPU training (``detectron2.engine.launch``). Two things ``launch`` does are done here:
the per-node process group behind ``comm.get_local_rank()``, and the DDP wrapper's device.
"""

from __future__ import annotations

import contextlib
import hashlib

from .._backend import FoldWorker


def join_local_group(worker: FoldWorker) -> None:
    """Create the process group of each node's ranks and hand this node's to ``comm``.

    Every rank must create every group, in the same order (torch.distributed's rule); Ray Train
    may place any number of a fold's workers on a node, so the groups come from the node rank
    each rank reports, not from a fixed number of processes per machine.
    """
    import torch.distributed as dist
    from detectron2.utils import comm

    nodes: list[int | None] = [None] * worker.world_size
    dist.all_gather_object(nodes, worker.node_rank)
    for node in sorted(set(nodes)):
        group = dist.new_group([rank for rank, n in enumerate(nodes) if n == node])
        if node == worker.node_rank:
            comm._LOCAL_PROCESS_GROUP = group


@contextlib.contextmanager
def ddp_on_the_model_device():
    """While a DefaultTrainer is built: DDP's ``device_ids`` from where the model is.

    DefaultTrainer wraps the model with ``device_ids=[local rank]``, which holds when process i of
    a node drives cuda:i. It does not on CPU (DDP refuses device ids for a CPU module) nor when Ray
    Train numbers this worker's GPU otherwise; the model's own device is right in both.
    """
    from detectron2.engine import defaults

    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if "device_ids" not in kwargs:
            device = next(model.parameters()).device
            kwargs["device_ids"] = [device.index] if device.type == "cuda" else None
        return original(model, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original


def buffers_from_rank0(model) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP keeps the parameters equal but, with ``broadcast_buffers=False`` as DefaultTrainer sets
    it, each rank's BatchNorm statistics come from its own images. Rank 0's are in the checkpoint
    the fold's predictions name as their model, so every rank predicts with those.
    """
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def from_rank0(value):
    """Rank 0's ``value`` on every rank (e.g. the id of the checkpoint only rank 0 wrote)."""
    from detectron2.utils import comm

    return comm.all_gather(value)[0]


def synchronize() -> None:
    from detectron2.utils import comm

    comm.synchronize()


def weights_digest(model) -> str:
    """A digest of the model's parameters and buffers: equal on every rank after DDP training."""
    import torch

    module = getattr(model, "module", model)
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]
