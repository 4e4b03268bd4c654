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
    assert set(entries[0]) == {"chapter", "name", "value", "unit", "protocol", "anchor", "figure", "n", "se"}
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


def test_load_names_the_damaged_file_and_how_to_restore_it_without_deleting(tmp_path):
    (tmp_path / "results.json").write_text('[{"chapter": ')  # cut short, as a crash mid-write used to leave it
    with pytest.raises(ValueError) as info:
        results.load(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "results.json") in message and "damaged" in message
    assert "git checkout -- " in message and "rerun" in message
    assert "delete" not in message.lower() and "remove" not in message.lower()
    (tmp_path / "results.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="list of entries, got dict") as info:
        results.load(tmp_path)
    assert "delete" not in str(info.value).lower()


# A process that records `n` entries of its own into one folder, started only once every process is ready
_RECORDER = """
import sys, time
from pathlib import Path
from dlearn import results
folder, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(folder / f"ready-{tag}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
errors = 0
for i in range(n):
    try:
        results.record(f"ch_{tag}", f"n{i:03d}", float(i), "u", "p", directory=folder)
    except Exception as exc:
        errors += 1
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
sys.exit(1 if errors else 0)
"""


def test_concurrent_processes_recording_into_one_folder_lose_nothing(tmp_path):
    import os
    import subprocess
    import sys
    import time

    tags, n = ["a", "b", "c"], 150
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RECORDER, str(tmp_path), tag, str(n)], env=env, stderr=subprocess.PIPE, text=True
        )
        for tag in tags
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{tag}").exists() for tag in tags):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a recorder did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()  # all at once, so that their read-modify-write cycles overlap
    failures = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    errors = [err for code, err in failures if code != 0]
    assert not errors, f"{sum(e.count(chr(10)) for e in errors)} record calls failed, e.g. {errors[0][:500]}"
    entries = json.loads((tmp_path / "results.json").read_text())
    assert len(entries) == len(tags) * n
    assert {(e["chapter"], e["name"]) for e in entries} == {(f"ch_{t}", f"n{i:03d}") for t in tags for i in range(n)}
    md = (tmp_path / "results.md").read_text()
    assert md == results.to_markdown(entries)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files were left behind"


def test_record_replaces_its_files_atomically(tmp_path, monkeypatch):
    import os

    results.record("00_preface", "acc", 0.97, "fraction", "test split", directory=tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("results.json", "results.md")}

    def crash(*args, **kwargs):
        raise OSError("simulated crash while replacing the file")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        results.record("00_preface", "acc", 0.5, "fraction", "test split", directory=tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the previous files, whole
    assert not list(tmp_path.glob(".*.tmp")), "the half-written temporary file was left behind"
    assert results.load(tmp_path)[0]["value"] == 0.97


def _study_job(name):
    return {"seconds": 1.0, "name": name}


def test_study_cli_merges_each_job_and_replaces_the_file_atomically(tmp_path, monkeypatch, capsys):
    import os

    out = tmp_path / "study.json"
    out.write_text(json.dumps({"old": {"seconds": 2.0}}))
    results.study_cli(["study", "a", "--out", str(out)], "prog", "a study", ["a", "b"], _study_job, out)
    assert json.loads(out.read_text()) == {"old": {"seconds": 2.0}, "a": {"seconds": 1.0, "name": "a"}}
    assert "a: 1.0 s" in capsys.readouterr().out
    before = out.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash while replacing the file")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        results.study_cli(["study", "b", "--out", str(out)], "prog", "a study", ["a", "b"], _study_job, out)
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_study_cli_refuses_a_damaged_file_or_an_unknown_job_before_running_anything(tmp_path):
    out = tmp_path / "study.json"
    out.write_text("{ half a file")
    ran = []

    def job(name):
        ran.append(name)
        return {"seconds": 1.0}

    with pytest.raises(ValueError, match=r"study\.json is damaged.*git checkout -- .*prog study"):
        results.study_cli(["study", "a", "--out", str(out)], "prog", "a study", ["a"], job, out)
    with pytest.raises(ValueError, match="is damaged"):
        results.load_study(out, "prog study")
    out.write_text("{}")
    with pytest.raises(SystemExit):
        results.study_cli(["study", "nope", "--out", str(out)], "prog", "a study", ["a"], job, out)
    assert ran == []


def test_a_compared_number_carries_its_n_and_se(tmp_path):
    e = results.record("05_ddpm", "fd", 1.87, "FD", "p", directory=tmp_path, n=3, se=0.05)
    assert (e["n"], e["se"]) == (3, 0.05) and results.load(tmp_path)[0]["se"] == 0.05
    assert "1.87 ± 0.05 (n = 3)" in (tmp_path / "results.md").read_text()
    single = results.record("05_ddpm", "fd1", 2.0, "FD", "p", directory=tmp_path, n=1)
    assert single["se"] is None and "2 (n = 1)" in (tmp_path / "results.md").read_text()
    bad = [({"n": 0}, "n "), ({"n": 2.5}, "n "), ({"n": 3, "se": float("nan")}, "se must"), ({"n": 3, "se": -1.0}, "se must"),
           ({"n": 1, "se": 0.1}, "needs n >= 2"), ({"se": 0.1}, "needs n >= 2")]  # fmt: skip
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            results.record("05_ddpm", "bad", 1.0, "FD", "p", directory=tmp_path, **kwargs)
