"""Run by torchrun in tests/test_two_processes.py: every scenario of a plan in turn, in one process
group, so the tests pay for starting two processes (torch's imports, the gloo group) once.

Usage: torchrun ... tests/two_process_worker.py PLAN_JSON OUT_DIR

A scenario is {"name", "kind" (a key of KINDS), "timeout": seconds a rank
waits for the other in a collective, and the kind's own keys}; it writes into OUT_DIR/<name>/,
with $CAPTIONING_CACHE at OUT_DIR/<name>/cache. A rank that raises writes rank<r>_error.txt. A
rank that returns, or raises a DistributedError (raised by every rank together: the ranks are
still in step), writes rank<r>_done and goes on to the next scenario once every rank has ended
this one; any other error ends the launch, as a rank may be left waiting in a collective the
other never joins.
"""

import json
import os
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from captioning import distributed
from tests.cache_worker import build_caches, cache_failures, reopen_cut_short
from tests.ddp_worker import train_scenario

KINDS = {"train": train_scenario, "build_caches": build_caches,
         "reopen_cut_short": reopen_cut_short, "cache_failures": cache_failures}  # fmt: skip


def run(scenario, out, rank):
    """Run one scenario in `out`; every change it makes to modules or the environment is undone."""
    timeout = timedelta(seconds=scenario["timeout"])
    with pytest.MonkeyPatch.context() as patch:
        if dist.is_initialized():
            dist.set_timeout(timeout)
        else:  # the first scenario starts the group (train() itself calls distributed.start)
            patch.setattr(distributed, "start", partial(distributed.start, timeout=timeout))
        if scenario["kind"] != "train":
            distributed.start("cpu")
        patch.setenv("CAPTIONING_CACHE", str(out / "cache"))
        try:
            KINDS[scenario["kind"]](scenario, out, rank, patch)
        except Exception as e:
            (out / f"rank{rank}_error.txt").write_text(f"{type(e).__name__}: {e}")
            if not isinstance(e, distributed.DistributedError):
                raise
    (out / f"rank{rank}_done").touch()


def check_in_step(index):
    """Raise unless every rank has ended scenario `index`: a rank the other left waiting in one
    of its collectives fails here (a collective of another size, or a timeout), so the next
    scenario starts with the ranks in step or in a new launch."""
    mark = [-1, index, -1]  # a size and values no collective of a scenario passes for
    ends = [torch.zeros(3, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(ends, torch.tensor(mark))
    if any(end.tolist() != mark for end in ends):
        raise RuntimeError(f"the ranks are out of step after scenario {index}: {ends}")


def main(plan_json, out_dir):
    """Run each scenario of the plan at `plan_json` in OUT_DIR/<name>."""
    rank = int(os.environ["RANK"])
    for index, scenario in enumerate(json.loads(Path(plan_json).read_text())):
        out = Path(out_dir, scenario["name"])
        out.mkdir(parents=True, exist_ok=True)
        run(scenario, out, rank)
        check_in_step(index)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
