"""The package as people install it: `python -m build` makes a wheel that carries the code, the shipped
weights and the notebooks; installed into a fresh virtual environment it runs `python -m dlearn.book 00` from
a folder outside the repository. Also: the lock file pins every requirement, and the book runner's copy of the
shipped notebooks.

Nothing is downloaded: the wheel is built without build isolation, installed with --no-deps and --no-index,
and the fresh environment finds the dependencies in this interpreter's site-packages through a .pth file,
which Python reads after the environment's own site-packages (so the environment's dlearn comes first), and
their data files (nbconvert's templates) through JUPYTER_PATH.
"""

import email
import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import dlearn
from dlearn import book

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / ".ci" / "constraints.txt"
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.lock", ".*")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sources() -> list[Path]:
    """The files of the repository that the wheel must carry, relative to the repository."""
    files = [p for p in (ROOT / "dlearn").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files = [p for p in files if p.suffix not in (".pyc", ".lock") and not p.name.startswith(".")]
    return [p.relative_to(ROOT) for p in files] + [p.relative_to(ROOT) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the repository's package files (so no stale build/ folder leaks in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "dlearn", src / "dlearn", ignore=IGNORE)
    shutil.copytree(ROOT / "notebooks", src / "notebooks", ignore=IGNORE)
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)]
    done = subprocess.run(cmd, cwd=tmp, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"python -m build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    wheels = list((tmp / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return email.message_from_bytes(z.read(name))


def test_the_wheel_carries_the_code_the_weights_and_the_notebooks(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    expected = {"/".join(p.parts) for p in _sources() if p.parts[0] == "dlearn"}
    expected |= {f"dlearn/notebooks/{p.name}" for p in _sources() if p.parts[0] == "notebooks"}
    assert any(n.startswith("dlearn/weights/tiny_sd/unet/") for n in expected)  # the diffusers folder is among them
    assert not expected - names, f"files missing from the wheel: {sorted(expected - names)}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = _metadata(wheel)
    project = re.search(r'(?ms)^\[project\]\s.*?^name = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert meta["Name"] == project and _normalize(project) != "dlearn"  # `dlearn` on the index is another project


def test_one_version_everywhere(wheel):
    """A release bumps the version in pyproject.toml, dlearn/__init__.py and CITATION.cff, with a CHANGELOG section."""
    version = _metadata(wheel)["Version"]
    assert dlearn.__version__ == version
    assert re.search(r"(?m)^version: (\S+)$", (ROOT / "CITATION.cff").read_text()).group(1) == version
    assert re.search(rf"(?m)^## {re.escape(version)} ", (ROOT / "CHANGELOG.md").read_text())


def test_the_wheel_installs_in_a_fresh_venv_and_runs_the_book_outside_the_repository(wheel, tmp_path):
    start = time.perf_counter()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)]
    done = subprocess.run(install, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    # the dependencies: this interpreter's site-packages, read after the fresh environment's own
    query = "import site, sys; print(site.getsitepackages()[0])"
    own = Path(subprocess.run([str(python), "-c", query], capture_output=True, text=True, check=True).stdout.strip())
    (own / "zz_dlearn_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    # and their data files (nbconvert's templates, the kernel spec) in this environment's share/jupyter
    env = _clean_env(DLEARN_OUTPUT_DIR=str(out), JUPYTER_PATH=str(Path(sys.prefix) / "share" / "jupyter"))
    where = subprocess.run([str(python), "-c", "import dlearn; print(dlearn.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert not Path(where).resolve().is_relative_to(ROOT), where

    before = (ROOT / "notebooks" / "00_preface.ipynb").stat().st_mtime_ns
    run = subprocess.run([str(python), "-m", "dlearn.book", "00"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "book: 1 notebook(s)" in run.stdout and "00_preface:" in run.stdout, log[-4000:]
    assert "without encryption" not in log  # the kernel's transport is encrypted: no warning per notebook
    assert "copied" in run.stdout and (work / "notebooks" / "00_preface.ipynb").is_file()
    assert (work / "build" / "html" / "00_preface.html").is_file()
    recorded = json.loads((out / "results.json").read_text())
    assert any(e.get("chapter") == "00_preface" for e in recorded)  # written by the kernel, where the runner reads
    assert (ROOT / "notebooks" / "00_preface.ipynb").stat().st_mtime_ns == before  # the repository was not touched
    seconds = time.perf_counter() - start
    print(f"wheel {wheel.stat().st_size / 2**20:.1f} MiB; fresh venv, install and chapter 00: {seconds:.1f} s")


def test_the_lock_pins_every_requirement_and_the_cpu_torch(wheel):
    pinned = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        if m:
            pinned.setdefault(_normalize(m.group(1)), set()).add(m.group(2))
    required = {_normalize(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in _metadata(wheel).get_all("Requires-Dist")}
    assert len(required) > 10
    assert not required - set(pinned), f"not in {LOCK.relative_to(ROOT)} (run `make lock`): {sorted(required - set(pinned))}"
    cpu_torch = re.search(r"(?m)^TORCH_CPU \?= torch==(\S+)$", (ROOT / "Makefile").read_text()).group(1)
    assert pinned["torch"] == {cpu_torch}, (pinned["torch"], cpu_torch)  # the CPU build the Makefile installs fits the lock


def test_copy_shipped_notebooks_keeps_what_is_there(tmp_path):
    shipped, dest = tmp_path / "shipped", tmp_path / "work" / "notebooks"
    shipped.mkdir()
    for name in ("00_a.ipynb", "01_b.ipynb"):
        (shipped / name).write_text(f"shipped {name}")
    dest.mkdir(parents=True)
    (dest / "00_a.ipynb").write_text("run before")
    copied = book.copy_shipped_notebooks(dest, shipped)
    assert [p.name for p in copied] == ["01_b.ipynb"]
    assert (dest / "00_a.ipynb").read_text() == "run before" and (dest / "01_b.ipynb").read_text() == "shipped 01_b.ipynb"
    with pytest.raises(SystemExit, match="no notebooks to run"):
        book.copy_shipped_notebooks(dest, tmp_path / "nothing")


def test_kernels_get_transport_encryption_where_it_can_be_provisioned():
    import zmq
    from jupyter_client.manager import KernelManager

    config = book.kernel_config()
    can = KernelManager.class_traits().get("transport_encryption") is not None and zmq.has("curve")
    assert config.KernelManager.get("transport_encryption") == ("auto" if can else None)
