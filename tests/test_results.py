import json
import math

import pytest

from dlearn import results


def test_record_writes_json_and_markdown_and_replaces(tmp_path):
    results.record("00_preface", "acc", 0.97, "fraction", "test split", directory=tmp_path)
    anchor = {"value": 2.0, "source": "paper"}
    results.record("00_preface", "fd", 1.5, "FD units", "train vs test", anchor=anchor, directory=tmp_path)
    results.record("00_preface", "acc", 0.98, "fraction", "test split", figure="00_x.png", directory=tmp_path)
    entries = json.loads((tmp_path / "results.json").read_text())
    assert [(e["name"], e["value"]) for e in entries] == [("fd", 1.5), ("acc", 0.98)]
    assert set(entries[0]) == {"chapter", "name", "value", "unit", "protocol", "anchor", "figure"}
    md = (tmp_path / "results.md").read_text()
    assert "## 00_preface" in md and "| acc | 0.98 |" in md and "2 (paper)" in md and "[00_x.png](00_x.png)" in md


def test_chapters_are_kept_in_order(tmp_path):
    results.record("02_vae", "a", 1, "u", "p", directory=tmp_path)
    results.record("00_preface", "b", 2, "u", "p", directory=tmp_path)
    assert [e["chapter"] for e in results.load(tmp_path)] == ["00_preface", "02_vae"]


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"value": math.nan}, ValueError),
        ({"value": "1.0"}, TypeError),
        ({"value": True}, TypeError),
        ({"unit": ""}, TypeError),
        ({"anchor": {"value": 1.0}}, ValueError),
        ({"anchor": {"value": "x", "source": "s"}}, TypeError),
    ],
)
def test_bad_entries_are_refused(tmp_path, kwargs, error):
    args = {"chapter": "00", "name": "n", "value": 1.0, "unit": "u", "protocol": "p", **kwargs}
    with pytest.raises(error):
        results.record(**args, directory=tmp_path)
    assert not (tmp_path / "results.json").exists()


def test_output_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DLEARN_OUTPUT_DIR", str(tmp_path / "out"))
    assert results.output_dir() == tmp_path / "out" and (tmp_path / "out").is_dir()
    monkeypatch.delenv("DLEARN_OUTPUT_DIR")
    assert results.output_dir() == results.repo_root() / "figures"


def test_load_rejects_a_broken_file(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        results.load(tmp_path)
