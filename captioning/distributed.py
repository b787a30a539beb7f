"""Everything that crosses processes: the device of each rank, the process group, and the few
collectives training needs. No other module calls `torch.distributed` (a test checks the source).

Every collective here makes its tensor on the device the group was started for (`cuda:LOCAL_RANK`
under NCCL, the CPU under gloo), and every value that steers control flow is agreed on by all
ranks: callers pass Python values in and get the same Python value back on every rank.
"""

import os
import re

import torch
import torch.distributed as dist

from captioning.errors import DistributedError

_device = torch.device("cpu")  # where this process's collective tensors live


def resolve_device(setting, environ=None):
    """The torch.device this process trains on: `auto`, `cpu`, `mps`, `cuda` (= `cuda:LOCAL_RANK`)
    or `cuda:N` (one process only; several processes each take the GPU of their LOCAL_RANK)."""
    environ = os.environ if environ is None else environ
    world = int(environ.get("WORLD_SIZE", "1"))
    local_rank = int(environ.get("LOCAL_RANK", "0"))
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        return torch.device("cuda", local_rank)
    if re.fullmatch(r"cuda:\d+", setting) and world > 1:
        raise ValueError(
            f"device {setting!r}: with {world} processes each one uses the GPU of its LOCAL_RANK; "
            "pass --device cuda (or auto), not a numbered GPU (limit the GPUs a run sees with "
            "CUDA_VISIBLE_DEVICES)"
        )
    return torch.device(setting)


def backend_for(device):
    """The process-group backend that serves tensors on `device`: NCCL alone on CUDA (a Gloo
    group besides would connect every rank over TCP at start-up, which fails or hangs on hosts
    whose name resolves to loopback, and nothing here sends it a tensor), else Gloo."""
    return "nccl" if device.type == "cuda" else "gloo"


def start(setting, environ=None, timeout=None):
    """(rank, world size, device): pick this process's device, and join the torchrun process
    group when there are several processes."""
    global _device
    environ = os.environ if environ is None else environ
    device = resolve_device(setting, environ)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _device = device
    world = int(environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        options = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend_for(device), **options)
    return int(environ.get("RANK", "0")), world, device


def active():
    """Whether this process is one of several that communicate."""
    return dist.is_available() and dist.is_initialized()


def rank():
    """This process's rank (0 alone)."""
    return dist.get_rank() if active() else 0


def world_size():
    """How many processes take part (1 alone)."""
    return dist.get_world_size() if active() else 1


def collective_device():
    """The device collective tensors are made on."""
    return _device


def _checked(tensor):
    if tensor.device != _device:
        raise ValueError(
            f"a collective was given a tensor on {tensor.device}; this process's group serves "
            f"{_device} (distributed.start)"
        )
    return tensor


def sum_tensor(tensor):
    """Sum of `tensor` over all ranks, in place and returned (it must be on the rank's device)."""
    if active():
        dist.all_reduce(_checked(tensor))
    return tensor


def sum_values(values):
    """Elementwise sums of a list of numbers over all ranks, as float64 Python floats."""
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device)
    return sum_tensor(total).tolist()


def max_value(value):
    """The largest of every rank's number."""
    total = torch.tensor([float(value)], dtype=torch.float64, device=_device)
    if active():
        dist.all_reduce(_checked(total), op=dist.ReduceOp.MAX)
    return total.item()


def min_value(value):
    """The smallest of every rank's number."""
    return -max_value(-float(value))


def any_rank(flag):
    """True on every rank when `flag` is true on any."""
    return max_value(bool(flag)) > 0


def broadcast_value(value, src=0):
    """Rank `src`'s number, on every rank (float64)."""
    shared = torch.tensor([float(value)], dtype=torch.float64, device=_device)
    if active():
        dist.broadcast(_checked(shared), src)
    return shared.item()


def broadcast_text(text, src=0):
    """Rank `src`'s string, on every rank."""
    if not active():
        return text
    data = text.encode() if rank() == src else b""
    length = int(broadcast_value(len(data), src))
    buffer = torch.zeros(max(length, 1), dtype=torch.uint8, device=_device)
    if rank() == src and length:
        buffer[:length] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(_device)
    dist.broadcast(_checked(buffer), src)
    return bytes(buffer[:length].cpu().tolist()).decode()


def all_texts(text):
    """Every rank's string, in rank order, on every rank."""
    if not active():
        return [text]
    data = text.encode()
    lengths = torch.zeros(world_size(), dtype=torch.int64, device=_device)
    dist.all_gather_into_tensor(lengths, _checked(torch.tensor([len(data)], device=_device)))
    lengths = lengths.tolist()
    buffer = torch.zeros(max(max(lengths), 1), dtype=torch.uint8, device=_device)
    if data:
        buffer[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(_device)
    gathered = torch.zeros(world_size() * len(buffer), dtype=torch.uint8, device=_device)
    dist.all_gather_into_tensor(gathered, _checked(buffer))
    rows = gathered.view(world_size(), len(buffer)).cpu()  # (ranks * width,) -> (ranks, width)
    return [bytes(row[:n].tolist()).decode() for row, n in zip(rows, lengths)]


def union_of_indices(indices, size):
    """The sorted indices (each below `size`) that any rank holds, on every rank."""
    mask = torch.zeros(size, dtype=torch.int32, device=_device)
    if indices:
        mask[torch.tensor(sorted(indices), dtype=torch.int64, device=_device)] = 1
    return torch.nonzero(sum_tensor(mask)).flatten().tolist()


def broadcast_module(module, src=0):
    """Give every rank rank `src`'s parameters and buffers (they must already be on the device)."""
    if not active():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(_checked(tensor.data), src)


def barrier():
    """Wait until every rank gets here (an all-reduce on the rank's device: it works on any
    backend, NCCL included, without naming device ids)."""
    sum_values([0])


def raise_together(error):
    """Raise on every rank when any rank has an `error` (an exception, or None): the message of
    the lowest failing rank, so no rank stops alone while the others wait in a collective."""
    failing = min_value(rank() if error is not None else float("inf"))
    if failing == float("inf"):
        return
    if not active():
        raise error
    message = broadcast_text(f"{type(error).__name__}: {error}" if error else "", int(failing))
    raise DistributedError(f"rank {int(failing)}: {message}") from error
