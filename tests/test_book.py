import re
from pathlib import Path

import nbformat
import pytest

from dlearn import book

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _write_nb(path, *sources):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(s) for s in sources]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_find_notebooks_in_order_and_by_prefix(tmp_path):
    for name in ("02_vae", "00_preface", "01_elbo"):
        _write_nb(tmp_path / f"{name}.ipynb", "1")
    assert [p.stem for p in book.find_notebooks(tmp_path, [])] == ["00_preface", "01_elbo", "02_vae"]
    assert [p.stem for p in book.find_notebooks(tmp_path, ["01", "02_vae"])] == ["01_elbo", "02_vae"]
    with pytest.raises(SystemExit, match="starts with"):
        book.find_notebooks(tmp_path, ["07"])


def test_execute_runs_in_the_notebooks_folder_and_render_html(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    path = tmp_path / "00_x.ipynb"
    _write_nb(path, "print(open('data.txt').read())", "1 + 1")
    nb = book.execute(path, timeout=120)
    assert nb.cells[0].outputs[0]["text"].strip() == "hello"
    assert nb.cells[1].outputs[0]["data"]["text/plain"] == "2"
    nbformat.write(nb, path)
    book.render_html([path], tmp_path / "html")
    assert "hello" in (tmp_path / "html" / "00_x.html").read_text()
    assert '<a href="00_x.html">' in (tmp_path / "html" / "index.html").read_text()


def test_a_failing_cell_keeps_the_partial_notebook(tmp_path):
    path = tmp_path / "00_bad.ipynb"
    _write_nb(path, "x = 1", "assert x == 2, 'check failed'")
    with pytest.raises(Exception, match="check failed") as info:
        book.execute(path, timeout=120)
    assert info.value.notebook.cells[1].outputs[0]["output_type"] == "error"
    assert info.value.cell_index == 1
    assert book.failure_reason(info.value, info.value.notebook) == "cell 2 of 2: AssertionError: check failed"


def test_a_dead_kernel_or_a_timeout_fails_its_notebook_and_the_run_goes_on(tmp_path, capsys):
    folder, build, out = tmp_path / "notebooks", tmp_path / "build", tmp_path / "figures"
    folder.mkdir()
    _write_nb(folder / "00_dies.ipynb", "x = 1", "import os; os._exit(1)", "x = 2")
    _write_nb(folder / "01_good.ipynb", "print('fine')")
    _write_nb(folder / "02_slow.ipynb", "y = 1", "import time; time.sleep(60)")
    (build / "failed").mkdir(parents=True)
    (build / "failed" / "01_good.ipynb").write_text("a copy left by an earlier failed run")

    code = book.run_book(book.find_notebooks(folder, []), build, out, timeout=3)

    assert code != 0
    good = nbformat.read(folder / "01_good.ipynb", as_version=4)
    assert good.cells[0].outputs[0]["text"].strip() == "fine"  # executed and written back
    assert sorted(p.name for p in (build / "failed").iterdir()) == ["00_dies.ipynb", "02_slow.ipynb"]
    dies = nbformat.read(build / "failed" / "00_dies.ipynb", as_version=4)
    assert dies.cells[0].execution_count == 1 and dies.cells[2].execution_count is None  # partly executed
    slow = nbformat.read(build / "failed" / "02_slow.ipynb", as_version=4)
    assert slow.cells[0].execution_count == 1
    for name in ("00_dies", "02_slow"):  # the notebooks themselves are left as they were
        assert nbformat.read(folder / f"{name}.ipynb", as_version=4).cells[0].execution_count is None
    assert (out / "results.md").read_text().startswith("# Results")
    assert (out / book.CLAIMS_MD).read_text().startswith("# Index of checked claims")  # written even after failures
    assert sorted(p.name for p in (build / "html").iterdir()) == ["01_good.html", "index.html"]
    report = capsys.readouterr().out
    assert "FAILED 00_dies" in report and "FAILED 02_slow" in report
    summary = report[report.index("failed:") :]
    assert "00_dies" in summary and "kernel died" in summary and "02_slow" in summary and "timed out" in summary
    assert not list(folder.glob(".*.tmp")) and not list(out.glob(".*.tmp"))


def _executed_nb(path, cells):
    """Write a notebook as if executed: cells are ("md", source) or ("code", source, stdout or None for no run)."""
    nb = nbformat.v4.new_notebook()
    count = 0
    for kind, source, *rest in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
            continue
        cell = nbformat.v4.new_code_cell(source)
        out = rest[0] if rest else ""
        if isinstance(out, dict):  # an error output
            count += 1
            cell.execution_count = count
            cell.outputs = [nbformat.v4.new_output("error", ename=out["ename"], evalue=out["evalue"], traceback=[])]
        elif out is not None:
            count += 1
            cell.execution_count = count
            if out:
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=out)]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def _by_label(entries):
    return {(e["label"], e["cell"]): e for e in entries}


def test_claims_index_reads_single_labels_ranges_lists_and_markdown(tmp_path):
    path = _executed_nb(tmp_path / "01_sums.ipynb", [
        ("md", "## 1. Sums (A1-A5)\n\nWe add numbers.\n\n**Order does not matter (A2).** Adding is commutative."),
        ("code", "x = 1 + 2\nprint('sum', x)\nassert x == 3  # check A1: one plus two makes three", "sum 3\n"),
        ("code", "assert 1 + 2 == 2 + 1  # check A2 (on integers)", "first\nsecond 0.25\nthird 0.5\n"),
        ("code", "assert True  # checks A3-A5", "A4: error 1e-9\nsomething else\nA5 ok\n"),
        ("code", "assert (1 +\n        1)  # B1 on a continuation line\ny = 2  # B9 is not on an assert", ""),
        ("code", "assert True  # check C1, check C2 and C3: three at once", "one line\n"),
        ("code", "s = '# check Z9'  # check that the string is ignored\nv = 7  # record R1: read back from a file", "7\n"),
        ("code", "assert False  # check E9", {"ename": "AssertionError", "evalue": "too far"}),
        ("code", "assert True  # check F1", None),
    ])  # fmt: skip
    entries = book.claims_index([path])
    got = _by_label(entries)
    assert sorted(got) == sorted(
        [("A1", 2), ("A2", 3), ("A3", 4), ("A4", 4), ("A5", 4), ("B1", 5), ("C1", 6), ("C2", 6), ("C3", 6), ("E9", 8),
         ("F1", 9), ("R1", 7)]
    )  # fmt: skip
    assert all(e["notebook"] == "01_sums" for e in entries)
    # a single label with its own text; its evidence is what the cell printed
    assert got["A1", 2]["claim"] == "one plus two makes three" and got["A1", 2]["evidence"] == "sum 3"
    assert got["A1", 2]["kind"] == "check" and got["A1", 2]["execution_count"] == 1
    # no text of its own: the nearest sentence of markdown naming the label, plus the comment's parenthesis
    assert got["A2", 3]["claim"] == "Order does not matter (on integers)"
    assert got["A2", 3]["evidence"] == "second 0.25 / third 0.5 (+1 line, see cell 3)"
    # a range: each label, its claim from the heading's range, the output lines that name it
    assert got["A3", 4]["claim"] == "Sums"
    assert got["A4", 4]["evidence"] == "A4: error 1e-9 (+2 lines, see cell 4)"
    assert got["A5", 4]["evidence"] == "A5 ok (+2 lines, see cell 4)"
    assert got["A3", 4]["evidence"] == "see cell 4"  # three labels share three lines: no guessing
    # a list, a bare label on an assert, a record, a failed and an unexecuted check
    assert {got[k, 6]["claim"] for k in ("C1", "C2", "C3")} == {"three at once"}
    assert got["C1", 6]["evidence"] == "one line"
    assert got["B1", 5]["claim"] == "on a continuation line" and got["B1", 5]["evidence"] == "prints nothing; see cell 5"
    assert got["R1", 7]["kind"] == "record" and got["R1", 7]["claim"] == "read back from a file"
    assert got["E9", 8]["evidence"] == "FAILED: AssertionError: too far"
    assert got["F1", 9]["evidence"] == "not executed" and got["F1", 9]["claim"] == "(no claim text)"
    assert len({e["anchor"] for e in entries}) == len(entries) and got["A1", 2]["anchor"] == "01_sums-a1"


def test_parse_label_comment_variants():
    parse = book.parse_label_comment
    assert parse("# check E3 (each holds with probability 0.997)") == {
        "kind": "check", "labels": ["E3"], "qualifiers": {"E3": "each holds with probability 0.997"}, "text": ""
    }  # fmt: skip
    assert parse("# checks C13-C15")["labels"] == ["C13", "C14", "C15"]
    assert parse("# check D12-14: x")["labels"] == ["D12", "D13", "D14"]
    assert parse("# check P6, check P9")["labels"] == ["P6", "P9"]
    both = parse("# check C14 (identity) and C15 (weights)")
    assert both["labels"] == ["C14", "C15"] and both["qualifiers"] == {"C14": "identity", "C15": "weights"}
    assert parse("# identity check G1: linear") == {
        "kind": "check", "labels": ["G1"], "qualifiers": {"G1": "identity"}, "text": "linear"
    }  # fmt: skip
    assert parse("# identity checks S6, S10")["qualifiers"] == {"S6": "identity", "S10": "identity"}
    assert parse("# identity of the two forms") is None
    assert parse("# check D25 (empirical): eps beats x0")["text"] == "eps beats x0"
    assert parse("# check B8, as measured: the opposite")["text"] == "as measured: the opposite"
    assert parse("# check V1 (record): the shipped ELBO")["kind"] == "record"
    assert parse("# record: the shipped ELBO") == {"kind": "record", "labels": [], "qualifiers": {}, "text": "the shipped ELBO"}
    assert parse("# C5 on the real model")["labels"] == ["C5"] and parse("# C5 on the real model", on_assert=False) is None
    for prose in ("# check that it works", "# NBVAL_CHECK_OUTPUT", "# record the loss", "# the E1 model"):
        assert parse(prose) is None, prose


def test_markdown_claim_skips_cross_references_and_maths(tmp_path):
    path = _executed_nb(tmp_path / "02_next.ipynb", [
        ("md", "As in chapter 01's A2, order is free. The loss is $$L = \\sum_t w_t \\quad (D4)$$"),
        ("md", "## Weights (D3, D4)"),
        ("code", "assert True  # check A2", ""),
        ("code", "assert True  # check D4", "w | v = 1\n"),
    ])  # fmt: skip
    got = _by_label(book.claims_index([path]))
    assert got["A2", 3]["claim"] == "(no claim text)"  # "chapter 01's A2" names another chapter's claim
    assert got["D4", 4]["claim"] == "Weights"  # the heading, not the formula that names D4
    text = book.claims_markdown(book.claims_index([path]))
    assert '<a id="02_next-d4"></a>D4 | Weights | 4 (In [2]) | w \\| v = 1 |' in text
    assert "## 02_next" in text and "(../notebooks/02_next.ipynb)" in text


def test_write_claims_index_covers_every_notebook_on_disk(tmp_path):
    folder, out = tmp_path / "notebooks", tmp_path / "figures"
    folder.mkdir()
    _executed_nb(folder / "00_a.ipynb", [("code", "assert True  # check A1: first", "")])
    _executed_nb(
        folder / "01_b.ipynb", [("code", "assert 1  # check B1: one", "1\n"), ("code", "assert 2  # check B1: two", "2\n")]
    )
    entries = book.write_claims_index(folder, out)
    assert [(e["notebook"], e["label"]) for e in entries] == [("00_a", "A1"), ("01_b", "B1"), ("01_b", "B1")]
    assert [e["anchor"] for e in entries] == ["00_a-a1", "01_b-b1", "01_b-b1-2"]
    assert list(book.repeated_labels(entries)) == [("01_b", "B1")]
    text = (out / book.CLAIMS_MD).read_text()
    assert text.startswith("# Index of checked claims") and "## 00_a" in text and "## 01_b" in text
    assert "(../notebooks/00_a.ipynb)" in text and not list(out.glob(".*.tmp"))


def _assert_comment_labels(path):
    """Independently of the parser: the labels named in the comment of each assert line, before the comment's
    first colon ("check D21: ...", "checks C13-C15", "C5 on ..."), skipping "chapter 04's D12"."""
    nb = nbformat.read(path, as_version=4)
    found = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            m = re.match(r"\s*assert\b.*?#\s*(.*)$", line)
            if not m or not re.match(r"(?i)(checks?|records?)\b|[A-Z]\d+\b", m.group(1)):
                continue
            head = re.sub(r"(?i)chapter \d+'s [A-Z]\d+", "", m.group(1).split(":")[0])
            for a, b in re.findall(r"\b([A-Z]\d+)\s*-\s*[A-Z]?(\d+)\b", head):
                found.update(f"{a[0]}{n}" for n in range(int(a[1:]), int(b) + 1))
            found.update(re.findall(r"\b[A-Z]\d+\b", head))
    return found


def test_every_check_label_of_the_real_notebooks_is_indexed(tmp_path, monkeypatch, capsys):
    paths = book.find_notebooks(NOTEBOOKS, [])
    monkeypatch.setenv("DLEARN_OUTPUT_DIR", str(tmp_path))
    assert book.main(["--index-only"]) == 0
    entries = book.claims_index(paths)
    indexed = {(e["notebook"], e["label"]) for e in entries}
    named = {(p.stem, label) for p in paths for label in _assert_comment_labels(p)}
    assert len(named) > 50
    assert not named - indexed, f"labels lost from the index: {sorted(named - indexed)}"
    assert all(e["claim"] and e["evidence"] for e in entries)
    text = (tmp_path / book.CLAIMS_MD).read_text()
    assert all(f'<a id="{e["anchor"]}">' in text for e in entries)
    assert f"claims: {len(entries)} entries" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        book.main(["--index-only", "04"])
