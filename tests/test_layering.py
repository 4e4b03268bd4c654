"""The package's layering: a module imports only modules before it in the book's order, chapter
modules never reach the studies, the registry or the results, and `import dlearn` stays light."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dlearn"

SHARED = ["fileio", "checks", "distributions", "datasets", "toys", "nets", "train", "shipped", "metrics"]
CHAPTERS = [
    "elbo", "vae", "hvae", "schedules", "vdm", "ddpm", "ddim", "diffusion", "score", "guidance", "text2image",
    "controlnet", "dreambooth", "inversion", "sd", "sd_train", "p2p",
]  # fmt: skip
# the machinery of the measured claims: results files, figures, then one study module per chapter
STUDIES = [
    "results", "plotting", "studies", "studies.classifier", "studies.vae", "studies.hvae", "studies.vdm",
    "studies.diffusion", "studies.text2image", "studies.controlnet", "studies.dreambooth", "studies.sd",
]  # fmt: skip
# the weights registry (imports the studies' recipes), then presentation and tooling
LAST = ["zoo", "widgets", "book", "bench", "smoke", "site", "exercises", "exercise_solutions"]
# The order of the book: a module may import only modules listed before it. A new module must be
# placed here (the test below fails until it is).
ORDER = SHARED + CHAPTERS + STUDIES + LAST
FORBIDDEN_TO_CHAPTERS = {m for m in STUDIES + LAST}


def _modules() -> list[str]:
    """Every module of the package, dotted below `dlearn` ("vae", "studies.vae"); a package by its name."""
    found = []
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return sorted(found)


def _source(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _known(name: str) -> str:
    """The longest prefix of a dotted name below `dlearn` that is a module of the package."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if _source(candidate).is_file():
            return candidate
    return parts[0]


def _imports(module: str) -> list[tuple[str, bool]]:
    """The dlearn modules `module` imports, each with whether the import stands at the top of the file."""
    tree = ast.parse(_source(module).read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "dlearn":
                names = [alias.name for alias in node.names]
            elif node.module.startswith("dlearn."):
                base = node.module[len("dlearn.") :]
                names = [_known(f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"dlearn.{module}: use absolute imports (from dlearn... import ...)")
        elif isinstance(node, ast.Import):
            names = [_known(a.name[len("dlearn.") :]) for a in node.names if a.name.startswith("dlearn.")]
        found += [(name, id(node) in top) for name in names]
    return found


def test_every_module_has_a_place_in_the_order():
    missing = [m for m in _modules() if m not in ORDER]
    assert not missing, f"place {missing} in ORDER in tests/test_layering.py"


@pytest.mark.parametrize("module", _modules())
def test_imports_only_earlier_modules(module):
    rank = ORDER.index(module)
    later = {m for m, _ in _imports(module) if m not in ORDER or ORDER.index(m) >= rank}
    assert not later, f"dlearn.{module} imports {sorted(later)}, which come later in the book (or itself)"


@pytest.mark.parametrize("module", _modules())
def test_dlearn_imports_stand_at_the_top(module):
    lazy = sorted({m for m, at_top in _imports(module) if not at_top})
    assert not lazy, f"dlearn.{module} imports {lazy} inside a function: dlearn modules are imported at the top"


@pytest.mark.parametrize("module", CHAPTERS)
def test_chapter_modules_hold_the_method_only(module):
    reached = {m for m, _ in _imports(module) if m in FORBIDDEN_TO_CHAPTERS or m.startswith("studies")}
    assert not reached, f"chapter module dlearn.{module} imports {sorted(reached)}: move that code to dlearn/studies/"
    lines = len(_source(module).read_text().splitlines())
    assert lines <= 420, f"dlearn.{module} has {lines} lines: split it along a real seam (about 400 at most)"


@pytest.mark.parametrize("module", _modules())
def test_no_module_paths_in_strings(module):
    """Code refers to code by import, never by "dlearn.module:attribute" strings resolved at run time."""
    text = _source(module).read_text()
    assert "importlib" not in text, f"dlearn.{module} imports code by name at run time"
    assert not re.search(r"[\"']dlearn(\.\w+)+:\w+[\"']", text), f"dlearn.{module} names code in a string"


def test_layering_check_catches_a_violation(tmp_path, monkeypatch):
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "vae.py").write_text("")
    (tmp_path / "zoo.py").write_text("")
    (tmp_path / "distributions.py").write_text(
        "from dlearn import zoo\nfrom dlearn.studies.vae import x\ndef f():\n    from dlearn.studies import vae\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert _imports("distributions") == [("zoo", True), ("studies.vae", True), ("studies.vae", False)]


def test_import_dlearn_is_light():
    code = (
        "import sys, dlearn, dlearn.distributions, dlearn.datasets, dlearn.toys, dlearn.nets, dlearn.train, dlearn.metrics, "
        "dlearn.zoo, dlearn.results, dlearn.plotting; "
        "heavy = [m for m in ('diffusers', 'transformers', 'matplotlib', 'sklearn', 'nbformat') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"importing dlearn pulled in {proc.stdout.strip()} {proc.stderr[-500:]}"
