import nbformat
import pytest

from dlearn import book


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
    assert sorted(p.name for p in (build / "html").iterdir()) == ["01_good.html", "index.html"]
    report = capsys.readouterr().out
    assert "FAILED 00_dies" in report and "FAILED 02_slow" in report
    summary = report[report.index("failed:") :]
    assert "00_dies" in summary and "kernel died" in summary and "02_slow" in summary and "timed out" in summary
    assert not list(folder.glob(".*.tmp")) and not list(out.glob(".*.tmp"))
