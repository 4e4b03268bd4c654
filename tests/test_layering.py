"""A module imports only from shared modules and earlier chapters; `import dlearn` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dlearn"

# The order of the book: a module may import only modules listed before it. A new module must be
# placed here (the test below fails until it is).
ORDER = [
    # shared toolkit
    "distributions", "datasets", "nets", "train", "results", "plotting", "metrics", "zoo",
    # chapters, in reading order
    "elbo", "vae", "hvae", "schedules", "vdm", "ddpm", "ddim", "diffusion", "score", "guidance", "text2image",
    "controlnet", "dreambooth", "inversion", "sd",
    # presentation and tooling, which may use everything
    "widgets", "book", "bench",
]  # fmt: skip


def _modules():
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _dlearn_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):  # lazy imports inside functions count too
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "dlearn":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("dlearn."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dlearn.")}
    return found


def test_every_module_has_a_place_in_the_order():
    missing = [m for m in _modules() if m not in ORDER]
    assert not missing, f"place {missing} in ORDER in tests/test_layering.py"


@pytest.mark.parametrize("module", _modules())
def test_imports_only_earlier_modules(module):
    rank = ORDER.index(module)
    later = {m for m in _dlearn_imports(module) if m in ORDER and ORDER.index(m) >= rank}
    assert not later, f"dlearn.{module} imports {sorted(later)}, which come later in the book (or itself)"


def test_layering_check_catches_a_violation(tmp_path, monkeypatch):
    (tmp_path / "distributions.py").write_text("from dlearn import zoo\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert _dlearn_imports("distributions") == {"zoo"}


def test_import_dlearn_is_light():
    code = (
        "import sys, dlearn, dlearn.distributions, dlearn.datasets, dlearn.nets, dlearn.train, dlearn.metrics, "
        "dlearn.zoo, dlearn.results, dlearn.plotting; "
        "heavy = [m for m in ('diffusers', 'transformers', 'matplotlib', 'sklearn', 'nbformat') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"importing dlearn pulled in {proc.stdout.strip()} {proc.stderr[-500:]}"
