"""The four tutorial notebooks: one parameters cell, no logic of their own, committed with the
outputs of a run top to bottom (`make notebooks`), and they run top to bottom afresh (on a tiny
demo dataset, with small settings injected after the parameters cell as papermill does)."""

import ast
import asyncio
import copy
import dataclasses
import json
import os
import re
import time

import nbformat
import pytest

from bench import real_data
from captioning.demo.dataset import read_marker
from captioning.notebooks import data_settings
from tests.flickr8k_folder import image_name, make_flickr8k_folder
from tests.helpers import COCO_SAMPLE, ROOT, make_feature_folder

NOTEBOOKS = ("0_Dataset.ipynb", "1_Preliminaries.ipynb", "2_Training.ipynb", "3_Inference.ipynb")
# Notebooks call the project's modules; definitions and loops belong in those modules
# (comprehensions for display are fine). One exception: the cell tagged `cvnd-loop` holds the
# CVND training loop, one `for` loop, as the CVND student writes it.
FORBIDDEN_TEXT = re.compile(r"\b(class|def)\s")
FORBIDDEN_NODES = (
    ast.ClassDef,
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.For,
    ast.AsyncFor,
    ast.While,
)
LOOP_TAG = "cvnd-loop"
# An absolute path of the machine that ran a notebook: a root folder such systems put users'
# files, temporary files or software under, at the start of a path; or a Windows drive.
ROOTS = (
    "home", "root", "Users", "tmp", "var", "work", "workspace", "opt", "mnt", "srv", "data",
    "scratch", "private", "usr", "media", "nfs", "gpfs", "lustre", "nix", "Library", "Volumes",
    "content", "builds", "runner",
)  # fmt: skip
ABSOLUTE_PATH = re.compile(rf"(?<![\w.~/-])/(?:{'|'.join(ROOTS)})/|(?<![A-Za-z])[A-Za-z]:\\\w")
# Calls whose cell must show something: printing, or a figure drawn (inline, shown at the end).
SHOWING = re.compile(r"print|display|show|plot_\w+")


def read(name):
    return nbformat.read(ROOT / name, as_version=4)


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def forbidden(cell):
    """The names of the definitions and loops in a code cell."""
    return [
        type(node).__name__
        for node in ast.walk(ast.parse(cell.source))
        if isinstance(node, FORBIDDEN_NODES)
    ]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_one_parameters_cell_and_no_logic(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown", "a notebook opens with a markdown introduction"
    parameter_cells = [k for k, c in enumerate(nb.cells) if "parameters" in tags(c)]
    assert parameter_cells == [1] and nb.cells[1].cell_type == "code", (
        "exactly one parameters cell, right after the introduction"
    )
    assert not any("injected-parameters" in tags(c) for c in nb.cells)
    for k, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert not FORBIDDEN_TEXT.search(cell.source), f"cell {k} defines something:\n{cell.source}"
        allowed = ["For"] if LOOP_TAG in tags(cell) else []
        assert forbidden(cell) == allowed, (
            f"cell {k} has {forbidden(cell)} (definitions and loops go in the modules):\n"
            f"{cell.source}"
        )


def test_one_cell_holds_the_cvnd_loop():
    cells = [(name, c) for name in NOTEBOOKS for c in read(name).cells if LOOP_TAG in tags(c)]
    assert [name for name, _ in cells] == ["1_Preliminaries.ipynb"]
    source = cells[0][1].source
    assert "criterion(outputs.view(-1, vocab_size), captions.view(-1))" in source
    assert "loss.backward()" in source and "optimizer.step()" in source and "print(" in source


def output_texts(output):
    """Everything an output shows as text (images' base64 data left out)."""
    if output.output_type == "stream":
        return [output.text]
    if output.output_type == "error":
        return [output.ename, output.evalue, *output.traceback]
    data = output.get("data", {})
    return [str(v) for mime, v in data.items() if not mime.startswith(("image/png", "image/jp"))]


def run_problems(nb):
    """What shows that a notebook's outputs are not those of one run top to bottom: execution
    counts other than 1, 2, 3, ... in cell order, a cell that shows something without its
    output, an error, a progress bar, an absolute path of the machine that ran it."""
    problems = []
    code = [(k, c) for k, c in enumerate(nb.cells) if c.cell_type == "code"]
    counts = [c.execution_count for _, c in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"execution counts {counts}, not 1 to {len(code)} in order")
    for k, cell in code:
        calls = {
            node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            for node in ast.walk(ast.parse(cell.source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
        }
        if not cell.outputs and any(SHOWING.fullmatch(call) for call in calls):
            problems.append(f"cell {k} shows something but has no output")
        for output in cell.outputs:
            if output.output_type == "error":
                problems.append(f"cell {k} has an error: {output.ename}: {output.evalue}")
            widget = "application/vnd.jupyter.widget-view+json" in output.get("data", {})
            if widget and "widget" not in tags(cell):  # the upload button's cell is tagged
                problems.append(f"cell {k} has a widget (a progress bar?)")
            if output.get("execution_count", cell.execution_count) != cell.execution_count:
                problems.append(f"cell {k}'s result has another execution count")
            texts = output_texts(output)
            if output.output_type == "stream" and "\r" in output.text:
                problems.append(f"cell {k} has a progress bar (carriage returns)")
            paths = [m.group() for text in texts for m in ABSOLUTE_PATH.finditer(text)]
            if paths:
                problems.append(f"cell {k} shows absolute paths of its machine: {paths[:3]}")
    return problems


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_ran_top_to_bottom(name):
    """The committed notebook holds the outputs of one run, in order (`make notebooks`)."""
    problems = run_problems(read(name))
    assert not problems, f"{name} (run `make notebooks`):\n" + "\n".join(problems)


def clear_outputs(nb):
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.outputs)
    cell.outputs = []


def run_out_of_order(nb):
    first, second = [c for c in nb.cells if c.cell_type == "code"][2:4]
    first.execution_count, second.execution_count = second.execution_count, first.execution_count


def show_a_path(nb):
    stream = next(o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text" in o)
    stream.text += "dataset folder: /home/someone/captioning/data/demo\n"


def fail_a_cell(nb):
    cell = [c for c in nb.cells if c.cell_type == "code"][-1]
    cell.outputs.append(nbformat.v4.new_output("error", ename="ValueError", evalue="bad"))


@pytest.mark.parametrize("change", [clear_outputs, run_out_of_order, show_a_path, fail_a_cell])
def test_the_run_check_finds_a_notebook_not_run_in_order(change):
    nb = copy.deepcopy(read(NOTEBOOKS[0]))
    assert not run_problems(nb)
    change(nb)
    assert run_problems(nb)


def test_notebooks_default_to_the_demo():
    """Each parameters cell names the dataset; what the notebooks share (each dataset's folder,
    layout, demo options) is written once in captioning/notebooks.py, and the MS-COCO table once
    in docs/notebooks.md, to which every notebook links."""
    assert data_settings("demo").data_dir == "data/demo"
    assert (ROOT / "docs" / "notebooks.md").exists()
    for name in NOTEBOOKS:
        nb = read(name)
        source = next(c.source for c in nb.cells if "parameters" in tags(c))
        assert 'DATASET = "demo"' in source and "DATA_DIR = None" in source, name
        shared = re.findall(r"^(LAYOUT|DEMO_OPTIONS|COCO_\w+) =", source, re.MULTILINE)
        assert not shared, f"{name}: {shared} belong in captioning/notebooks.py"
        markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        assert "](docs/notebooks.md)" in markdown, name
        assert not re.search(r"^\|.*`DATA(SET|_DIR)`", markdown, re.MULTILINE), (
            f"{name} copies the MS-COCO table of docs/notebooks.md"
        )


def strip_outputs(nb):
    """The notebook as it would be before any run: no outputs, no execution counts."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def inject(nb, values):
    """Insert papermill's 'injected-parameters' cell right after the parameters cell."""
    index = next(k for k, c in enumerate(nb.cells) if "parameters" in tags(c))
    known = nb.cells[index].source
    for key in values:
        assert re.search(rf"^{key} =", known, re.MULTILINE), f"{key} is not a parameter"
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


# Each dataset's notebooks, in chains that run in this order. On the demo, notebooks 0 and 1
# read no training output: they run beside training. The COCO chain runs all four on the real
# COCO sample, as a COCO user would, with random CNN weights and tiny epochs; the Flickr8k chain
# the same on a Flickr8k folder of 36 tiny images that the test makes (tests/flickr8k_folder.py).
CHAINS = {
    "demo": (NOTEBOOKS[:2], NOTEBOOKS[2:]),
    "coco2017": (NOTEBOOKS,),
    "flickr8k": (NOTEBOOKS,),
    # The demo again, its second model trained on a folder of precomputed region features.
    "demo-features": (NOTEBOOKS[2:],),
}
# Small models: the demo's decoders, and the COCO and Flickr8k presets with ResNet-18 on small
# images. The demo runs the transformer as the second model, COCO and Flickr8k the attention
# decoder (their presets' transformer, 6 + 6 layers, would take most of the suite's time): between
# them, both grid decoders.
GRID = {"demo": "transformer", "coco2017": "attention", "flickr8k": "attention",
        "demo-features": "transformer"}  # fmt: skip
SMALL_MODEL = dict(IMAGE_SIZE=32, EMBED_SIZE=32, HIDDEN_SIZE=32)
COCO_MODEL = dict(BACKBONE="resnet18", PRETRAINED=False, IMAGE_SIZE=64, EMBED_SIZE=32,
                  HIDDEN_SIZE=32)  # fmt: skip


def notebook_values(root, folder, chain, features_dir=None):
    """Each notebook's injected settings: the test dataset, a tiny model, outputs in `folder`;
    with `features_dir`, the second model reads that folder's features."""
    dataset = chain.removesuffix("-features")
    model = SMALL_MODEL if dataset == "demo" else COCO_MODEL
    data = dict(DATASET=dataset, DATA_DIR=str(root))
    out = folder / "outputs"
    my_image = {
        "demo": root / "test2017" / "000002000001.png",
        "coco2017": root / "val2017" / "000000431848.jpg",  # the sample's grayscale image
        "flickr8k": root / "Flicker8k_Dataset" / image_name(30),  # its first test image
    }[dataset]
    return {
        "0_Dataset.ipynb": dict(data, N_IMAGES=4, N_WORDS=10),
        "1_Preliminaries.ipynb": dict(
            data,
            **model,
            BATCH_SIZE=4,
            THRESHOLDS=[1, 5],
            VOCAB_FILE=str(folder / "vocab.json"),
            STEPS=2,
            PRINT_EVERY=1,
        ),  # fmt: skip
        "2_Training.ipynb": dict(
            data,
            **model,
            OUTPUT_DIR=str(out / "showtell"),
            GRID_DECODER=GRID[dataset],
            GRID_OUTPUT_DIR=str(out / GRID[dataset]),
            FEATURES_DIR=features_dir and str(features_dir),
            EPOCHS=1,
            GRID_EPOCHS=1,
            SCST_EPOCHS=1,
            BATCH_SIZE=16,
            VAL_IMAGES=8,
            NUM_WORKERS=0,
            PROGRESS=False,
        ),  # fmt: skip
        "3_Inference.ipynb": dict(
            data,
            CHECKPOINT=str(out / "showtell" / "best.pt"),
            GRID_CHECKPOINT=str(out / GRID[dataset] / "best.pt"),
            BEAM_SIZE=2,
            LIMIT=10,
            RESULTS_DIR=str(out / "inference"),
            N_SHOW=2,
            N_MAPS=2,
            N_BEST_WORST=2,
            MY_IMAGE=str(my_image),
            SAMPLES=2,
            DIVERSE_BEAM_SIZE=4,
            GROUPS=2,
        ),  # fmt: skip
    }


@pytest.fixture(scope="module")
def executed_notebooks(demo_root, tmp_path_factory):
    """{dataset: (folder, {name: executed notebook}, error or None)}, each in a fresh kernel;
    the COCO chain only where the real COCO sample is ($CAPTIONING_TEST_DATA)."""
    from nbclient import NotebookClient

    # The notebooks' get_data must find the fixture's dataset as it is (a demo dataset is used
    # as it was made), never regenerate the folder other tests share.
    assert read_marker(demo_root)["n_train"] < 100
    flickr8k_root = make_flickr8k_folder(tmp_path_factory.mktemp("flickr8k-data") / "flickr8k")
    roots = {"demo": demo_root, "coco2017": COCO_SAMPLE, "flickr8k": flickr8k_root,
             "demo-features": demo_root}  # fmt: skip
    regions = make_feature_folder(tmp_path_factory.mktemp("regions"), demo_root, "npz")
    chains = {d: c for d, c in CHAINS.items() if d != "coco2017" or COCO_SAMPLE.is_dir()}
    folders = {dataset: tmp_path_factory.mktemp(dataset) for dataset in chains}
    executed = {dataset: {} for dataset in chains}
    errors = {dataset: None for dataset in chains}

    async def run_chain(dataset, names, kernels):
        folder = folders[dataset]
        for name in names:
            features = regions if dataset.endswith("-features") else None
            values = notebook_values(roots[dataset], folder, dataset, features)[name]
            nb = inject(strip_outputs(read(name)), values)
            client = NotebookClient(
                nb,
                timeout=300,
                kernel_name="python3",
                resources={"metadata": {"path": str(folder)}},
            )
            async with kernels:
                started = time.time()
                try:
                    # Raises CellExecutionError, naming the cell and the error, if any cell fails.
                    await client.async_execute()
                except Exception as error:
                    errors[dataset] = errors[dataset] or error
                    return  # the chain's next notebooks read this one's outputs
            print(f"{dataset} {name}: {time.time() - started:.1f} s")
            executed[dataset][name] = nb

    async def run_all():
        # Two kernels at a time, one per core: a kernel computes on one thread and spends
        # seconds importing torch, so two chains side by side take about half as long.
        kernels = asyncio.Semaphore(2)
        runs = [(dataset, names) for dataset in chains for names in chains[dataset]]
        await asyncio.gather(*(run_chain(dataset, names, kernels) for dataset, names in runs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        # One thread: tiny models gain nothing from more, and on a busy machine (tests or
        # kernels running in parallel) extra OpenMP threads make them many times slower.
        patch.setenv("OMP_NUM_THREADS", "1")
        # As for a user without Java: evaluate scores in Python (tokenisation, no METEOR), which
        # saves the JVM's start-ups; tests/test_coco_metrics.py checks the Java path.
        no_java = tmp_path_factory.mktemp("no-java")
        (no_java / "java").write_text("#!/bin/sh\nexit 1\n")
        (no_java / "java").chmod(0o755)
        patch.setenv("PATH", os.pathsep.join([str(no_java), os.environ["PATH"]]))
        # CAPTIONING_CACHE already points to a temporary folder (conftest): kernels inherit it.
        asyncio.run(run_all())
    return {dataset: (folders[dataset], executed[dataset], errors[dataset]) for dataset in chains}


def printed(nb, needle):
    """Everything the code cells whose source holds `needle` printed."""
    cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert cells, f"no cell with {needle!r}"
    return "".join(o.get("text", "") for c in cells for o in c.outputs)


def images(nb, needle):
    """The images drawn by the code cells whose source holds `needle`."""
    cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    return [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]


@pytest.mark.parametrize("dataset", CHAINS)
def test_notebooks_run_in_order(executed_notebooks, dataset):
    if dataset not in executed_notebooks:
        pytest.skip(real_data.missing(COCO_SAMPLE))
    folder, executed, error = executed_notebooks[dataset]
    if error:
        raise error
    assert sorted(executed) == sorted(name for names in CHAINS[dataset] for name in names)
    features = dataset.endswith("-features")
    dataset = dataset.removesuffix("-features")
    out = folder / "outputs"
    # Show and Tell trained; the transformer trained, then resumed into its self-critical epoch.
    assert (out / "showtell" / "best.pt").exists() and (out / "showtell" / "vocab.json").exists()
    grid = GRID[dataset]
    history = (out / grid / "history.csv").read_text().splitlines()
    assert [row.split(",")[8] for row in history[1:]] == ["xe", "scst"]
    assert (out / grid / "best_cross_entropy.pt").exists()
    inference = executed["3_Inference.ipynb"]
    # CVND's steps: the test-mode loader's image shown, sample's ids, the sentence, a prediction.
    assert images(inference, "orig_image, image = next(iter(data_loader))")
    assert "example output: [0, " in printed(inference, "decoder.sample(")
    assert "example sentence: " in printed(inference, "clean_sentence(")
    assert images(inference, "get_prediction(")
    # Both models over the split, greedy and beam; before and after self-critical training.
    table = printed(inference, "compare_results(table")
    assert "Show and Tell, greedy" in table and f"{grid}, beam 2" in table
    assert ("objects" in table) == (dataset == "demo")
    scst = printed(inference, "best_cross_entropy")
    assert "best_cross_entropy.pt" in scst and "before the self-critical stage" in scst
    if features:  # regions have no place on the image to draw a map at
        assert json.loads((out / grid / "config.json").read_text())["features_dir"]
        assert "reads precomputed features" in printed(inference, "attention_maps(")
        assert "Show and Tell" in printed(inference, "my_name")  # your image: an image model's
    else:
        assert len(images(inference, "attention_maps(")) == 2  # N_MAPS images, a panel per word
    assert (out / "inference" / grid / f"results_{data_settings(dataset).test_split}.json").exists()
    assert "sampled: " in printed(inference, "my_sampled")
    widget = next(c for c in inference.cells if "upload_widget(" in c.source)
    assert any(
        "application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in widget.outputs
    )
    if dataset != "demo" and not features:  # what a COCO or Flickr8k user is told at each point
        download = printed(executed["0_Dataset.ipynb"], "describe_download")
        size = {"coco2017": "20.4 GB", "flickr8k": "about 1 GB"}[dataset]
        assert f"{size} to download" in download
        assert "holds it already: nothing to download" in download
        epoch = printed(executed["1_Preliminaries.ipynb"], "describe_epoch")
        assert "2 steps took" in epoch and "an epoch of" in epoch
        caches = printed(executed["2_Training.ipynb"], "describe_caches")
        cached = {"coco2017": 239, "flickr8k": 30}[dataset]  # the train and val images
        assert f"cache: frozen resnet18 features (512,), float16 of {cached} images" in caches


def test_what_a_coco_user_is_told_before_downloading(tmp_path):
    from captioning.notebooks import describe_download, holds_dataset

    settings = data_settings("coco2017", tmp_path / "coco")
    text = describe_download(settings)
    # train2017 19.3 GB + val2017 0.8 GB + annotations 0.25 GB, the published sizes
    assert "3 archives" in text and "20.4 GB to download" in text and "nothing to" not in text
    assert "nothing to download" in describe_download(data_settings("demo"))
    # A COCO folder unpacked by other means is used as it is; an archive left half-way is not.
    for path in ("train2017", "val2017", "annotations"):
        (tmp_path / "coco" / path).mkdir(parents=True)
    for split in ("train", "val"):
        (tmp_path / "coco" / "annotations" / f"captions_{split}2017.json").write_text("{}")
    assert holds_dataset(settings) and describe_download(settings).endswith("nothing to download")
    (tmp_path / "coco" / "downloads").mkdir()
    (tmp_path / "coco" / "downloads" / "train2017.zip.part").write_bytes(b"half")
    assert not holds_dataset(settings)


def test_what_a_coco_user_is_told_before_training(tmp_path, monkeypatch):
    from captioning.notebooks import describe_caches, describe_epoch, training_preset

    monkeypatch.setenv("CAPTIONING_CACHE", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path.parent))  # the cache's folder shown from "~"
    # Karpathy's 113,287 + 5,000 train and val images: ResNet-101's pooled 2048 float16 each,
    # or its 14 x 14 grid at 448 px for the attention decoders.
    pooled = describe_caches(training_preset("coco2014"), 118_287)
    assert f"(2048,), float16 of 118,287 images, 485 MB in ~/{tmp_path.name} (" in pooled
    grid = describe_caches(training_preset("coco2014", "attention"), 118_287)
    assert "(196, 2048)" in grid and "95 GB" in grid
    assert "decoded images of 4,500 images, 55.3 MB" in describe_caches(training_preset(), 4500)
    features = dataclasses.replace(training_preset(), features_dir="bu", trainable_blocks=0,
                                   cache_images=False)  # fmt: skip
    assert (
        describe_caches(features, 10)
        == "no cache: the precomputed features in bu are read as they are"
    )
    text = describe_epoch(30.0, 20, 11_829)
    assert text == (
        "20 steps took 30.0 s (1.50 s a step): an epoch of 11829 steps takes about 4.9 h here"
    )


def test_one_table_compares_several_results(demo_root):
    from captioning.notebooks import compare_results

    annotations = demo_root / "annotations" / "captions_test2017.json"
    split = json.loads(annotations.read_text())
    image = split["images"][0]
    right = " and ".join(f"a {o['color']} {o['shape']}" for o in image["objects"])

    def result(cider, caption, repeats):
        metrics = {"Bleu_4": 0.5, "CIDEr": cider, "ROUGE_L": 0.7}
        health = {"bad_endings": 0.0, "repeats": repeats, "distinct_captions": 1.0}
        return {"metrics": metrics, "health": health, "predictions": {image["id"]: caption}}

    table = compare_results(
        {"greedy": result(2.5, right, 0.25), "beam 3": result(1.25, "a tiny dot", 0.0)},
        annotations,
    ).splitlines()
    assert table[0].split() == ["CIDEr", "BLEU-4", "ROUGE-L", "objects", "bad", "end", "repeats",
                                "novel", "distinct"]  # fmt: skip
    assert table[1].split() == ["greedy", "2.500", "0.500", "0.700", "100.0%", "0.0%", "25.0%",
                                "-", "100.0%"]  # fmt: skip
    assert table[2].split()[:6] == ["beam", "3", "1.250", "0.500", "0.700", "0.0%"]
    assert "objects" not in compare_results({"greedy": result(2.5, right, 0.0)})
