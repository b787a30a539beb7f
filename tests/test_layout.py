"""The layout: imports run one way, from the commands and top-level modules into the package."""

import ast

from tests.helpers import ROOT

# What the repository's top level holds besides the package: the user's modules and the commands.
TOP_LEVEL = {"data_loader", "vocabulary", "train", "evaluate", "caption", "demo", "download"}


def imported_names(path):
    """Every module a file imports, deferred imports included, by its full dotted name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


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
    # Each console script names a `main` that exists, and each thin command calls the same one.
    scripts = project["project"]["scripts"]
    for script, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), script
    for name in ("train", "evaluate", "caption", "demo", "download"):
        command = ast.parse((ROOT / f"{name}.py").read_text()).body[1]
        assert f"{command.module}:main" == scripts[f"captioning-{name}"]
    # requirements.txt (what `make venv` installs) is the project itself, with its extras.
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    assert [line for line in lines if not line.startswith("#")] == ["-e .[notebooks,dev]"]
