"""The layout: imports run one way, from the commands and top-level modules into the package,
and inside it down a declared order of layers, with no cycle."""

import ast

from tests.helpers import ROOT

# What the repository's top level holds besides the package: the user's modules and the commands.
TOP_LEVEL = {"data_loader", "vocabulary", "train", "evaluate", "caption", "demo", "download"}
# The package's layers, lowest first: a module imports from its own layer or lower ones only.
# A name covers a module, or a package and everything in it.
LAYERS = (
    ("model",),  # the user's model.py: torch and torchvision alone
    (
        "captioning.errors",
        "captioning.atomic_file",
        "captioning.command",
        "captioning.distributed",
        "captioning.plots",
        "captioning.timm_models",  # timm, imported only when a backbone names it
    ),  # fmt: skip
    ("captioning.data", "captioning.demo.dataset"),
    ("captioning.demo.small_cnn", "captioning.backbones", "captioning.transformer"),
    ("captioning.config", "captioning.presets"),
    ("captioning.checkpoint",),
    ("captioning.decoding",),
    ("captioning.evaluation", "captioning.demo.scoring"),
    ("captioning.training",),
    (
        "captioning.caption",
        "captioning.cvnd",
        "captioning.notebooks",
        "captioning.gpu_check",
        "captioning.demo.run",
    ),  # fmt: skip
)


def imported_names(path):
    """Every module a file imports, deferred imports included, by its full dotted name; for
    `from package import name`, also package.name (which may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def module_name(path, root=ROOT):
    """A file's dotted module name: captioning/data/loading.py -> captioning.data.loading."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(root=ROOT):
    """{module: the project modules it imports} for model.py and every module of the package."""
    paths = {
        module_name(p, root): p for p in [root / "model.py", *(root / "captioning").rglob("*.py")]
    }
    graph = {}
    for name, path in paths.items():
        found = set()
        for imported in imported_names(path):
            while imported and imported not in paths:  # package.name -> package
                imported = imported.rpartition(".")[0]
            if imported and imported != name and imported != "captioning":
                found.add(imported)
        graph[name] = found
    return graph


def layer_of(module):
    """The index in LAYERS of the entry that names `module` or a package holding it."""
    for k, layer in enumerate(LAYERS):
        if any(module == entry or module.startswith(entry + ".") for entry in layer):
            return k
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py's LAYERS")


def find_cycle(graph):
    """One import cycle as a list of modules (first repeated last), or None."""
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_package_imports_form_no_cycle():
    assert find_cycle(project_imports()) is None


def test_every_module_has_its_layer():
    modules = project_imports()
    for module in modules:
        if not any(other.startswith(module + ".") for other in modules):  # packages aside
            layer_of(module)  # raises for a module no layer names


def test_imports_run_down_the_layers():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})"
        for module, imports in sorted(project_imports().items())
        for imported in sorted(imports)
        if layer_of(imported) > layer_of(module)
    ]
    assert upward == []


def test_a_planted_cycle_and_an_upward_import_are_found(tmp_path):
    package = tmp_path / "captioning"
    (package / "data").mkdir(parents=True)
    (tmp_path / "model.py").write_text("import torch\n")
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "config.py").write_text("from captioning.data import loading\n")
    (package / "data" / "loading.py").write_text("def f():\n    from captioning import config\n")
    graph = project_imports(tmp_path)
    assert graph["captioning.data.loading"] == {"captioning.config"}
    assert find_cycle(graph) == [
        "captioning.config",
        "captioning.data.loading",
        "captioning.config",
    ]
    assert layer_of("captioning.config") > layer_of("captioning.data.loading")


def test_model_py_imports_nothing_of_the_project():
    assert project_imports()["model"] == set()


def test_the_package_imports_no_command_and_no_top_level_module_but_model():
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            TOP_LEVEL & {n.split(".")[0] for n in imported_names(path)}
        )
        for path in sorted((ROOT / "captioning").rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_top_level_holds_the_user_layout_and_thin_commands():
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert modules == TOP_LEVEL | {"model"}
    for name in ("train", "evaluate", "caption", "demo", "download"):
        body = ast.parse((ROOT / f"{name}.py").read_text()).body
        # a docstring, one import of the package's `main`, and the __main__ guard
        assert len(body) == 3, f"{name}.py is more than a thin command"
        assert body[1].module.startswith("captioning.") and body[1].names[0].name == "main"


def test_pyproject_installs_the_package_the_user_modules_and_the_commands():
    import importlib

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert set(setuptools["py-modules"]) == {"model", "data_loader", "vocabulary"}
    assert setuptools["packages"]["find"]["include"] == ["captioning*"]
    # setuptools finds a folder only through its __init__.py: every folder of code needs one.
    folders = {p.parent for p in (ROOT / "captioning").rglob("*.py")} - {ROOT / "captioning"}
    assert [f for f in folders if not (f / "__init__.py").exists()] == []
    # Each console script names a function that exists: a `command`'s exit-status entry point
    # (`main.console_script`; its `main` returns results, which the script would exit 1 with),
    # or gpu_check's `main`, which returns the status. Each thin command calls the same `main`.
    scripts = project["project"]["scripts"]
    for script, target in scripts.items():
        module, attributes = target.split(":")
        entry = importlib.import_module(module)
        for attribute in attributes.split("."):
            entry = getattr(entry, attribute)
        assert callable(entry), script
    assert scripts["captioning-gpu-check"] == "captioning.gpu_check:main"
    for name in ("train", "evaluate", "caption", "demo", "download"):
        command = ast.parse((ROOT / f"{name}.py").read_text()).body[1]
        assert f"{command.module}:main.console_script" == scripts[f"captioning-{name}"]
    # requirements.txt (what `make venv` installs) is the project itself, with its extras.
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert [line for line in lines if not line.startswith("#")] == ["-e .[notebooks,dev]"]
