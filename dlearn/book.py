"""Run the book: execute every notebook in order, write them back with outputs, render HTML.

    python -m dlearn.book                 # all of notebooks/*.ipynb, in file-name order
    python -m dlearn.book 00 02_vae       # only notebooks whose names start with these

Each notebook runs headless in a fresh kernel, with its folder as the working directory. The
executed notebook replaces the file (so the book reads on a code host without running it),
figures and `results.json` / `results.md` land in `figures/`, and HTML pages in `build/html/`.
A notebook that fails is written to `build/failed/` instead, and the run exits non-zero.

`make book` calls this with one torch thread per process (see the Makefile).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dlearn import results

NOTEBOOK_BUDGET_S = 180
BOOK_BUDGET_S = 20 * 60


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


def execute(path: Path, timeout: int = 900):
    """Execute one notebook in place of its folder; returns the executed NotebookNode."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
        record_timing=False, store_widget_state=True,
    )  # fmt: skip
    try:
        client.execute()
    except Exception as exc:
        exc.notebook = nb  # the partly executed notebook, for build/failed/
        raise
    return nb


def render_html(paths: list[Path], out_dir: Path) -> None:
    """Convert executed notebooks to HTML pages in `out_dir`, with an index page."""
    import nbformat
    from nbconvert import HTMLExporter

    out_dir.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter()
    for path in paths:
        body, _ = exporter.from_notebook_node(nbformat.read(path, as_version=4))
        (out_dir / f"{path.stem}.html").write_text(body, encoding="utf-8")
    pages = [p.stem for p in sorted(out_dir.glob("*.html")) if p.stem != "index"]
    links = "\n".join(f'<li><a href="{stem}.html">{stem}</a></li>' for stem in pages)
    (out_dir / "index.html").write_text(f"<html><body><h1>dlearn</h1><ol>\n{links}\n</ol></body></html>\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    import nbformat
    from nbclient.exceptions import CellExecutionError
    from tqdm import tqdm

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
    failed, times = [], {}
    start = time.perf_counter()
    with tqdm(notebooks, desc="book", unit="notebook", file=sys.stdout) as bar:
        for path in bar:
            bar.set_postfix_str(path.stem)
            t0 = time.perf_counter()
            try:
                nb = execute(path)
            except CellExecutionError as exc:
                failed.append(path.stem)
                out = root / "build" / "failed"
                out.mkdir(parents=True, exist_ok=True)
                nbformat.write(exc.notebook, out / path.name)
                tqdm.write(f"FAILED {path.stem}: {str(exc).strip().splitlines()[-1]}")
                continue
            times[path.stem] = time.perf_counter() - t0
            nbformat.write(nb, path)
            over = "  (over the 3-minute budget)" if times[path.stem] > NOTEBOOK_BUDGET_S else ""
            tqdm.write(f"{path.stem}: {times[path.stem]:.1f} s{over}")
    total = time.perf_counter() - start
    print(f"book: {len(times)} notebook(s) in {total:.1f} s" + ("  (over the 20-minute budget)" if total > BOOK_BUDGET_S else ""))

    entries = results.load()
    (results.output_dir() / results.RESULTS_MD).write_text(results.to_markdown(entries))
    print(f"results: {len(entries)} entries in {results.output_dir() / results.RESULTS_JSON}")
    if not args.no_html:
        render_html([p for p in notebooks if p.stem in times], root / "build" / "html")
        print(f"html: {root / 'build' / 'html' / 'index.html'}")
    if failed:
        print(f"failed: {failed} (executed copies in build/failed/)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
