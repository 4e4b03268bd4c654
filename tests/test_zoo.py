import pytest
import torch

from dlearn import datasets, metrics, shipped, zoo
from dlearn.train import WeightsFileError, save_safetensors


@pytest.mark.parametrize("name", sorted(zoo.REGISTRY))
def test_each_recipe_runs_a_few_steps(name):
    model, meta = zoo.train(name, seed=0, save=False, measure=False, max_steps=20, progress=False)
    assert meta["steps"] == 20
    shipped = zoo.load(name)  # the recipe builds the shipped architecture
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in shipped.state_dict().items()}


@pytest.mark.parametrize("name", sorted(zoo.REGISTRY))
def test_each_shipped_weight_still_reaches_its_recorded_metrics(name):
    report = zoo.check(name)
    assert report  # at least one metric is recorded and re-measured
    meta = zoo.info(name)
    recipe = zoo.REGISTRY[name].recipe
    # "module:function" as it was when the file was trained (recipes moved to dlearn.studies since)
    assert meta["train_seconds"] > 0 and meta["recipe"].rsplit(":", 1)[-1] == recipe.__name__


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
    assert files == set(zoo.REGISTRY), {
        "unregistered files": files - set(zoo.REGISTRY),
        "entries without a file": set(zoo.REGISTRY) - files,
    }
