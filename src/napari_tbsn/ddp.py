"""Fitting on several processes (several GPUs) with torch's DistributedDataParallel.

    torchrun --standalone --nproc-per-node 4 -m napari_tbsn fit stack.tif -o model.safetensors

torchrun starts one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK. Every process
reads the data and runs the same fit; the Trainer wraps the network in DDP, so each step
averages the gradients of every process's own patches (each rank samples with its own
generator), and the ranks agree after every iteration on how far the fit has come and whether
to stop, so that they step and validate together. Each rank validates its share of the same
validation set and the losses are summed, so all ranks keep the same best weights. Rank 0 alone
runs the closing fits (posterior head, lattice filter) and writes the model; under torchrun a
Ctrl-C (which torchrun forwards to the ranks, as SIGTERM when it is itself terminated) ends the
training as it does alone.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import UserError


def world() -> tuple[int, int]:
    """(rank, number of processes) of the fit this process takes part in; (0, 1) alone."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_from_environment(device: str) -> str:
    """Join the process group torchrun describes in the environment, if any; returns the
    device this process fits on (its own GPU, by LOCAL_RANK, where the device is CUDA)."""
    # torchrun with one process still joins a group of one (nccl on a GPU): the path runs as with many.
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if (int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not under_torchrun) or in_process_group():
        return device
    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed: fit with one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return device


def in_process_group() -> bool:
    """Whether this process fits in a torch.distributed group (under torchrun, even of one)."""
    return dist.is_available() and dist.is_initialized()


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(fraction: float, stopping: bool, failing: bool, device: torch.device) -> tuple[float, bool, bool]:
    """The furthest progress, whether any rank stops and whether any fails: the same on every rank."""
    if world()[1] == 1:
        return fraction, stopping, failing
    state = torch.tensor([fraction, float(stopping), float(failing)], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(state, op=dist.ReduceOp.MAX)
    return float(state[0]), bool(state[1] > 0), bool(state[2] > 0)


def sum_over_ranks(value: float, device: torch.device) -> float:
    """The sum of `value` over the ranks (each rank validates its own share of the patches)."""
    if world()[1] == 1:
        return value
    state = torch.tensor([value], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(state)
    return float(state[0])


def _comm_device(device: torch.device) -> torch.device:
    """nccl reduces CUDA tensors; gloo CPU ones."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")
