"""Process-group setup and the one function that applies parallelism to a model.

The model code knows nothing of this: ``parallelize`` applies, in order, ``torch.compile`` (optional)
and FSDP2 (``fully_shard`` on every block, then on the root), as torchtitan does.
Works with ``torchrun`` on CUDA/NCCL and on CPU/gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(device: str = "auto") -> Runtime:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); pick the device."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available; use device='cpu' or 'auto'")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(rank, world_size, dev)


def teardown_runtime() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, runtime: Runtime, compile: bool = False, scope: str = "model") -> nn.Module:
    """Compile (optional), then shard every block and the root with FSDP2 when distributed.

    ``scope``: one process compiles the whole model, LM head and loss included (``model``), or each block on its
    own (``blocks``: one compilation of the block's code serves every layer; ``TrainConfig.compile_scope``).
    Under FSDP each block is compiled on its own, as FSDP2 wraps blocks. Both compile in place, so parameter
    names (and so checkpoints) stay unchanged.
    """
    if compile and scope == "model" and not runtime.distributed:
        model.compile()
    elif compile:
        for block in model.layers:
            block.compile()
    if runtime.distributed:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    return model


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average a scalar tensor over all processes (identity when not distributed)."""
    if dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)  # SUM: gloo has no AVG
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any process (``flag`` itself when not distributed)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
