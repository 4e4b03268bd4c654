import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dlearn import train


def _problem(gen):
    """Noisy linear regression: y = x w* + noise; the loss adds noise drawn from the run's generator."""
    x = torch.randn(256, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(256, generator=gen)
    return x, y


def _loss(m, batch, g):
    x, y = batch
    noisy = x + 0.01 * torch.randn(x.shape, generator=g)  # randomness inside the loss
    return F.mse_loss(m(noisy)[:, 0], y)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 1))


def test_fit_learns_and_keeps_the_best(gen):
    x, y = _problem(gen)
    model = _model()
    val = lambda m: F.mse_loss(m(x)[:, 0], y).item()  # noqa: E731
    before = val(model.eval())
    result = train.fit(model, _loss, (x, y), train.TrainConfig(max_steps=300, eval_every=50, lr=1e-2, progress=False), val)
    assert result.steps == 300 and len(result.history) == 6
    assert result.best_metric == min(h["val"] for h in result.history)
    assert val(model.eval()) == pytest.approx(result.best_metric)  # the best weights are loaded back
    assert result.best_metric < 0.1 * before


def test_fit_leaves_the_global_random_state_alone(gen):
    x, y = _problem(gen)
    model = _model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train.fit(model, _loss, (x, y), train.TrainConfig(max_steps=5, eval_every=5, progress=False))  # dropout draws
    torch.testing.assert_close(torch.rand(3), expected)


def test_fit_is_reproducible_and_resumes_exactly(tmp_path, gen):
    x, y = _problem(gen)
    val = lambda m: F.mse_loss(m(x)[:, 0], y).item()  # noqa: E731
    cfg = dict(max_steps=120, eval_every=20, lr=5e-3, seed=7, progress=False)
    straight = _model()
    r1 = train.fit(straight, _loss, (x, y), train.TrainConfig(**cfg), val)

    interrupted = _model()
    ckpt = tmp_path / "run"
    train.fit(interrupted, _loss, (x, y), train.TrainConfig(**{**cfg, "max_steps": 60}, checkpoint_dir=ckpt), val)
    resumed = _model(seed=99)  # a fresh process would build a different init; the checkpoint wins
    r2 = train.fit(resumed, _loss, (x, y), train.TrainConfig(**cfg, checkpoint_dir=ckpt), val)
    assert r2.steps == 120 and r2.history == r1.history
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_keyboard_interrupt_writes_a_checkpoint(tmp_path, gen):
    x, y = _problem(gen)
    calls = {"n": 0}

    def flaky_loss(m, batch, g):
        calls["n"] += 1
        if calls["n"] == 37:
            raise KeyboardInterrupt
        return _loss(m, batch, g)

    cfg = train.TrainConfig(max_steps=100, eval_every=50, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train.fit(_model(), flaky_loss, (x, y), cfg)
    _, meta = train.load_safetensors(tmp_path / "last.safetensors")
    assert meta["step"] == 36
    result = train.fit(_model(), _loss, (x, y), cfg)
    assert result.steps == 100


def test_early_stopping_and_direction(gen):
    x, y = _problem(gen)
    scores = iter([0.5, 0.6, 0.55, 0.4, 0.3, 0.2])  # higher is better; best at the 2nd evaluation
    cfg = train.TrainConfig(max_steps=1000, eval_every=10, patience=3, higher_is_better=True, progress=False)
    result = train.fit(_model(), _loss, (x, y), cfg, val_fn=lambda m: next(scores))
    assert result.stopped_early and result.steps == 50 and result.best_step == 20 and result.best_metric == 0.6


def test_a_dict_of_metrics_is_logged_and_one_named_metric_selects(gen):
    x, y = _problem(gen)
    scores = iter([(0.5, 9.0), (0.6, 1.0), (0.55, 0.0), (0.4, 5.0)])  # (selecting accuracy, another metric)

    def val_fn(m):
        acc, other = next(scores)
        return {"accuracy": acc, "other": other}

    cfg = train.TrainConfig(max_steps=40, eval_every=10, select="accuracy", higher_is_better=True, progress=False)
    result = train.fit(_model(), _loss, (x, y), cfg, val_fn=val_fn)
    assert result.best_step == 20 and result.best_metric == 0.6  # chosen by accuracy, not by "other"
    assert [h["val"] for h in result.history] == [0.5, 0.6, 0.55, 0.4]
    assert [h["other"] for h in result.history] == [9.0, 1.0, 0.0, 5.0]  # logged, under its own name
    assert all("accuracy" not in h for h in result.history)  # the selecting metric is "val"


def test_metric_selection_errors_name_what_is_wrong(gen):
    x, y = _problem(gen)
    run = lambda cfg, fn: train.fit(_model(), _loss, (x, y), cfg, val_fn=fn)  # noqa: E731
    plain = train.TrainConfig(max_steps=5, eval_every=5, progress=False)
    with pytest.raises(TypeError, match=r"dict of metrics \['a', 'b'\].*select="):
        run(plain, lambda m: {"a": 1.0, "b": 2.0})
    selecting = train.TrainConfig(max_steps=5, eval_every=5, select="a", progress=False)
    with pytest.raises(TypeError, match="expects val_fn to return a dict"):
        run(selecting, lambda m: 1.0)
    with pytest.raises(ValueError, match="lack the selecting metric 'a'"):
        run(selecting, lambda m: {"b": 1.0})
    with pytest.raises(ValueError, match="may not be named"):
        run(selecting, lambda m: {"a": 1.0, "val": 2.0})
    with pytest.raises(TypeError, match=r"'b' is a tensor of shape \(3,\)"):
        run(selecting, lambda m: {"a": 1.0, "b": torch.zeros(3)})
    result = run(selecting, lambda m: {"a": 1.0, "b": torch.tensor(2.5)})  # a one-element tensor is logged as a number
    assert result.history[-1]["b"] == 2.5 and isinstance(result.history[-1]["b"], float)


def test_resume_refuses_a_different_config(tmp_path, gen):
    x, y = _problem(gen)
    train.fit(_model(), _loss, (x, y), train.TrainConfig(max_steps=10, eval_every=5, checkpoint_dir=tmp_path, progress=False))
    with pytest.raises(ValueError, match="other settings"):
        train.fit(_model(), _loss, (x, y), train.TrainConfig(max_steps=20, lr=0.1, checkpoint_dir=tmp_path, progress=False))


def test_bad_input_is_refused(gen):
    x, y = _problem(gen)
    with pytest.raises(ValueError, match="max_steps"):
        train.TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="first dimension"):
        train.fit(_model(), _loss, (x, y[:10]), train.TrainConfig(max_steps=1, progress=False))
    with pytest.raises(TypeError, match="tensor"):
        train.fit(_model(), _loss, [[1, 2]], train.TrainConfig(max_steps=1, progress=False))
    with pytest.raises(FloatingPointError, match="nan"):
        train.fit(_model(), lambda m, b, g: torch.tensor(float("nan"), requires_grad=True), (x, y),
                  train.TrainConfig(max_steps=1, progress=False))  # fmt: skip


def test_safetensors_files_roundtrip_and_errors(tmp_path):
    path = tmp_path / "w.safetensors"
    train.save_safetensors(path, {"a": torch.arange(3.0)}, {"metric": 0.5})
    tensors, meta = train.load_safetensors(path)
    assert torch.equal(tensors["a"], torch.arange(3.0)) and meta == {"metric": 0.5}
    with pytest.raises(train.WeightsFileError, match="does not exist.*retrain"):
        train.load_safetensors(tmp_path / "missing.safetensors", hint="retrain it")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(train.WeightsFileError, match="corrupted"):
        train.load_safetensors(path)
    model = nn.Linear(2, 2)
    with pytest.raises(train.WeightsFileError, match="do not fit Linear"):
        train.load_state_into(model, {"weight": torch.zeros(3, 3)}, "x.safetensors")
    # the metadata is plain JSON: nothing is unpickled
    train.save_safetensors(path, {"a": torch.zeros(1)}, {"nested": {"k": [1, 2]}})
    assert json.loads(json.dumps(train.load_safetensors(path)[1])) == {"nested": {"k": [1, 2]}}


def test_show_progress_follows_the_environment(monkeypatch):
    monkeypatch.setenv("DLEARN_PROGRESS", "0")
    assert train.show_progress() is False
    monkeypatch.setenv("DLEARN_PROGRESS", "1")
    assert train.show_progress() is True
    assert train.show_progress(False) is False


def test_a_loss_that_asks_for_the_step_gets_it(tmp_path, gen):
    x, y = _problem(gen)
    seen = []

    def loss(m, batch, g, step):
        seen.append(step)
        return _loss(m, batch, g)

    cfg = train.TrainConfig(max_steps=6, eval_every=3, checkpoint_dir=tmp_path, progress=False)
    train.fit(_model(), loss, (x, y), train.TrainConfig(max_steps=3, eval_every=3, checkpoint_dir=tmp_path, progress=False))
    train.fit(_model(), loss, (x, y), cfg)  # resumed: the count goes on
    assert seen == [0, 1, 2, 3, 4, 5]


def test_cosine_schedule():
    cfg = train.TrainConfig(max_steps=100, lr=1.0, lr_schedule="cosine")
    assert cfg.lr_at(0) == 1.0 and cfg.lr_at(50) == pytest.approx(0.5) and cfg.lr_at(100) == pytest.approx(0.0)
    assert train.TrainConfig(lr=0.3).lr_at(77) == 0.3
    with pytest.raises(ValueError, match="lr_schedule"):
        train.TrainConfig(lr_schedule="step")


def test_ema_averages_the_weights_and_resumes_exactly(tmp_path, gen):
    x, y = _problem(gen)
    val = lambda m: F.mse_loss(m(x)[:, 0], y).item()  # noqa: E731
    cfg = dict(max_steps=60, eval_every=20, lr=5e-3, ema=0.9, progress=False)
    straight = _model()
    r1 = train.fit(straight, _loss, (x, y), train.TrainConfig(**cfg), val)
    assert r1.best_metric == pytest.approx(val(straight.eval()))  # the returned (averaged) weights were evaluated
    resumed = _model()
    train.fit(resumed, _loss, (x, y), train.TrainConfig(**{**cfg, "max_steps": 40}, checkpoint_dir=tmp_path), val)
    resumed = _model()
    r2 = train.fit(resumed, _loss, (x, y), train.TrainConfig(**cfg, checkpoint_dir=tmp_path), val)
    assert r2.history == r1.history
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="ema"):
        train.TrainConfig(ema=1.5)


def test_ema_is_the_exponential_average(gen):
    x, y = _problem(gen)
    snapshots = []

    def loss(m, batch, g):
        snapshots.append(m[0].weight.detach().clone())  # the live weights before each step
        return _loss(m, batch, g)

    cfg = dict(max_steps=3, eval_every=3, lr=0.05, progress=False)
    live = _model()
    train.fit(live, loss, (x, y), train.TrainConfig(**cfg))  # no average: returns the live weights w3
    averaged = _model()
    train.fit(averaged, _loss, (x, y), train.TrainConfig(**cfg, ema=0.5))  # same run, averaged
    avg = snapshots[0]
    for w in [*snapshots[1:], live[0].weight.detach()]:
        avg = 0.5 * avg + 0.5 * w
    torch.testing.assert_close(averaged[0].weight, avg)
