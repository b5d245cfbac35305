"""The package's layers point down: a module imports only from its own layer or the layers below
(read from the source with ``ast``, imports inside functions included), and importing a light
module does not pull in a heavy library."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tulip_pipelines"

# lowest first; a top-level module or sub-package of tulip_pipelines in each
LAYERS = [
    {"params", "progress", "atomic"},  # foundations: no project imports but each other
    {"models"},
    {"data"},
    {"evaluation"},
    {"serving"},
    {"tracking"},
    {"training"},
    {"io", "pipelines", "params_checks", "hooks", "commands", "compare", "settings",
     "pipeline_registry", "__main__", "__init__"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def _part(module: str) -> str:
    """The layer name of a dotted module under tulip_pipelines (``tulip_pipelines`` itself is
    ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def project_imports(path: Path, package_dir: Path) -> list[tuple[int, str]]:
    """(line, module) of every tulip_pipelines import in ``path``, relative imports resolved."""
    relative_to = path.relative_to(package_dir.parent).with_suffix("").parts
    package = relative_to[:-1] if relative_to[-1] != "__init__" else relative_to[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base) + (f".{node.module}" if node.module else "")
            else:
                module = node.module or ""
            if module == "tulip_pipelines":  # from tulip_pipelines import atomic
                found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, module))
    return [(line, m) for line, m in found
            if m == "tulip_pipelines" or m.startswith("tulip_pipelines.")]


def upward_imports(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        owner = _part("tulip_pipelines." + ".".join(
            path.relative_to(package).with_suffix("").parts))
        if owner not in LEVEL:
            problems.append(f"{path.relative_to(package)}: not in any layer of {__name__}")
            continue
        for line, module in project_imports(path, package):
            target = _part(module)
            if target == owner:
                continue
            if target not in LEVEL or LEVEL[target] > LEVEL[owner]:
                problems.append(f"{path.relative_to(package)}:{line} ({owner}) imports {module} "
                                f"({target}, a layer above)")
    return problems


def test_no_module_imports_upward():
    assert upward_imports() == []


def test_the_check_finds_an_upward_import(tmp_path):
    fake = tmp_path / "tulip_pipelines"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "__init__.py").write_text("")
    (fake / "models" / "files.py").write_text(
        "def load(uri):\n    from tulip_pipelines.serving.registry import resolve_bundle\n")
    (fake / "data").mkdir()
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "split.py").write_text("from ..models import files\nfrom . import split\n")
    problems = upward_imports(fake)
    assert len(problems) == 1 and problems[0].startswith("models/files.py:2 (models) imports "
                                                         "tulip_pipelines.serving.registry")


@pytest.mark.parametrize("module, heavy", [
    ("tulip_pipelines.models.spec", "open_clip"),
    ("tulip_pipelines.models", "open_clip"),
    ("tulip_pipelines.params", "torch"),
    ("tulip_pipelines.serving.registry", "mlflow"),
])
def test_importing_a_light_module_pulls_in_no_heavy_library(module, heavy):
    code = f"import sys, {module}; print({heavy!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False", f"importing {module} imported {heavy}"
