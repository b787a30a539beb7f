"""The four tutorial notebooks: committed clean, one parameters cell, no logic of their own, and
they run top to bottom (on a tiny demo dataset, with small settings injected after the
parameters cell as papermill does)."""

import ast
import asyncio
import os
import re
import shutil
import time

import nbformat
import pytest

from captioning.demo.dataset import read_marker
from tests.helpers import ROOT

NOTEBOOKS = ("0_Dataset.ipynb", "1_Preliminaries.ipynb", "2_Training.ipynb", "3_Inference.ipynb")
# Notebooks call the project's modules; definitions and loops belong in those modules
# (comprehensions for display are fine).
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


def read(name):
    return nbformat.read(ROOT / name, as_version=4)


def tags(cell):
    return cell.get("metadata", {}).get("tags", [])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean(name):
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
        assert cell.outputs == [] and cell.execution_count is None, f"cell {k} has outputs"
        assert not FORBIDDEN_TEXT.search(cell.source), f"cell {k} defines something:\n{cell.source}"
        found = [
            type(node).__name__
            for node in ast.walk(ast.parse(cell.source))
            if isinstance(node, FORBIDDEN_NODES)
        ]
        assert not found, (
            f"cell {k} has {found} (definitions and loops go in the modules):\n{cell.source}"
        )


def test_notebooks_default_to_the_demo():
    for name in NOTEBOOKS:
        source = next(c.source for c in read(name).cells if "parameters" in tags(c))
        assert 'DATASET = "demo"' in source and 'DATA_DIR = "data/demo"' in source, name


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


# Each decoder's notebooks, in chains that run in this order; notebooks 0 and 1 do not depend
# on the decoder (they read no training output): the attention run starts at training.
CHAINS = {"showtell": (NOTEBOOKS[:2], NOTEBOOKS[2:]), "attention": (NOTEBOOKS[2:],)}


def notebook_values(demo_root, folder, decoder):
    """Each notebook's injected settings: the test dataset, a tiny model, outputs in `folder`."""
    # The notebooks' make_demo_dataset call must find the fixture's dataset as it is (same
    # parameters), never regenerate the folder other tests share.
    marker = read_marker(demo_root)
    options = {
        k: marker[k] for k in ("n_train", "n_val", "n_test", "image_size", "seed", "max_shapes")
    }
    data = dict(DATA_DIR=str(demo_root), DEMO_OPTIONS=options)
    model = dict(IMAGE_SIZE=32, EMBED_SIZE=32, HIDDEN_SIZE=32)
    checkpoint_dir = folder / "outputs" / "model"
    return {
        "0_Dataset.ipynb": dict(data, N_IMAGES=4, N_WORDS=10),
        "1_Preliminaries.ipynb": dict(
            data, **model, BATCH_SIZE=4, THRESHOLDS=[1, 5], VOCAB_FILE=str(folder / "vocab.json")
        ),
        "2_Training.ipynb": dict(
            data,
            **model,
            OUTPUT_DIR=str(checkpoint_dir),
            DECODER=decoder,
            EPOCHS=1,
            MORE_EPOCHS=1,
            SCST_EPOCHS=1,
            BATCH_SIZE=32,
            VAL_IMAGES=8,
            NUM_WORKERS=0,
            PROGRESS=False,
        ),
        "3_Inference.ipynb": dict(
            data,
            CHECKPOINT=str(checkpoint_dir / "best.pt"),
            BEAM_SIZE=2,
            LIMIT=10,
            RESULTS_DIR=str(folder / "outputs" / "inference"),
            N_SHOW=2,
            N_BEST_WORST=2,
            MY_IMAGE=str(demo_root / "test2017" / "000002000001.png"),
        ),
    }


@pytest.fixture(scope="module")
def executed_notebooks(demo_root, tmp_path_factory):
    """{decoder: (folder, {name: executed notebook}, error or None)}, each in a fresh kernel."""
    from nbclient import NotebookClient

    folders = {decoder: tmp_path_factory.mktemp(decoder) for decoder in CHAINS}
    executed = {decoder: {} for decoder in CHAINS}
    errors = {decoder: None for decoder in CHAINS}

    async def run_chain(decoder, names, kernels):
        folder = folders[decoder]
        for name in names:
            shutil.copy(ROOT / name, folder / name)
            values = notebook_values(demo_root, folder, decoder)[name]
            nb = inject(nbformat.read(folder / name, as_version=4), values)
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
                    errors[decoder] = errors[decoder] or error
                    return  # the chain's next notebooks read this one's outputs
            print(f"{decoder} {name}: {time.time() - started:.1f} s")
            executed[decoder][name] = nb

    async def run_all():
        # Two kernels at a time, one per core: a kernel computes on one thread and spends
        # seconds importing torch, so two chains side by side take about half as long.
        kernels = asyncio.Semaphore(2)
        chains = [(decoder, names) for decoder in CHAINS for names in CHAINS[decoder]]
        await asyncio.gather(*(run_chain(decoder, names, kernels) for decoder, names in chains))

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
    return {decoder: (folders[decoder], executed[decoder], errors[decoder]) for decoder in CHAINS}


@pytest.mark.parametrize("decoder", CHAINS)
def test_notebooks_run_in_order(executed_notebooks, decoder):
    folder, executed, error = executed_notebooks[decoder]
    if error:
        raise error
    assert sorted(executed) == sorted(name for names in CHAINS[decoder] for name in names)
    nb = executed["3_Inference.ipynb"]
    cell = next(c for c in nb.cells if "attention_maps(" in c.source)
    kinds = {o.get("output_type") for o in cell.outputs}
    images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
    if decoder == "attention":
        assert len(images) == 2, kinds  # N_SHOW images, each with its words' maps
    else:
        assert not images and "no attention maps" in str(cell.outputs)
    # Both checkpoints of the self-critical run, scored side by side.
    cell = next(c for c in nb.cells if c.cell_type == "code" and "cross_entropy" in c.source)
    printed = "".join(o.get("text", "") for o in cell.outputs)
    assert "best_cross_entropy.pt" in printed and "CIDEr" in printed, printed
    checkpoint_dir = folder / "outputs" / "model"
    assert (checkpoint_dir / "best.pt").exists() and (checkpoint_dir / "last.pt").exists()
    assert (checkpoint_dir / "best_cross_entropy.pt").exists()
    history = (checkpoint_dir / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3, "one epoch, one more after resuming, one self-critical"
    assert [row.split(",")[8] for row in history[1:]] == ["xe", "xe", "scst"]
    assert (folder / "outputs" / "inference" / "results_test.json").exists()
