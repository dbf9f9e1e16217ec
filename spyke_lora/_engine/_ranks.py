"""One rank of a multi-process run (``train(cfg, processes=N)``): what every rank agrees on, and the two places where
sd-scripts' multi-process path needs help in-process.

* :class:`RankSync`: the step's loss averaged over the ranks (the loss of the effective batch, so a NaN on any rank
  is every rank's), and the caller's answer (stop, or abort after a callback's exception), shared at the same step.
  Two ``all_reduce`` calls of a few numbers per step, on the training device (gloo on the CPU, NCCL on CUDA).
* :func:`frozen_models_unwrapped`: accelerate 1.6's ``prepare_model`` wraps every model in DDP on MULTI_CPU, frozen
  or not, while its MULTI_GPU branch wraps only a model with a parameter that requires a gradient. The U-Net and
  the text encoders are frozen (the LoRA is the network), so DDP refuses them on the CPU ("DistributedDataParallel
  is not needed when a module doesn't have any parameter that requires a gradient"). On MULTI_CPU only, a frozen
  model is prepared with ``evaluation_mode=True``: everything ``prepare_model`` does except the DDP wrap, which is
  what MULTI_GPU does for it. CUDA's path is sd-scripts' own, untouched.
* :func:`alone_on_this_rank`: spyke-lora samples and validates right after a file is saved, on rank 0 alone (the
  other ranks go on to the next step and wait for it there). sd-scripts' sampler would split the prompts between
  processes (``train_util.sample_images_common``, ``distributed_state.num_processes > 1``), and the held-out
  dataset's latent caching ends with ``accelerator.wait_for_everyone()`` (``train_util`` l.2629), a barrier the
  other ranks never reach: while rank 0 works alone, accelerate's shared state says one process, not distributed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

__all__ = ["AbortRun", "RankSync", "alone_on_this_rank", "frozen_models_unwrapped"]


class AbortRun(BaseException):
    """Raised on every rank when the caller's callback raised: the run ends at once, saving nothing more."""


class RankSync:
    """What the ranks of one run agree on, step by step. ``stopped`` changes only at :meth:`agree`, which every rank
    calls at the same points (after ``TrainStarted`` and after every step), so every check of it gives the same
    answer on every rank."""

    def __init__(self, world_size: int, rank: int) -> None:
        self.world_size = world_size
        self.rank = rank
        self.device: Any = None  # the training device (accelerator.device): where the collectives' tensors live
        self.stopped = False
        self.aborted = False
        self._asked_stop = False  # the caller's answers on this rank (only the reporting rank has any)
        self._asked_abort = False

    def answer(self, stop: bool, abort: bool) -> None:
        """The caller's answer to an event: stop after this step, or abort now."""
        self._asked_stop = self._asked_stop or bool(stop)
        self._asked_abort = self._asked_abort or bool(abort)

    def stop_requested(self) -> bool:
        return self.stopped

    def _sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float32, device=self.device)
        dist.all_reduce(tensor)  # SUM over every rank
        return [float(v) for v in tensor.tolist()]

    def mean(self, value: float) -> float:
        """``value`` averaged over every rank (NaN when any rank's is NaN)."""
        return self._sum([value])[0] / self.world_size

    def agree(self) -> None:
        """Share the caller's answer: every rank stops (or aborts) when any rank was asked to."""
        stop, abort = self._sum([float(self._asked_stop), float(self._asked_abort)])
        self.stopped = self.stopped or stop > 0
        self.aborted = self.aborted or abort > 0


def frozen_models_unwrapped(accelerator: Any) -> None:
    """On MULTI_CPU, make ``accelerator.prepare`` leave a model without trainable parameters out of DDP (as MULTI_GPU
    does); nothing changes on any other distributed type. The change is on this accelerator object only, which
    lives as long as the run."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU or getattr(accelerator, "_spyke_lora_ddp", False):
        return
    original = accelerator.prepare_model

    @functools.wraps(original)
    def prepare_model(model: Any, device_placement: bool | None = None, evaluation_mode: bool = False) -> Any:
        if not evaluation_mode and not any(p.requires_grad for p in model.parameters()):
            evaluation_mode = True  # a frozen model: no DDP, as accelerate's MULTI_GPU branch decides
        return original(model, device_placement=device_placement, evaluation_mode=evaluation_mode)

    accelerator.prepare_model = prepare_model
    accelerator._spyke_lora_ddp = True


@contextlib.contextmanager
def alone_on_this_rank() -> Iterator[None]:
    """While one rank samples or validates on its own: accelerate's ``PartialState`` (what sd-scripts' sampler and
    ``wait_for_everyone`` read) says one process, not distributed, so the sampler samples every prompt and a barrier
    does not wait for ranks that are not there, and ``AcceleratorState``'s own copy of the count (what
    ``accelerator.num_processes`` reads) says one process too. Put back afterwards; nothing changes with one
    process."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    shared = PartialState._shared_state
    count, kind = shared.get("num_processes", 1), shared.get("distributed_type")
    if count <= 1:
        yield
        return
    # AcceleratorState keeps its own copy of the count (made when the Accelerator was created), and that copy is
    # what ``accelerator.num_processes`` reads: sd-scripts' latent caching splits the images by it
    # (``i % accelerator.num_processes != accelerator.process_index``, train_util l.1148-1185), so rank 0 alone
    # must see one process there too, or it caches 1/N of the held-out latents and misses the rest.
    accelerator_shared = AcceleratorState._shared_state
    accelerator_count = accelerator_shared.get("num_processes")
    shared["num_processes"], shared["distributed_type"] = 1, DistributedType.NO
    if accelerator_count is not None:
        accelerator_shared["num_processes"] = 1
    try:
        yield
    finally:
        shared["num_processes"], shared["distributed_type"] = count, kind
        if accelerator_count is not None:
            accelerator_shared["num_processes"] = accelerator_count
