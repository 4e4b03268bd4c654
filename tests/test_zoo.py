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
    assert meta["train_seconds"] > 0 and meta["recipe"] == f"{recipe.__module__}:{recipe.__name__}"


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


def test_train_checkpoints_and_the_same_call_again_resumes(tmp_path, monkeypatch):
    """`zoo.train(..., checkpoint_dir=DIR)` reaches the recipe's `fit`; after a Ctrl-C the same call resumes
    (it takes only the remaining steps) and ends with the weights of a run never stopped."""
    from dlearn import train as train_module

    seen, calls = [], {"n": 0, "interrupt_at": 13}
    real_fit = train_module.fit

    def spying_fit(model, loss_fn, data, config, val_fn=None):
        seen.append(config.checkpoint_dir)

        def counted(m, batch, g):
            calls["n"] += 1
            if calls["n"] == calls["interrupt_at"]:
                raise KeyboardInterrupt
            return loss_fn(m, batch, g)

        return real_fit(model, counted, data, config, val_fn)

    monkeypatch.setattr(classifier_study, "fit", spying_fit)
    run = dict(seed=0, save=False, measure=False, max_steps=20, progress=False)
    with pytest.raises(KeyboardInterrupt):
        zoo.train("digits_classifier", checkpoint_dir=tmp_path, **run)
    assert seen == [tmp_path / "seed0"]
    assert train_module.load_safetensors(tmp_path / "seed0" / "last.safetensors")[1]["step"] == 12
    assert json.loads((tmp_path / "seed0" / "recipe.json").read_text())["settings"]["max_steps"] == 20
    calls.update(n=0, interrupt_at=None)
    resumed, meta = zoo.train("digits_classifier", checkpoint_dir=tmp_path, **run)  # the same call again
    assert calls["n"] == 8 and meta["steps"] == 20  # the 8 steps left, not 20
    calls.update(n=0)
    zoo.train("digits_classifier", checkpoint_dir=tmp_path, **run)  # once more: the finished run, no step
    assert calls["n"] == 0
    straight, _ = zoo.train("digits_classifier", **run)  # never stopped, no checkpoints
    assert seen[-1] is None and calls["n"] == 20
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"seed0 were written by another run.*'max_steps': 20.*delete"):
        zoo.train("digits_classifier", checkpoint_dir=tmp_path, **{**run, "max_steps": 30})


def test_the_cli_passes_the_checkpoint_folder_down(monkeypatch, tmp_path, capsys):
    got = {}

    def fake_train(name, **kwargs):
        got.update(kwargs, name=name)
        return None, {"train_seconds": 1.0, "metrics": {}}

    monkeypatch.setattr(zoo, "train", fake_train)
    zoo.main(["train", "vae", "--checkpoint-dir", str(tmp_path)])
    assert got["name"] == "vae" and got["checkpoint_dir"] == str(tmp_path)
    zoo.main(["train", "vae"])
    assert got["checkpoint_dir"] is None


def test_the_long_recipes_checkpoint_and_the_short_one_says_it_does_not(tmp_path):
    import inspect

    for name, entry in zoo.REGISTRY.items():
        has = "checkpoint_dir" in inspect.signature(entry.recipe).parameters
        assert has == (name != "dreambooth"), name  # dreambooth: 300 steps of `dreambooth.finetune`, not `fit`
    with pytest.raises(ValueError, match="dreambooth's recipe .* does not checkpoint"):
        zoo.train("dreambooth", save=False, checkpoint_dir=tmp_path)
    assert not any(tmp_path.iterdir())


class _Reached(Exception):
    pass


@pytest.mark.parametrize("name", ["vae", "hvae", "vdm", "ddpm", "text2image", "controlnet"])
def test_each_recipe_hands_the_checkpoint_folder_to_fit(name, tmp_path, monkeypatch):
    """Each long recipe passes `checkpoint_dir` to its `TrainConfig` (stopped at `fit`, before any step)."""
    import sys

    recipe = zoo.REGISTRY[name].recipe
    module = sys.modules[recipe.__module__]

    def stop(model, loss_fn, data, config, val_fn=None):
        raise _Reached(config.checkpoint_dir)

    monkeypatch.setattr(module, "fit", stop)
    if name == "controlnet":  # its step-0 record samples 2 x 100 images first: blank ones will do here
        monkeypatch.setattr(module, "generate", lambda base, cn, masks, prompts, *a, **k: torch.zeros(len(prompts), 1, 8, 8))
    kwargs = {**zoo.REGISTRY[name].config, **zoo.REGISTRY[name].recipe_kwargs}
    with pytest.raises(_Reached) as reached:
        recipe(seed=0, **kwargs, checkpoint_dir=tmp_path / "run")
    assert reached.value.args == (tmp_path / "run",)


def test_the_vae_recipe_warms_up_its_kl_like_the_hvae_recipe(monkeypatch):
    """`train_vae(warmup_steps=W)` trains on reconstruction + kappa * KL, kappa = min(1, (step + 1) / W) (as
    `hvae.training_loss`); without warm-up its loss is the plain negative ELBO; a negative W is refused."""
    from dlearn import vae
    from dlearn.studies import vae as vae_study

    caught = {}

    def stop(model, loss_fn, data, config, val_fn=None):
        caught.update(model=model, loss_fn=loss_fn, x=data[0][:16])
        raise _Reached()

    monkeypatch.setattr(vae_study, "fit", stop)
    config = zoo.REGISTRY["vae"].config

    def terms_and_loss(warmup_steps, **step):
        with pytest.raises(_Reached):
            vae_study.train_vae(seed=0, warmup_steps=warmup_steps, **config)
        m, x = caught["model"], caught["x"]
        loss = caught["loss_fn"](m, (x,), torch.Generator().manual_seed(3), **step)
        return vae.elbo_terms(m, x, torch.Generator().manual_seed(3)), loss

    t, loss = terms_and_loss(0)
    torch.testing.assert_close(loss, t.neg_elbo.mean())
    for step, kappa in ((0, 0.1), (4, 0.5), (9, 1.0), (500, 1.0)):
        t, loss = terms_and_loss(10, step=step)
        assert t.prior.mean() > 0.01  # the KL term is there to be weighted
        torch.testing.assert_close(loss, (kappa * t.prior + t.reconstruction).mean())
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        vae_study.train_vae(seed=0, warmup_steps=-1, **config)


def _stats(runs, key):
    """Mean and (n - 1) standard deviation of one metric over the runs, computed independently of the registry."""
    import statistics

    values = [r["metrics"][key] for r in runs]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def test_add_seeds_grows_the_record_and_keeps_the_shipped_tensors(monkeypatch, tmp_path):
    """`add_seeds` trains only the new seeds and merges them into the record; the file's tensors stay bit for bit."""
    import dataclasses

    from dlearn import train as train_module

    _tiny_record_entry(monkeypatch, tmp_path)
    entry = dataclasses.replace(zoo.REGISTRY["tiny_record"], seeds=(0,), weights=True)
    monkeypatch.setitem(zoo.REGISTRY, "tiny_weights", entry)
    zoo.train("tiny_weights")
    file = tmp_path / "tiny_weights.safetensors"
    before, old = train_module.load_safetensors(file)
    meta = zoo.add_seeds("tiny_weights", [2, 1])
    after, stored = train_module.load_safetensors(file, require_digest=True)  # the digest verifies
    assert stored == json.loads(json.dumps(meta)) and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [r["seed"] for r in stored["runs"]] == [0, 1, 2] and stored["runs"][0] == old["runs"][0]
    for k in ("seed", "metrics", "history", "best_step", "steps", "train_seconds", "versions", "recipe_kwargs"):
        assert stored[k] == old[k], k  # the shipped seed's metadata is unchanged
    mean, std = _stats(stored["runs"], "val_accuracy")
    assert stored["mean"]["val_accuracy"] == pytest.approx(mean) and stored["std"]["val_accuracy"] == pytest.approx(std)
    assert len({r["metrics"]["val_accuracy"] for r in stored["runs"]}) > 1  # the seeds differ, so std is tested
    zoo.check("tiny_weights")  # the grown record keeps the convention, and the weights still reach their metrics
    with pytest.raises(ValueError, match=r"already holds seeds \[1\]"):
        zoo.add_seeds("tiny_weights", [1, 3])
    assert train_module.load_safetensors(file)[1] == stored  # refused before anything was trained or written
    with pytest.raises(ValueError, match="more than once"):
        zoo.add_seeds("tiny_weights", [4, 4])
    monkeypatch.setitem(zoo.REGISTRY, "tiny_weights", dataclasses.replace(entry, recipe_kwargs={"max_steps": 20}))
    with pytest.raises(ValueError, match="trained with .* retrain it"):
        zoo.add_seeds("tiny_weights", [3])  # runs of another recipe would not be seeds of one


def test_add_seeds_to_a_record_only_entry_and_check_holds_the_seed_convention(monkeypatch, tmp_path):
    import dataclasses

    _tiny_record_entry(monkeypatch, tmp_path)
    _, old = zoo.train("tiny_record")
    old = json.loads(json.dumps(old))
    meta = zoo.add_seeds("tiny_record", [3])
    assert not (tmp_path / "tiny_record.safetensors").exists()  # still the record only
    rec = zoo.info("tiny_record")
    assert rec == json.loads(json.dumps(meta)) and [r["seed"] for r in rec["runs"]] == [0, 1, 3]
    assert rec["runs"][:2] == old["runs"] and rec["metrics"] == old["metrics"] and rec["history"] == old["history"]
    mean, std = _stats(rec["runs"], "val_accuracy")
    assert rec["mean"]["val_accuracy"] == pytest.approx(mean) and rec["std"]["val_accuracy"] == pytest.approx(std)
    assert zoo.check("tiny_record")["mean val_accuracy"][0] == pytest.approx(mean)
    with pytest.raises(ValueError, match=r"already holds seeds \[0\]"):
        zoo.add_seeds("tiny_record", [0])
    # the record's seeds must start with the entry's (those a full retrain runs), then the added ones, increasing
    monkeypatch.setitem(zoo.REGISTRY, "tiny_record", dataclasses.replace(zoo.REGISTRY["tiny_record"], seeds=(0, 1, 2)))
    with pytest.raises(AssertionError, match=r"holds seeds \[0, 1, 3\].*entry's seeds \[0, 1, 2\]"):
        zoo.check("tiny_record")
    with pytest.raises(ValueError, match="entry's seeds"):
        zoo.add_seeds("tiny_record", [5])


def test_the_cli_passes_added_seeds_down(monkeypatch, tmp_path, capsys):
    got = {}

    def fake_add_seeds(name, seeds, checkpoint_dir=None):
        got.update(name=name, seeds=seeds, checkpoint_dir=checkpoint_dir)
        return {"runs": [{"seed": s} for s in (0, *seeds)], "mean": {}, "std": {}}

    monkeypatch.setattr(zoo, "add_seeds", fake_add_seeds)
    monkeypatch.setattr(zoo, "train", lambda *a, **k: pytest.fail("--add-seeds must not retrain the entry"))
    zoo.main(["train", "ddpm_x0", "--add-seeds", "1", "2", "--checkpoint-dir", str(tmp_path)])
    assert got == {"name": "ddpm_x0", "seeds": [1, 2], "checkpoint_dir": str(tmp_path)}
    assert "seeds [0, 1, 2]" in capsys.readouterr().out
    zoo.main(["train", "ddpm_x0", "--add-seeds", "3"])
    assert got == {"name": "ddpm_x0", "seeds": [3], "checkpoint_dir": None}
    with pytest.raises(SystemExit):
        zoo.main(["train", "ddpm_x0", "--add-seeds", "3", "--seed", "1"])
