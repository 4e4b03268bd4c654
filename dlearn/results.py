"""The book's headline numbers: `figures/results.json` and its readable twin `figures/results.md`.

Each chapter records its numbers with `record`; an entry is

    {"chapter": "00_preface", "name": "classifier_test_accuracy", "value": 0.975, "unit": "fraction",
     "protocol": "digits test split (447 images)", "anchor": {"value": 0.973, "source": "..."} | null,
     "figure": "00_digits_grid.png" | null}

Recording the same (chapter, name) again replaces the entry. The folder is `figures/` at the top
of the repository, or the folder named by the environment variable DLEARN_OUTPUT_DIR (the test
run points it at build/ so that tests leave the committed figures alone).

Several processes may record into one folder at once (notebooks run in parallel): each `record` reads,
changes and rewrites results.json under a lock (`dlearn/fileio.py`, on `results.json.lock`), and every
file is replaced atomically, so a crash leaves the previous file whole and no entry is lost.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

from dlearn import fileio

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


def repo_root() -> Path | None:
    """The repository holding this package (the folder with pyproject.toml), or None if installed elsewhere."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def output_dir() -> Path:
    """Where figures and results go (created if needed); see the module docstring."""
    env = os.environ.get("DLEARN_OUTPUT_DIR")
    if env:
        path = Path(env)
        if not path.is_absolute():
            path = (repo_root() or Path.cwd()) / path
    else:
        path = (repo_root() or Path.cwd()) / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _restore_advice(path: Path) -> str:
    return (
        f"restore it with `git checkout -- {path}` (the committed results), or rerun the notebook(s) that "
        f"record into it (`python -m dlearn.book NN`)"
    )


def load(directory: Path | None = None) -> list[dict]:
    """All recorded entries (an empty list if nothing was recorded yet)."""
    path = Path(directory or output_dir()) / RESULTS_JSON
    return _read_json(path, list, "a list of entries", _restore_advice(path))


def _read_json(path: Path, kind: type, what: str, advice: str):
    """The JSON value of type `kind` in `path` (empty if there is no file), or a ValueError that names the file,
    says it is damaged and how to restore it (`advice`): never advice to delete it."""
    if not path.exists():
        return kind()
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged: it is not valid JSON ({exc}); {advice}") from exc
    if not isinstance(value, kind):
        raise ValueError(f"{path} is damaged: it should hold {what}, got {type(value).__name__}; {advice}")
    return value


def write_markdown(directory: Path | None = None) -> list[dict]:
    """Rewrite results.md from results.json (under the same lock as `record`); returns the entries."""
    directory = Path(directory or output_dir())
    with fileio.locked(directory / RESULTS_JSON):
        entries = load(directory)
        fileio.write_text(directory / RESULTS_MD, to_markdown(entries))
    return entries


def _check_entry(entry: dict) -> None:
    for key in ("chapter", "name", "unit", "protocol"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise TypeError(f"result field {key!r} must be a non-empty string, got {entry.get(key)!r}")
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"result {entry['name']!r} must have a finite number as value, got {value!r}")
    anchor = entry.get("anchor")
    if anchor is not None:
        if not isinstance(anchor, dict) or set(anchor) != {"value", "source"}:
            raise ValueError(f"anchor must be None or {{'value': number, 'source': str}}, got {anchor!r}")
        if not isinstance(anchor["value"], (int, float)) or not isinstance(anchor["source"], str):
            raise TypeError(f"anchor must hold a number and a source string, got {anchor!r}")
    n, se = entry.get("n"), entry.get("se")
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise ValueError(f"result {entry['name']!r}: n (seeds or draws behind the value) must be an integer >= 1, got {n!r}")
    if se is not None:
        if isinstance(se, bool) or not isinstance(se, numbers.Real) or not math.isfinite(se) or se < 0:
            raise ValueError(f"result {entry['name']!r}: se must be a finite number >= 0, got {se!r}")
        if n is None or n < 2:
            raise ValueError(f"result {entry['name']!r}: a standard error needs n >= 2 seeds or draws, got n = {n!r}")


def record(
    chapter: str,
    name: str,
    value: float,
    unit: str,
    protocol: str,
    anchor: dict | None = None,
    figure: str | None = None,
    directory: Path | None = None,
    n: int | None = None,
    se: float | None = None,
) -> dict:
    """Add or replace one headline number and rewrite results.json and results.md.

    Args:
        chapter: the notebook's stem, e.g. "02_vae".
        name: a stable identifier, e.g. "iwae_nats".
        value: a finite number (tensors: pass `.item()`).
        unit: e.g. "nats/image", "bits/dim", "fraction".
        protocol: the split and how it was measured.
        anchor: a published or reference figure to compare with: {"value": ..., "source": ...}.
        figure: the file name of the figure that shows it, in the same folder.
        n: how many seeds or draws the value is the mean of (1: a single run); give it for a number that is
            compared or ranked.
        se: the standard error of that mean (needs n >= 2); the table shows "value ± se (n = ...)".
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"result {name!r} must have a real number as value (tensors: .item()), got {type(value).__name__}")
    entry = {
        "chapter": chapter, "name": name, "value": float(value),
        "unit": unit, "protocol": protocol, "anchor": anchor, "figure": figure,
        "n": n, "se": None if se is None else float(se),
    }  # fmt: skip
    _check_entry(entry)
    directory = Path(directory or output_dir())
    with fileio.locked(directory / RESULTS_JSON):  # one read-modify-write at a time, across processes
        entries = [e for e in load(directory) if (e["chapter"], e["name"]) != (chapter, name)]
        entries.append(entry)
        entries.sort(key=lambda e: e["chapter"])  # stable: keeps each chapter's order of recording
        fileio.write_text(directory / RESULTS_JSON, json.dumps(entries, indent=2) + "\n")
        fileio.write_text(directory / RESULTS_MD, to_markdown(entries))
    return entry


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def to_markdown(entries: list[dict]) -> str:
    """A readable table per chapter of the recorded entries."""
    lines = ["# Results", "", "Headline numbers of each chapter, written by the notebooks (`make book`).", ""]
    for chapter in sorted({e["chapter"] for e in entries}):
        lines += [f"## {chapter}", "", "| name | value | unit | protocol | anchor | figure |", "|" + " --- |" * 6]
        for e in (e for e in entries if e["chapter"] == chapter):
            anchor = f"{_fmt(e['anchor']['value'])} ({e['anchor']['source']})" if e.get("anchor") else "-"
            figure = f"[{e['figure']}]({e['figure']})" if e.get("figure") else "-"
            value = _fmt(e["value"])
            if e.get("se") is not None:
                value += f" ± {e['se']:.2g} (n = {e['n']})"
            elif e.get("n") is not None:
                value += f" (n = {e['n']})"
            lines.append(f"| {e['name']} | {value} | {e['unit']} | {e['protocol']} | {anchor} | {figure} |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Chapter studies: many runs of a recipe, made once by a command and shipped as JSON
# --------------------------------------------------------------------------------------------


def load_study(path: Path, command: str) -> dict:
    """A shipped study ({job: result}) from `path`; if missing, the error names `command`, which recreates it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: recreate it with `{command}`")
    return _read_study(path, command)


def _read_study(path: Path, command: str) -> dict:
    """The {job: result} object in `path` ({} if there is no file), or a ValueError naming the file and the fix."""
    advice = f"restore it with `git checkout -- {path}` or recreate it with `{command}`"
    return _read_json(path, dict, "a JSON object {job: result}", advice)


def study_cli(argv: list[str] | None, prog: str, description: str, jobs, run_job, default_path: Path) -> None:
    """`prog study [JOB ...] [--out FILE]`: run the named jobs (default: all of `jobs`) with `run_job(name)` and
    merge each result into the JSON file as soon as it is done (so an interrupted study keeps what it finished).
    The merge holds the file's lock and replaces it atomically (`dlearn/fileio.py`), so two studies writing
    one file keep each other's results and a crash leaves the previous file whole."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("study", help="run study jobs and merge their results into the JSON file")
    p.add_argument("jobs", nargs="*", help=f"job names (default: all): {', '.join(jobs)}")
    p.add_argument("--out", default=None, help=f"the JSON file (default: {default_path.name} in the package)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(default_path)
    unknown = [job for job in args.jobs if job not in jobs]
    if unknown:
        parser.error(f"unknown job(s) {unknown}; the jobs are: {', '.join(jobs)}")
    command = f"{prog} study"
    _read_study(out, command)  # a damaged file is reported before any job runs, not after
    for job in args.jobs or list(jobs):
        result = run_job(job)
        with fileio.locked(out):
            done = _read_study(out, command)
            done[job] = result
            fileio.write_text(out, json.dumps(done, indent=1) + "\n")
        print(f"{job}: {result['seconds']} s", flush=True)
