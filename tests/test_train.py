import json
import re

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


# --------------------------------------------------------------------------------------------
# an interrupted run (Ctrl-C) resumes to the weights and history of a run never stopped
# --------------------------------------------------------------------------------------------


def _interrupted_then_resumed(tmp_path, x, y, cfg, val, interrupt):
    """Run until `interrupt` (which raises KeyboardInterrupt from the loss or val_fn) stops it, then resume
    in a fresh model with the plain loss and val_fn: (model, result) of the resumed run."""
    ckpt = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.fit(_model(), interrupt.loss, (x, y), train.TrainConfig(**cfg, checkpoint_dir=ckpt), interrupt.val)
    assert interrupt.fired
    resumed = _model(seed=99)  # a fresh process builds another init; the checkpoint wins
    result = train.fit(resumed, _loss, (x, y), train.TrainConfig(**cfg, checkpoint_dir=ckpt), val)
    return resumed, result


class _Interrupt:
    """Raises KeyboardInterrupt in the loss of step `step` (0-based: before that step is taken) or, with
    where="val", in the validation after `step` steps (once, the first time either is reached)."""

    def __init__(self, val, step, where="loss"):
        self.base_val, self.step, self.where, self.fired, self.losses, self.vals = val, step, where, False, 0, 0

    def loss(self, m, batch, g):
        if self.where == "loss" and self.losses == self.step and not self.fired:
            self.fired = True
            noise = torch.randn(3, generator=g)  # the step had already drawn from the run's generator  # noqa: F841
            torch.rand(3)  # and from torch's (dropout's)
            raise KeyboardInterrupt
        self.losses += 1
        return _loss(m, batch, g)

    def val(self, m):
        if self.where == "val" and self.losses == self.step and not self.fired:
            self.fired = True
            torch.rand(3)
            raise KeyboardInterrupt
        return self.base_val(m)


@pytest.mark.parametrize(
    "step, where, ema",
    [
        (27, "loss", None),  # in the middle of an evaluation interval
        (20, "loss", None),  # the step right after the checkpoint of step 20
        (19, "loss", None),  # the step whose end is a checkpoint
        (40, "val", None),  # during the evaluation (and checkpoint) of step 40
        (40, "val", 0.9),  # ... while the model holds the averaged weights
        (33, "loss", 0.9),
    ],
)
def test_an_interrupted_run_resumes_exactly(tmp_path, gen, step, where, ema):
    x, y = _problem(gen)
    val = lambda m: F.mse_loss(m(x)[:, 0], y).item()  # noqa: E731
    cfg = dict(max_steps=60, eval_every=20, lr=5e-3, seed=3, ema=ema, progress=False)
    straight = _model()
    r1 = train.fit(straight, _loss, (x, y), train.TrainConfig(**cfg), val)
    resumed, r2 = _interrupted_then_resumed(tmp_path, x, y, cfg, val, _Interrupt(val, step, where))
    assert r2.steps == 60 and r2.history == r1.history
    assert (r2.best_step, r2.best_metric) == (r1.best_step, r1.best_metric)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_ctrl_c_during_the_optimiser_step_waits_for_the_step_to_finish(tmp_path, gen):
    """A real SIGINT that lands inside the AdamW update (half the parameters updated) must not leave a
    checkpoint of a half-taken step: the step completes, then the interruption is raised."""
    import os
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    x, y = _problem(gen)
    val = lambda m: F.mse_loss(m(x)[:, 0], y).item()  # noqa: E731
    cfg = dict(max_steps=40, eval_every=20, lr=5e-3, seed=1, progress=False)
    straight = _model()
    r1 = train.fit(straight, _loss, (x, y), train.TrainConfig(**cfg), val)
    steps = {"n": 0}

    def ctrl_c(opt, args, kwargs):
        steps["n"] += 1
        if steps["n"] == 13:
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at the next bytecode

    handle = register_optimizer_step_post_hook(ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.fit(_model(), _loss, (x, y), train.TrainConfig(**cfg, checkpoint_dir=tmp_path), val)
    finally:
        handle.remove()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # fit put the handler back
    assert train.load_safetensors(tmp_path / "last.safetensors")[1]["step"] == 13
    resumed = _model()
    r2 = train.fit(resumed, _loss, (x, y), train.TrainConfig(**cfg, checkpoint_dir=tmp_path), val)
    assert r2.history == r1.history
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "field, value",
    [
        ("grad_clip", -1.0),  # would scale every gradient by a negative factor: the loss climbs
        ("grad_clip", 0.0),
        ("grad_clip", float("nan")),
        ("grad_clip", float("inf")),
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("lr", -1e-3),
        ("lr", "1e-3"),
        ("weight_decay", -0.1),
        ("weight_decay", float("nan")),
        ("max_steps", 10.5),
        ("max_steps", True),
        ("batch_size", 0),
        ("batch_size", 32.0),
        ("eval_every", -5),
        ("patience", 0),
        ("patience", 2.5),
        ("patience", float("nan")),
        ("ema", float("nan")),
        ("ema", 1.0),
        ("ema", "0.9"),
    ],
)
def test_a_bad_number_in_the_config_is_refused(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be .*got {re.escape(repr(value))}"):
        train.TrainConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value",
    [("seed", 1.5), ("select", 3), ("higher_is_better", "yes"), ("progress", "no"), ("checkpoint_dir", 3)],
)
def test_a_setting_of_the_wrong_kind_is_refused(field, value):
    with pytest.raises(TypeError, match=rf"{field} must be"):
        train.TrainConfig(**{field: value})


def test_fit_checks_the_config_again(gen):
    """A field set after construction is checked by fit, before any step is taken."""
    x, y = _problem(gen)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = train.TrainConfig(max_steps=50, progress=False)
    cfg.grad_clip = -1.0
    with pytest.raises(ValueError, match="grad_clip must be a positive finite number or None, got -1.0"):
        train.fit(model, _loss, (x, y), cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train.fit(model, _loss, (x, y), {"max_steps": 5})
    with pytest.raises(ValueError, match="has no parameters"):
        train.fit(nn.ReLU(), _loss, (x, y), train.TrainConfig(max_steps=1, progress=False))
    with pytest.raises(ValueError, match="scalar tensor"):
        train.fit(model, lambda m, b, g: 1.0, (x, y), train.TrainConfig(max_steps=1, progress=False))


def test_a_damaged_checkpoint_is_refused_and_an_older_one_resumes_with_a_warning(tmp_path, gen):
    from safetensors.torch import load_file, save_file

    x, y = _problem(gen)
    cfg = dict(max_steps=20, eval_every=10, progress=False)
    train.fit(_model(), _loss, (x, y), train.TrainConfig(**{**cfg, "max_steps": 10}, checkpoint_dir=tmp_path))
    last = tmp_path / "last.safetensors"
    good = last.read_bytes()
    data = bytearray(good)
    data[-64:] = bytes(64)  # the end of the tensor data
    last.write_bytes(bytes(data))
    with pytest.raises(train.WeightsFileError, match=rf"{re.escape(str(last))} is corrupted.*Delete the directory"):
        train.fit(_model(), _loss, (x, y), train.TrainConfig(**cfg, checkpoint_dir=tmp_path))
    last.write_bytes(good)
    header = json.loads(good[8 : 8 + int.from_bytes(good[:8], "little")])["__metadata__"]
    save_file(load_file(last), str(last), metadata={"dlearn": header["dlearn"]})  # as a dlearn without digests wrote it
    with pytest.warns(UserWarning, match="no digest"):
        result = train.fit(_model(), _loss, (x, y), train.TrainConfig(**cfg, checkpoint_dir=tmp_path))
    assert result.steps == 20 and [h["step"] for h in result.history] == [10, 20]
