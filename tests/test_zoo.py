import json

import pytest
import torch

from dlearn import datasets, metrics, shipped, zoo
from dlearn.studies import classifier as classifier_study
from dlearn.train import WeightsFileError, save_safetensors


@pytest.mark.registry
@pytest.mark.parametrize("name", sorted(zoo.REGISTRY))
def test_each_recipe_runs_a_few_steps(name):
    model, meta = zoo.train(name, seed=0, save=False, measure=False, max_steps=20, progress=False)
    assert meta["steps"] == 20
    # the recipe builds the registry's architecture, which is the shipped file's where the weights ship
    reference = zoo.load(name) if zoo.REGISTRY[name].weights else zoo.build(name)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


@pytest.mark.registry
@pytest.mark.parametrize("name", sorted(zoo.REGISTRY))
def test_each_shipped_weight_still_reaches_its_recorded_metrics(name):
    report = zoo.check(name)
    assert report  # at least one metric is recorded and re-measured
    meta = zoo.info(name)
    recipe = zoo.REGISTRY[name].recipe
    # "module:function" as it was when the file was trained (recipes moved to dlearn.studies since)
    assert meta["train_seconds"] > 0 and meta["recipe"].rsplit(":", 1)[-1] == recipe.__name__


def test_a_recipe_runs_and_a_check_re_measures_in_the_unit_tests():
    """The two registry paths on its cheapest entry; `make registry` runs them for every entry."""
    model, meta = zoo.train("digits_classifier", seed=0, save=False, measure=True, max_steps=20, progress=False)
    assert meta["steps"] == 20 and set(meta["metrics"]) == set(zoo.info("digits_classifier")["metrics"])
    assert isinstance(model, metrics.DigitClassifier)
    report = zoo.check("digits_classifier")
    assert report and all(abs(rec - got) <= zoo.REGISTRY["digits_classifier"].tolerance for rec, got in report.values())


def test_the_classifier_meets_the_books_bar():
    clf = zoo.load("digits_classifier")
    assert not any(p.requires_grad for p in clf.parameters()) and not clf.training
    x, y = datasets.digits("test", form="unit")
    acc = metrics.accuracy(metrics.predict(clf, x), y)
    assert acc >= 0.97
    assert acc == pytest.approx(zoo.info("digits_classifier")["metrics"]["test_accuracy"], abs=1e-4)


def test_missing_and_corrupted_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsFileError, match=r"digits_classifier.safetensors does not exist.*python -m dlearn.zoo train"):
        zoo.load("digits_classifier")
    (tmp_path / "digits_classifier.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsFileError, match="corrupted.*python -m dlearn.zoo train digits_classifier"):
        zoo.load("digits_classifier")


def test_mismatched_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    save_safetensors(tmp_path / "digits_classifier.safetensors", {"w": torch.zeros(2)}, {})
    with pytest.raises(WeightsFileError, match="do not fit DigitClassifier"):
        zoo.load("digits_classifier")


def test_check_detects_drift(tmp_path, monkeypatch):
    model, meta = zoo.load("digits_classifier"), zoo.info("digits_classifier")
    meta["metrics"]["test_accuracy"] += 0.01
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    save_safetensors(zoo.weights_path("digits_classifier"), model.state_dict(), meta)
    with pytest.raises(AssertionError, match="no longer reach"):
        zoo.check("digits_classifier")


def test_unknown_name():
    with pytest.raises(KeyError, match="known"):
        zoo.load("stable_diffusion_xl")


def test_cli_list(capsys):
    zoo.main(["list"])
    assert "digits_classifier" in capsys.readouterr().out


def test_every_shipped_file_has_a_registry_entry_and_back():
    """The registry-parametrised tests only see registered names: a weights file without an entry would go unchecked."""
    files = {p.stem for p in shipped.WEIGHTS_DIR.glob("*.safetensors")}
    with_weights = {n for n, e in zoo.REGISTRY.items() if e.weights}
    # a record-only entry may have weights on this machine (`zoo train NAME --keep-weights`), never shipped ones
    assert with_weights <= files <= set(zoo.REGISTRY), {"unregistered files": files - set(zoo.REGISTRY),
                                                        "entries without a file": with_weights - files}  # fmt: skip
    records = set(shipped.records())
    record_only = set(zoo.REGISTRY) - with_weights
    assert records == record_only, {"unregistered records": records - record_only, "without a record": record_only - records}


def _tiny_record_entry(monkeypatch, tmp_path):
    """A record-only entry on the classifier's recipe with a cheap metric, in an empty weights folder."""
    x_val, y_val = datasets.digits("val", form="unit")
    entry = zoo.Entry(
        build=metrics.DigitClassifier,
        recipe=classifier_study.train_classifier,
        evaluate=lambda m: {"val_accuracy": metrics.accuracy(metrics.predict(m, x_val), y_val)},
        description="a test entry",
        recipe_kwargs={"max_steps": 10, "progress": False},
        seeds=(0, 1),
        weights=False,
    )
    monkeypatch.setitem(zoo.REGISTRY, "tiny_record", entry)
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)


def test_an_entry_that_ships_its_record_only(monkeypatch, tmp_path):
    _tiny_record_entry(monkeypatch, tmp_path)
    _, meta = zoo.train("tiny_record")
    assert not (tmp_path / "tiny_record.safetensors").exists()  # the record, not the weights
    assert zoo.info("tiny_record") == json.loads(json.dumps(meta))
    assert [r["seed"] for r in meta["runs"]] == [0, 1]
    with pytest.raises(WeightsFileError, match=r"record only.*python -m dlearn.zoo train tiny_record --keep-weights"):
        zoo.load("tiny_record")
    quick = zoo.check("tiny_record")  # the record agrees with itself
    assert quick["mean val_accuracy"][0] == pytest.approx(sum(r["metrics"]["val_accuracy"] for r in meta["runs"]) / 2)
    full = zoo.check("tiny_record", full=True)  # retrains both seeds and re-measures
    assert set(full) == {"seed 0 val_accuracy", "seed 1 val_accuracy"}
    with pytest.raises(ValueError, match="holds every seed"):
        zoo.train("tiny_record", seed=1)  # would replace the two-seed record by a one-seed one
    record = zoo.info("tiny_record")
    zoo.train("tiny_record", keep_weights=True)  # the first seed's weights, the record untouched
    assert isinstance(zoo.load("tiny_record"), metrics.DigitClassifier) and zoo.info("tiny_record") == record
    with pytest.raises(ValueError, match="ships its weights"):
        zoo.train("digits_classifier", keep_weights=True, save=False)


def test_a_tampered_record_fails_its_check(monkeypatch, tmp_path):
    _tiny_record_entry(monkeypatch, tmp_path)
    _, meta = zoo.train("tiny_record")
    meta = json.loads(json.dumps(meta))
    meta["mean"]["val_accuracy"] += 0.01
    shipped.save_record("tiny_record", meta)
    with pytest.raises(AssertionError, match="no longer matches"):
        zoo.check("tiny_record")
    (tmp_path / shipped.RECORDS).write_text("{not json")
    with pytest.raises(WeightsFileError, match="unreadable.*git checkout"):
        zoo.info("tiny_record")
