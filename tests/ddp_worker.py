"""The training scenario of tests/two_process_worker.py: trains, then saves this rank's weights and
what it saw.

A scenario's switches make failures: nan_on_rank=r makes that rank's third training loss NaN;
output_dir_per_rank gives every rank its own output_dir; skew_best_on_rank=r makes that rank read
other weights from best.pt (as a stale copy on another machine would); fixed_cider=x makes rank
0's validation CIDEr x (the ranks must all end up with it) and records the images each rank
captioned and scored for validation.
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist

from captioning.config import TrainConfig
from captioning.data.loading import ImageCaptionsDataset
from captioning.data.training_data import IndexedImages
from captioning.training import train as train_module

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce", "gather",
               "scatter", "barrier")  # fmt: skip


def record_collectives(calls, patch):
    """Wrap torch.distributed's collectives: each call appends (name, device, dtype)."""
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            calls.append((_name, str(tensor.device) if tensor is not None else None,
                          str(tensor.dtype) if tensor is not None else None))  # fmt: skip
            return _real(*args, **kwargs)

        patch.setattr(dist, name, wrapper)


def train_scenario(scenario, out, rank, patch):
    """Train with scenario["config"] and its switches (`patch` undoes every change afterwards);
    write rank<r>.pt (weights), rank<r>_reads.json (epoch, image), rank<r>_scst_reads.json
    (images read by the self-critical stage), rank<r>_scst_start.pt (weights the self-critical
    stage started from), rank<r>_collectives.json, rank<r>_history.json and
    rank<r>_statistics.json (batch-norm running mean at each training step's start)."""
    switches = scenario.get("switches", {})
    models, reads, scst_reads, calls, statistics = [], [], [], [], []
    build_model, get_item = train_module.build_model, ImageCaptionsDataset.__getitem__
    get_image, run_scst = IndexedImages.__getitem__, train_module.run_self_critical_epoch

    def keep_model(*args, **kwargs):
        models.append(build_model(*args, **kwargs))
        for norm in (m for m in models[-1].modules() if isinstance(m, torch.nn.BatchNorm1d)):
            norm.register_forward_pre_hook(record_statistics)
        return models[-1]

    def record_statistics(norm, args):
        if norm.training:  # the running mean a training step starts from
            statistics.append(norm.running_mean.sum().item())

    def record_read(dataset, index):
        if dataset.captions.split.name == "train":
            reads.append((dataset.epoch, int(dataset.images[index])))
        return get_item(dataset, index)

    def record_image(dataset, index):
        scst_reads.append(int(dataset.images[index]))
        return get_image(dataset, index)

    def record_scst_start(model, *args, **kwargs):
        if not (out / f"rank{rank}_scst_start.pt").exists():
            (out / f"rank{rank}_seed.json").write_text(json.dumps(torch.initial_seed()))
            torch.save(model.state_dict(), out / f"rank{rank}_scst_start.pt")
        return run_scst(model, *args, **kwargs)

    patch.setattr(train_module, "build_model", keep_model)
    patch.setattr(ImageCaptionsDataset, "__getitem__", record_read)
    patch.setattr(IndexedImages, "__getitem__", record_image)
    patch.setattr(train_module, "run_self_critical_epoch", record_scst_start)
    config = dict(scenario["config"])
    if switches.get("nan_on_rank") == rank:
        real_loss, steps = train_module.caption_loss, []

        def nan_at_third_step(*args, **kwargs):
            steps.append(1)
            terms = real_loss(*args, **kwargs)
            return terms._replace(loss=terms.loss * float("nan")) if len(steps) == 3 else terms

        patch.setattr(train_module, "caption_loss", nan_at_third_step)
    if switches.get("output_dir_per_rank"):
        config["output_dir"] = str(Path(config["output_dir"]) / f"rank{rank}")
    if switches.get("skew_best_on_rank") == rank:
        real_load = train_module.load_checkpoint

        def skewed(path, *args, **kwargs):
            state = real_load(path, *args, **kwargs)
            if Path(path).name == "best.pt":
                state["model"] = {k: v + 1 if v.is_floating_point() else v
                                  for k, v in state["model"].items()}  # fmt: skip
            return state

        patch.setattr(train_module, "load_checkpoint", skewed)
    if "fixed_cider" in switches:
        captioned, scored = [], []
        real_predict = train_module.predict_captions

        def predict(*args, **kwargs):
            captioned.append(sorted(predictions := real_predict(*args, **kwargs)))
            return predictions

        def score(predictions, references):
            scored.append(sorted(predictions))
            return float(switches["fixed_cider"])

        patch.setattr(train_module, "predict_captions", predict)
        patch.setattr(train_module, "cider_score", score)
    record_collectives(calls, patch)
    try:
        history = train_module.train(TrainConfig(**config))
    finally:
        (out / f"rank{rank}_collectives.json").write_text(json.dumps(calls))
    torch.save(models[0].state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}_reads.json").write_text(json.dumps(reads))
    (out / f"rank{rank}_scst_reads.json").write_text(json.dumps(scst_reads))
    (out / f"rank{rank}_history.json").write_text(json.dumps(history))
    (out / f"rank{rank}_statistics.json").write_text(json.dumps(statistics))
    if "fixed_cider" in switches:
        validation = {"captioned": captioned, "scored": scored}
        (out / f"rank{rank}_validation.json").write_text(json.dumps(validation))
