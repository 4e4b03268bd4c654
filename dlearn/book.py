"""Run the book: execute every notebook in order, write them back with outputs, render HTML.

    python -m dlearn.book                 # all of notebooks/*.ipynb, in file-name order
    python -m dlearn.book 00 02_vae       # only notebooks whose names start with these

Each notebook runs headless in a fresh kernel, with its folder as the working directory. The
executed notebook replaces the file (so the book reads on a code host without running it),
figures and `results.json` / `results.md` land in `figures/`, and HTML pages in `build/html/`.
A notebook that fails (an error in a cell, a cell over the time limit, a kernel that dies) is
written, as far as it ran, to `build/failed/` instead; the run goes on with the other notebooks,
still writes results.md and the HTML of those that succeeded, lists every failure at the end and
exits non-zero. Every file is replaced atomically (`dlearn/fileio.py`), so an interrupted run leaves
each notebook either as it was or fully executed.

`make book` calls this with one torch thread per process (see the Makefile).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from dlearn import fileio, results

NOTEBOOK_BUDGET_S = 180
BOOK_BUDGET_S = 20 * 60
CELL_TIMEOUT_S = 900  # a cell running longer than this fails its notebook


def find_notebooks(folder: Path, prefixes: list[str]) -> list[Path]:
    """Notebooks in `folder` (sorted), optionally only those whose names start with one of `prefixes`."""
    notebooks = sorted(p for p in folder.glob("*.ipynb") if not p.name.startswith("."))
    if prefixes:
        chosen = [p for p in notebooks if any(p.stem.startswith(pre) for pre in prefixes)]
        missing = [pre for pre in prefixes if not any(p.stem.startswith(pre) for p in notebooks)]
        if missing:
            raise SystemExit(f"no notebook in {folder} starts with {missing}; have {[p.stem for p in notebooks]}")
        return chosen
    return notebooks


def execute(path: Path, timeout: int = CELL_TIMEOUT_S):
    """Execute one notebook in place of its folder; returns the executed NotebookNode.

    On failure the exception carries the partly executed notebook (`exc.notebook`, for build/failed/)
    and the index of the cell that was running (`exc.cell_index`, None if no cell had started)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    running = {"index": None}

    def on_cell_start(cell, cell_index, **_):
        running["index"] = cell_index

    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
        record_timing=False, store_widget_state=True, on_cell_start=on_cell_start,
    )  # fmt: skip
    try:
        client.execute()
    except Exception as exc:
        exc.notebook = nb
        exc.cell_index = running["index"]
        raise
    return nb


def write_notebook(nb, path: Path) -> None:
    """Write a notebook atomically, byte for byte as `nbformat.write` would."""
    import nbformat

    text = nbformat.writes(nb)
    fileio.write_text(path, text if text.endswith("\n") else text + "\n")


def failure_reason(exc: BaseException, nb=None, timeout: int | None = None) -> str:
    """One line saying why a notebook failed: the error of its cell, a time-out or a dead kernel."""
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    index = getattr(exc, "cell_index", None)
    cells = len(nb.cells) if nb is not None else None
    where = f"cell {index + 1} of {cells}" if index is not None and cells else "a cell"
    if isinstance(exc, CellTimeoutError):
        return f"{where} timed out" + (f" after {timeout} s" if timeout is not None else "")
    if isinstance(exc, DeadKernelError):
        return f"the kernel died while running {where}"
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()  # without the traceback's colours
    text = lines[-1] if isinstance(exc, CellExecutionError) and lines else (lines[0] if lines else type(exc).__name__)
    return f"{where}: {text}"


def render_html(paths: list[Path], out_dir: Path) -> None:
    """Convert executed notebooks to HTML pages in `out_dir`, with an index page."""
    import nbformat
    from nbconvert import HTMLExporter

    out_dir.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter()
    for path in paths:
        body, _ = exporter.from_notebook_node(nbformat.read(path, as_version=4))
        fileio.write_text(out_dir / f"{path.stem}.html", body)
    pages = [p.stem for p in sorted(out_dir.glob("*.html")) if p.stem != "index"]
    links = "\n".join(f'<li><a href="{stem}.html">{stem}</a></li>' for stem in pages)
    fileio.write_text(out_dir / "index.html", f"<html><body><h1>dlearn</h1><ol>\n{links}\n</ol></body></html>\n")


def run_book(
    notebooks: list[Path], build_dir: Path, results_dir: Path | None = None, timeout: int = CELL_TIMEOUT_S, html: bool = True
) -> int:
    """Execute `notebooks` in order and write each back in place; returns the exit status (0: all ran).

    A notebook that fails, in whatever way (an error in a cell, a cell over `timeout` seconds, a dead
    kernel), is written as far as it ran to `build_dir/failed/` and the run goes on. Afterwards results.md
    is rewritten from results.json in `results_dir` (default: `results.output_dir()`), the notebooks
    that ran are rendered to `build_dir/html/` (if `html`), and the failures are listed."""
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from tqdm import tqdm

    failed_dir = Path(build_dir) / "failed"
    failed, times = {}, {}
    start = time.perf_counter()
    with tqdm(notebooks, desc="book", unit="notebook", file=sys.stdout) as bar:
        for path in bar:
            bar.set_postfix_str(path.stem)
            t0 = time.perf_counter()
            try:
                nb = execute(path, timeout=timeout)
            except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
                failed[path.stem] = failure_reason(exc, exc.notebook, timeout)
                write_notebook(exc.notebook, failed_dir / path.name)
                tqdm.write(f"FAILED {path.stem}: {failed[path.stem]}")
                continue
            times[path.stem] = time.perf_counter() - t0
            write_notebook(nb, path)
            (failed_dir / path.name).unlink(missing_ok=True)  # a copy from an earlier failed run is out of date
            over = "  (over the 3-minute budget)" if times[path.stem] > NOTEBOOK_BUDGET_S else ""
            tqdm.write(f"{path.stem}: {times[path.stem]:.1f} s{over}")
    total = time.perf_counter() - start
    print(f"book: {len(times)} notebook(s) in {total:.1f} s" + ("  (over the 20-minute budget)" if total > BOOK_BUDGET_S else ""))

    results_dir = Path(results_dir) if results_dir is not None else results.output_dir()
    entries = results.write_markdown(results_dir)
    print(f"results: {len(entries)} entries in {results_dir / results.RESULTS_JSON}")
    if html:
        render_html([p for p in notebooks if p.stem in times], Path(build_dir) / "html")
        print(f"html: {Path(build_dir) / 'html' / 'index.html'}")
    if failed:
        print(f"failed: {len(failed)} of {len(notebooks)} notebook(s) (executed as far as they ran in {failed_dir}):")
        for stem, reason in failed.items():
            print(f"  {stem}: {reason}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlearn.book", description="Execute the book's notebooks in order.")
    parser.add_argument("prefixes", nargs="*", help="run only notebooks whose names start with these")
    parser.add_argument("--no-html", action="store_true", help="skip rendering HTML into build/html")
    args = parser.parse_args(argv)

    root = results.repo_root() or Path.cwd()
    notebooks = find_notebooks(root / "notebooks", args.prefixes)
    if not notebooks:
        print("no notebooks to run")
        return 1
    os.environ.setdefault("DLEARN_PROGRESS", "0")  # no progress bars inside the saved notebooks
    return run_book(notebooks, root / "build", results.output_dir(), html=not args.no_html)


if __name__ == "__main__":
    sys.exit(main())
