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
