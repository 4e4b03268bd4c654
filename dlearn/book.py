"""Run the book: execute every notebook in order, write them back with outputs, render HTML.

    python -m dlearn.book                 # all of notebooks/*.ipynb, in file-name order
    python -m dlearn.book 00 02_vae       # only notebooks whose names start with these
    python -m dlearn.book --index-only    # execute nothing: rebuild figures/claims.md from the notebooks on disk

Each notebook runs headless in a fresh kernel, with its folder as the working directory. The
executed notebook replaces the file (so the book reads on a code host without running it),
figures and `results.json` / `results.md` land in `figures/`, and HTML pages in `build/html/`.
Afterwards `figures/claims.md` indexes the checked claims of every notebook in the folder (run now or
not): each check label ("check D21" on an assert), its one-line claim, its notebook and cell, and what
the cell printed (see `claims_index`).
A notebook that fails (an error in a cell, a cell over the time limit, a kernel that dies) is
written, as far as it ran, to `build/failed/` instead; the run goes on with the other notebooks,
still writes results.md and the HTML of those that succeeded, lists every failure at the end and
exits non-zero. Every file is replaced atomically (`dlearn/fileio.py`), so an interrupted run leaves
each notebook either as it was or fully executed.

Where dlearn is installed from its wheel rather than used from a clone of the repository, the book runs in
the working directory: the notebooks shipped inside the package (`dlearn/notebooks`) are copied to
`./notebooks` (a notebook already there is kept), and the figures go to `./figures` (or `DLEARN_OUTPUT_DIR`),
the HTML to `./build/html`.

The kernels talk to the runner over TCP encrypted with CurveZMQ keys that jupyter_client provisions (its
`transport_encryption`), where the installed jupyter_client and pyzmq can; so ipykernel has no plain-text
transport to warn about.

`make book` calls this with one torch thread per process (see the Makefile).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import time
import tokenize
from pathlib import Path

from dlearn import fileio, results

NOTEBOOK_BUDGET_S = 180
BOOK_BUDGET_S = 20 * 60
CELL_TIMEOUT_S = 900  # a cell running longer than this fails its notebook
SHIPPED_NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"  # present in an installed wheel, not in a clone


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


def copy_shipped_notebooks(dest: Path, source: Path = SHIPPED_NOTEBOOKS) -> list[Path]:
    """Copy the notebooks shipped inside an installed dlearn from `source` into `dest`, for running the book
    outside the repository; a notebook already in `dest` (run or edited before) is kept. Returns those copied."""
    shipped = sorted(source.glob("*.ipynb")) if source.is_dir() else []
    if not shipped:
        raise SystemExit(
            f"no notebooks to run: dlearn is not used from a clone of the repository, and {source} holds no notebooks; "
            "clone the repository, or install the wheel that `python -m build` makes (it ships them)"
        )
    Path(dest).mkdir(parents=True, exist_ok=True)
    copied = [Path(dest) / p.name for p in shipped if not (Path(dest) / p.name).exists()]
    for target in copied:
        shutil.copyfile(source / target.name, target)
    return copied


def kernel_config():
    """Configuration of the kernel manager: CurveZMQ transport encryption where the installed jupyter_client
    provisions it and pyzmq supports it (the kernel spec says whether the kernel accepts it); otherwise the default."""
    import zmq
    from jupyter_client.manager import KernelManager
    from traitlets.config import Config

    config = Config()
    if KernelManager.class_traits().get("transport_encryption") is not None and zmq.has("curve"):
        config.KernelManager.transport_encryption = "auto"
    return config


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
        record_timing=False, store_widget_state=True, on_cell_start=on_cell_start, config=kernel_config(),
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
    is rewritten from results.json in `results_dir` (default: `results.output_dir()`), claims.md there from
    every notebook in the notebooks' folder (`write_claims_index`), the notebooks that ran are rendered to
    `build_dir/html/` (if `html`), and the failures are listed."""
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
    index_failed = False
    for folder in dict.fromkeys(Path(p).parent for p in notebooks):  # every notebook there, not only those run now
        try:
            report_claims(write_claims_index(folder, results_dir), results_dir / CLAIMS_MD)
        except (OSError, ValueError) as exc:  # an unreadable notebook: say so, keep the run's other outputs
            print(f"claims index not written: {exc}")
            index_failed = True
    if html:
        render_html([p for p in notebooks if p.stem in times], Path(build_dir) / "html")
        print(f"html: {Path(build_dir) / 'html' / 'index.html'}")
    if failed:
        print(f"failed: {len(failed)} of {len(notebooks)} notebook(s) (executed as far as they ran in {failed_dir}):")
        for stem, reason in failed.items():
            print(f"  {stem}: {reason}")
        return 1
    return 1 if index_failed else 0


# ----------------------------------------------------------------------------------------------------
# The index of checked claims: figures/claims.md
#
# A notebook labels each checked claim in a comment on its assert line, e.g.
#     assert gap < 1e-12  # check D21: only the endpoints matter
#     assert ok  # check E3 (each holds with probability 0.997)
#     assert ok  # checks C13-C15        assert ok  # check P6, check P9      assert ok  # check B7 and B9: ...
#     x = zoo.info("vae")["elbo"]  # record V1: the shipped VAE's ELBO
#     assert err < 1e-12  # identity check G1: true by linearity (the same as "check G1 (identity)")
# and names the label in its prose, "(D21)" in a heading or a bold lead-in. The index lists every label
# with its one-line claim, where it is checked, and the evidence the executed cell printed.

CLAIMS_MD = "claims.md"
LABEL = r"[A-Z]\d{1,3}"
_KEYWORD = re.compile(r"(?i)(checks?|records?)\b")
_RANGE = re.compile(rf"({LABEL})\s*[-–]\s*([A-Z]?)(\d{{1,3}})\b")
_ONE = re.compile(rf"{LABEL}\b")
_SEPARATOR = re.compile(r"(?i)(?:\s*(?:,|&|/|\+|\band\b|\bchecks?\b)\s*)+")
_MENTION = re.compile(rf"\b({LABEL})(?:\s*[-–]\s*([A-Z]?)(\d{{1,3}}))?\b")
_CROSS_REF = re.compile(r"(?i)chapter\s+\d+'s\s*$")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_OBJECT_REPR = re.compile(r"^<.*( at 0x[0-9a-fA-F]+|Figure size .*)>$")  # "<matplotlib.legend.Legend at 0x..>"
CLAIM_CHARS, EVIDENCE_CHARS = 200, 160


def expand_labels(first: str, last_letter: str, last_number: str) -> list[str]:
    """The labels of a range: ("C13", "", "15") -> [C13, C14, C15]; a range across letters is its two ends."""
    letter, start = first[0], int(first[1:])
    end = int(last_number)
    if (last_letter and last_letter != letter) or not start <= end <= start + 50:
        return [first, (last_letter or letter) + last_number]
    return [f"{letter}{n}" for n in range(start, end + 1)]


def parse_label_comment(comment: str, on_assert: bool = True) -> dict | None:
    """Read a claim comment ("check D21: ...", "checks C13-C15", "record V1: ...", on an assert line also
    "C5 on ..."): {"kind", "labels", "qualifiers" (label -> its parenthesis), "text"}; None if it is none."""
    s = comment.lstrip("#").strip()
    identity = re.match(r"(?i)identity\s+(?=checks?\b)", s)  # "identity check G1": "check G1 (identity)"
    if identity:
        s = s[identity.end() :]
    m = _KEYWORD.match(s)
    if m:
        kind = "record" if m.group(1).lower().startswith("record") else "check"
        s = s[m.end() :]
    elif on_assert and _ONE.match(s):
        kind = "check"
    else:
        return None
    labels, qualifiers, pos = [], {}, 0
    while True:
        rest = s[pos:]
        sep = _SEPARATOR.match(rest) if labels else None
        if sep and sep.end() > 0 and _ONE.match(rest[sep.end() :].lstrip()):
            pos += sep.end()
            continue
        lead = len(rest) - len(rest.lstrip())
        rng, one = _RANGE.match(rest, lead), _ONE.match(rest, lead)
        if rng:
            new, pos = expand_labels(*rng.groups()), pos + rng.end()
        elif one:
            new, pos = [one.group(0)], pos + one.end()
        else:
            break
        labels += [label for label in new if label not in labels]
        paren = re.match(r"\s*\(([^()]*)\)", s[pos:])
        if paren:
            for label in new:
                qualifiers[label] = paren.group(1).strip()
            pos += paren.end()
    text = s[pos:].strip().lstrip(":;,.-–— ").strip()
    if not labels and not (kind == "record" and s.lstrip().startswith(":")):
        return None  # "# check that ..." is prose, not a label; an unlabelled record needs its colon
    if identity:
        qualifiers = {label: qualifiers.get(label, "identity") for label in labels}
    if any(q.lower().startswith("record") for q in qualifiers.values()):
        kind = "record"  # "check V1 (record): ..."
        qualifiers = {k: q for k, q in qualifiers.items() if q.lower() != "record"}
    return {"kind": kind, "labels": labels, "qualifiers": qualifiers, "text": text}


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _comments(source: str) -> list[tuple[str, bool]]:
    """(comment, whether it ends a line of an assert statement) for each comment of a code cell; a '#' inside
    a string is no comment."""
    found, first = [], None  # first: the first word of the statement being read
    try:
        for t in tokenize.generate_tokens(io.StringIO(source).readline):
            if t.type == tokenize.COMMENT:
                found.append((t.string, first == "assert"))
            elif t.type == tokenize.NEWLINE:
                first = None
            elif first is None and t.type not in (tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
                first = t.string
        return found
    except (tokenize.TokenError, SyntaxError):  # cell magics and the like: a plain reading, line by line
        lines = source.splitlines()
        return [(m.group(0), line.lstrip().startswith("assert")) for line in lines for m in [re.search(r"#[^\"']*$", line)] if m]


def _plain(markdown: str) -> str:
    """Markdown as one line of text: display maths inline, emphasis marks and links reduced."""
    text = re.sub(r"\$\$(.+?)\$\$", r"$\1$", markdown, flags=re.S)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [text](link) -> text
    text = re.sub(r"\*\*|__", "", text)  # bold lead-ins; italics stay
    return re.sub(r"\s+", " ", text).strip()


def _sentences(block: str) -> list[str]:
    """Split one line of text into sentences, never inside $...$."""
    maths = []

    def hide(m):
        maths.append(m.group(0))
        return f"\x00{len(maths) - 1}\x00"

    hidden = re.sub(r"\$[^$]*\$", hide, block)
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(\[*\x00])", hidden)
    return [re.sub(r"\x00(\d+)\x00", lambda m: maths[int(m.group(1))], p) for p in parts]


def _mentions(sentence: str) -> tuple[set[str], set[str]]:
    """Labels a sentence names on their own in its words, and those it names only inside a range ("D1-D4")
    or inside its maths; a sentence that is mostly maths names nothing on its own."""
    alone, ranged = set(), set()
    maths = [m.span() for m in re.finditer(r"\$[^$]*\$", sentence)]
    wordy = len(re.sub(r"\$[^$]*\$", " ", sentence).split()) >= 4
    for m in _MENTION.finditer(sentence):
        if _CROSS_REF.search(sentence[: m.start()]):
            continue  # "chapter 04's D12" points elsewhere
        labels = expand_labels(*m.groups()) if m.group(3) else [m.group(1)]
        if m.group(3) or not wordy or any(a <= m.start() < b for a, b in maths):
            ranged.update(labels)
        else:
            alone.add(m.group(1))
    return alone, ranged - alone


def _strip_labels(sentence: str) -> str:
    """A sentence without its label mentions: "Only the endpoints matter (D21)." -> "Only the endpoints matter"."""
    item = rf"{LABEL}(?:\s*[-–]\s*[A-Z]?\d{{1,3}})?(?:'s)?"
    s = re.sub(rf"\s*\(\s*{item}(?:\s*,\s*{item})*\s*\)", "", sentence)  # (D21), (E3, E4), (D15-D19, D23-D25)
    s = re.sub(rf"\(\s*{item}(?:\s*,\s*{item})*\s*,\s*", "(", s)  # (D16, Luo eq. 99) -> (Luo eq. 99)
    s = re.sub(r"^#+\s*", "", s).strip()
    s = re.sub(r"^(\d+\.)+\s+", "", s)  # a section number
    s = re.sub(r"\s+([.,;:])", r"\1", s)
    return s.strip().rstrip(".:;,").strip()


def markdown_claim(cells: list, index: int, label: str) -> str:
    """The nearest sentence of markdown before cell `index` (else after it) that names `label`, without the label."""
    order = list(range(index - 1, -1, -1)) + list(range(index + 1, len(cells)))
    for i in order:
        if cells[i].get("cell_type") != "markdown":
            continue
        best = None
        for block in re.split(r"\n\s*\n", _source(cells[i])):
            lines = block.strip().splitlines()
            heading = lines[0] if lines and lines[0].startswith("#") else None
            body = "\n".join(lines[1:] if heading else lines)
            for sentence in ([_plain(heading)] if heading else []) + _sentences(_plain(body)):
                alone, ranged = _mentions(sentence)
                if label in alone:
                    return _strip_labels(sentence)
                if label in ranged and best is None:
                    best = _strip_labels(sentence)
        if best is not None:
            return best
    return ""


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0]
    if cut.count("$") % 2:
        cut = cut[: cut.rfind("$")].rstrip()
    return cut.rstrip(" ,;:") + " …"


def cell_output_lines(cell) -> list[str] | None:
    """The text a cell printed (stdout and results, not warnings), line by line; None if it never ran."""
    lines = []
    for out in cell.get("outputs", []):
        kind = out.get("output_type")
        if kind == "stream" and out.get("name") == "stdout":
            text = out.get("text", "")
        elif kind == "execute_result":
            text = out.get("data", {}).get("text/plain", "")
        elif kind == "error":
            return [f"FAILED: {out.get('ename', 'error')}: {out.get('evalue', '')}"]
        else:
            continue
        text = "".join(text) if isinstance(text, list) else text
        for line in _ANSI.sub("", text).splitlines():
            line = line.rsplit("\r", 1)[-1].strip()
            if line and not _OBJECT_REPR.match(line):
                lines.append(line)
    if not lines and cell.get("execution_count") is None and not cell.get("outputs"):
        return None
    return lines


def evidence(cell, labels_in_cell: list[str], label: str | None, cell_number: int) -> str:
    """One or two lines of what the cell printed that back `label`, or where to look."""
    lines = cell_output_lines(cell)
    if lines is None:
        return "not executed"
    if lines and lines[0].startswith("FAILED"):
        return _shorten(lines[0], EVIDENCE_CHARS)
    named = [ln for ln in lines if label and re.search(rf"\b{label}\b", ln)]
    if named:
        chosen = named[:2]
    elif len(lines) <= 2:
        chosen = lines
    elif len(labels_in_cell) <= 1:
        chosen = lines[-2:]  # a cell prints its conclusion last
    else:
        return f"see cell {cell_number}"
    if not chosen:
        return f"a figure; see cell {cell_number}" if cell.get("outputs") else f"prints nothing; see cell {cell_number}"
    text = " / ".join(_shorten(ln, EVIDENCE_CHARS) for ln in chosen)
    more = len(lines) - len(chosen)
    return text + (f" (+{more} line{'s' if more > 1 else ''}, see cell {cell_number})" if more else "")


def _label_key(label: str | None) -> tuple:
    return ("~", 0) if label is None else (label[0], int(label[1:]))


def notebook_claims(path: Path) -> list[dict]:
    """The claims a notebook labels, one entry per (label, cell), in label order; see `claims_index`."""
    cells = json.loads(Path(path).read_text(encoding="utf-8")).get("cells", [])
    found = {}  # (label, cell index) -> entry
    for index, cell in enumerate(cells):
        if cell.get("cell_type") != "code":
            continue
        groups = []
        for comment, on_assert in _comments(_source(cell)):
            parsed = parse_label_comment(comment, on_assert=on_assert)
            if parsed:
                groups += [(label, parsed) for label in (parsed["labels"] or [None])]
        labels_in_cell = sorted({label for label, _ in groups}, key=_label_key)
        for label, parsed in groups:
            entry = found.setdefault((label, index), {"kind": parsed["kind"], "texts": [], "qualifiers": []})
            if parsed["kind"] == "record":
                entry["kind"] = "record"
            if parsed["text"] and parsed["text"] not in entry["texts"]:
                entry["texts"].append(parsed["text"])
            q = parsed["qualifiers"].get(label)
            if q and q not in entry["qualifiers"]:
                entry["qualifiers"].append(q)
        for label in labels_in_cell:
            found[(label, index)]["evidence"] = evidence(cell, labels_in_cell, label, index + 1)
    entries, anchors = [], {}
    stem = Path(path).stem
    for (label, index), e in sorted(found.items(), key=lambda kv: (_label_key(kv[0][0]), kv[0][1])):
        text = "; ".join(e["texts"])
        qualifier = "; ".join(e["qualifiers"])
        md = markdown_claim(cells, index, label) if label and len(text.split()) < 4 else ""
        if md and text and text.lower() not in md.lower():
            claim = f"{md}: {text}"
        else:
            claim = md or text
        claim += f" ({qualifier})" if qualifier else ""
        base = re.sub(r"[^a-z0-9_-]+", "-", f"{stem}-{label or e['kind']}".lower())
        anchors[base] = anchors.get(base, 0) + 1
        entries.append({
            "notebook": stem, "label": label, "kind": e["kind"], "cell": index + 1,
            "execution_count": cells[index].get("execution_count"),
            "claim": _shorten(claim, CLAIM_CHARS) if claim else "(no claim text)",
            "comment": text, "qualifier": qualifier, "markdown": md,
            "anchor": base if anchors[base] == 1 else f"{base}-{anchors[base]}",
            "evidence": e["evidence"],
        })  # fmt: skip
    return entries


def claims_index(notebook_paths: list[Path]) -> list[dict]:
    """Every labelled claim of the given (executed) notebooks, notebook by notebook: a list of
    {"notebook", "label" (None for an unlabelled record), "kind" ("check" or "record"), "cell" (1-based),
    "execution_count", "claim", "comment", "qualifier", "markdown", "anchor", "evidence"}."""
    return [entry for path in notebook_paths for entry in notebook_claims(Path(path))]


def repeated_labels(entries: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Labels checked in more than one cell of one notebook with different comments: {(notebook, label): entries}."""
    groups = {}
    for e in entries:
        if e["label"]:
            groups.setdefault((e["notebook"], e["label"]), []).append(e)
    return {k: v for k, v in groups.items() if len(v) > 1 and len({e["comment"] for e in v}) > 1}


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if text else ""


def claims_markdown(entries: list[dict], notebook_dir: str = "../notebooks") -> str:
    """The index as markdown: a table per notebook (label, claim, cell, evidence), each row with an anchor."""
    notebooks = list(dict.fromkeys(e["notebook"] for e in entries))
    checks = sum(e["kind"] == "check" for e in entries)
    lines = [
        "# Index of checked claims",
        "",
        "Every claim the notebooks check, by its label: the assert that checks it (notebook and cell; `In [n]` is",
        "the cell's execution count), the claim in one line (the assert's comment, or the sentence of the text that",
        "names the label), and what the executed cell printed. A *record* reads a number back from shipped weights",
        "or a stored study instead of computing it live. Written by `python -m dlearn.book` (or `--index-only`).",
        "",
        f"{checks} checks and {len(entries) - checks} records in {len(notebooks)} notebooks.",
        "",
    ]
    for nb in notebooks:
        rows = [e for e in entries if e["notebook"] == nb]
        lines += [
            f"## {nb}",
            "",
            f"[{nb}.ipynb]({notebook_dir}/{nb}.ipynb)",
            "",
            "| label | claim | cell | evidence |",
            "| --- | --- | --- | --- |",
        ]
        for e in rows:
            name = e["label"] or "—"
            if e["kind"] == "record":
                name += " (record)"
            cell = f"{e['cell']}" + (f" (In [{e['execution_count']}])" if e["execution_count"] is not None else "")
            lines.append(
                f'| <a id="{e["anchor"]}"></a>{name} | {_cell_text(e["claim"])} | {cell} | {_cell_text(e["evidence"])} |'
            )
        lines.append("")
    return "\n".join(lines)


def write_claims_index(notebook_dir: Path, out_dir: Path) -> list[dict]:
    """Rebuild `out_dir/claims.md` from every notebook in `notebook_dir` as it is on disk; returns the entries."""
    entries = claims_index(find_notebooks(Path(notebook_dir), []))
    rel = os.path.relpath(Path(notebook_dir).resolve(), Path(out_dir).resolve()).replace(os.sep, "/")
    fileio.write_text(Path(out_dir) / CLAIMS_MD, claims_markdown(entries, rel))
    return entries


def report_claims(entries: list[dict], path: Path) -> None:
    """Print the index's counts per notebook and the labels checked in several places."""
    counts = {}
    for e in entries:
        counts[e["notebook"]] = counts.get(e["notebook"], 0) + 1
    per = ", ".join(f"{nb} {n}" for nb, n in counts.items())
    print(f"claims: {len(entries)} entries in {path} ({per})")
    for (nb, label), rows in repeated_labels(entries).items():
        print(
            f"  {nb} {label} in cells {', '.join(str(e['cell']) for e in rows)}: " + " | ".join(repr(e["comment"]) for e in rows)
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlearn.book", description="Execute the book's notebooks in order.")
    parser.add_argument("prefixes", nargs="*", help="run only notebooks whose names start with these")
    parser.add_argument("--no-html", action="store_true", help="skip rendering HTML into build/html")
    parser.add_argument(
        "--index-only", action="store_true",
        help=f"execute nothing: rebuild the index of checked claims ({CLAIMS_MD}) from the notebooks as they are on disk",
    )  # fmt: skip
    args = parser.parse_args(argv)

    root = results.repo_root()
    if root is None:  # installed from the wheel: the book runs in the working directory, from the shipped notebooks
        root = Path.cwd()
        copied = copy_shipped_notebooks(root / "notebooks")
        if copied:
            print(f"copied {len(copied)} notebook(s) of the book to {root / 'notebooks'}")
    if args.index_only:
        if args.prefixes:
            parser.error("--index-only indexes every notebook; it takes no prefixes")
        out = results.output_dir()
        report_claims(write_claims_index(root / "notebooks", out), out / CLAIMS_MD)
        return 0
    notebooks = find_notebooks(root / "notebooks", args.prefixes)
    if not notebooks:
        print("no notebooks to run")
        return 1
    os.environ.setdefault("DLEARN_PROGRESS", "0")  # no progress bars inside the saved notebooks
    os.environ["DLEARN_OUTPUT_DIR"] = str(results.output_dir().resolve())  # the kernels, in notebooks/, write here too
    return run_book(notebooks, root / "build", results.output_dir(), html=not args.no_html)


if __name__ == "__main__":
    sys.exit(main())
