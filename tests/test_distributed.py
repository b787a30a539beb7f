"""The process-group module: device per rank, backends that serve the tensors they get, collectives
on the right device, and ranks that stop together. CUDA and NCCL are not here: each of their rules
is checked on the CPU another way (monkeypatched `torch.cuda`, a stand-in device, gloo runs). The
gloo runs, ranks stopping together included, are in test_two_processes."""

import ast
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from captioning import distributed
from captioning.config import TrainConfig
from captioning.training.train import init_distributed
from tests.helpers import ROOT


def project_sources():
    """Every Python file of the project outside the tests and the virtual environment."""
    return [p for p in ROOT.rglob("*.py")
            if not ({".venv", "tests", ".git"} & set(p.relative_to(ROOT).parts))]  # fmt: skip


def test_no_module_but_distributed_touches_torch_distributed():
    offenders = []
    for path in project_sources():
        if path.name == "distributed.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Attribute) and node.attr == "distributed":
                names = ["torch.distributed"] if getattr(node.value, "id", "") == "torch" else []
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(project_sources()) > 20 and not offenders, offenders


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch.cuda answering as a machine with 8 GPUs would; set_device records its argument."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    yield chosen
    distributed._device = torch.device("cpu")


def test_a_bare_cuda_means_the_gpu_of_local_rank(fake_gpus):
    env = {"WORLD_SIZE": "1", "LOCAL_RANK": "1", "RANK": "0"}
    assert distributed.resolve_device("cuda", env) == torch.device("cuda", 1)
    assert distributed.resolve_device("auto", env) == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda:3", env) == torch.device("cuda", 3)  # one process
    assert distributed.resolve_device("cpu", env) == torch.device("cpu")
    # set_device gets an index: torch.cuda.set_device(torch.device("cuda")) raises on CUDA.
    assert distributed.start("cuda", env) == (0, 1, torch.device("cuda", 1))
    assert fake_gpus == [torch.device("cuda", 1)] and fake_gpus[0].index == 1
    assert distributed.collective_device() == torch.device("cuda", 1)


def test_a_numbered_gpu_is_refused_under_several_processes(fake_gpus):
    env = {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}
    with pytest.raises(ValueError, match=r"'cuda:1'.*2 processes.*LOCAL_RANK"):
        distributed.resolve_device("cuda:1", env)
    assert distributed.resolve_device("cuda", env) == torch.device("cuda", 1)


def test_training_starts_nccl_alone_with_the_configured_timeout(fake_gpus, monkeypatch):
    started = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: started.append((a, k)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    config = TrainConfig(device="cuda", collective_timeout=45.0)
    assert init_distributed(config) == (1, 2, torch.device("cuda", 1))
    assert started == [(("nccl",), {"timeout": timedelta(minutes=45)})]


def test_one_backend_serves_the_devices_it_is_given():
    capability = dist.Backend.backend_capability
    # NCCL alone on CUDA: a Gloo group besides would connect every rank at start-up for nothing,
    # since every collective's tensor lives on the rank's device (the next test).
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        assert device.type in capability[distributed.backend_for(device)]


class Recorded(Exception):
    """Raised by the stand-in collectives once they have seen their tensor."""


def test_every_collective_makes_its_tensor_on_the_rank_device(monkeypatch):
    # A stand-in device (meta) for the GPU: a tensor made without `device=` lands on the CPU.
    seen = []

    def collective(tensor, *args, **kwargs):
        seen.append((tensor.device.type, tensor.dtype))
        raise Recorded

    monkeypatch.setattr(distributed, "_device", torch.device("meta"))
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", collective)
    monkeypatch.setattr(dist, "broadcast", collective)
    monkeypatch.setattr(dist, "all_gather_into_tensor", collective)
    calls = [
        lambda: distributed.sum_values([1, 2]), lambda: distributed.max_value(3),
        lambda: distributed.min_value(3), lambda: distributed.any_rank(True),
        lambda: distributed.broadcast_value(1.5), lambda: distributed.broadcast_text("x"),
        lambda: distributed.union_of_indices([1], 4), distributed.barrier,
        lambda: distributed.all_texts("x"),
        lambda: distributed.raise_together(ValueError("x")),
        lambda: distributed.broadcast_module(torch.nn.Linear(2, 2, device="meta")),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(Recorded):
            call()
    assert len(seen) == len(calls) and {d for d, _ in seen} == {"meta"}, seen
    assert {t for _, t in seen} <= {torch.float64, torch.int32, torch.int64, torch.float32}
    with pytest.raises(ValueError, match="tensor on cpu"):
        distributed.sum_tensor(torch.zeros(2))  # a CPU tensor handed over is refused


def test_alone_every_collective_returns_its_own_value():
    assert distributed.sum_values([1, 2.5]) == [1.0, 2.5]
    assert distributed.max_value(2) == 2 and distributed.min_value(-3) == -3
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.broadcast_text("héllo") == "héllo"
    assert distributed.all_texts("héllo") == ["héllo"]
    assert distributed.union_of_indices({3: "bad", 1: "bad"}, 5) == [1, 3]
    distributed.raise_together(None)
    with pytest.raises(FloatingPointError, match="boom"):
        distributed.raise_together(FloatingPointError("boom"))
