"""model/ and data/ must run on a bare GPU box with torch + pyarrow: no prefect, no mlflow."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gptflow.data.code_version import module_file

PURE_LAYERS = ("model", "data")
FORBIDDEN = ("prefect", "mlflow", "gptflow.tasks", "gptflow.flows")


def _layer_dir(layer: str) -> Path:
    return module_file(f"gptflow.{layer}").parent


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _forbidden(name: str) -> bool:
    return any(name == upper or name.startswith(upper + ".") for upper in FORBIDDEN)


@pytest.mark.parametrize("layer", PURE_LAYERS)
def test_pure_layers_do_not_import_orchestration_or_tracking(layer):
    offenders = {
        path.name: sorted(filter(_forbidden, _imported_names(path))) for path in _layer_dir(layer).rglob("*.py")
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert not offenders, f"these {layer}/ modules import upper layers or prefect/mlflow: {offenders}"


def test_importing_every_pure_module_loads_no_prefect_or_mlflow():
    modules = [
        f"gptflow.{layer}.{path.stem}"
        for layer in PURE_LAYERS
        for path in sorted(_layer_dir(layer).glob("*.py"))
        if path.stem != "__init__"
    ]
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r})))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_no_top_level_layer_packages_are_installed():
    """The layers are importable only as gptflow.*: a user's own `data` or `model` package wins."""
    probe = "import importlib.util; print([n for n in ('data', 'model', 'tasks', 'flows') if importlib.util.find_spec(n)])"
    found = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout
