"""Chapter 08's measurements: the recipe of the shipped ControlNets, their evaluation, and the chapter's study.

    python -m dlearn.zoo train controlnet                 # runs `train_controlnet`, records `protocol_metrics`
    python -m dlearn.studies.controlnet study [JOB ...]   # the ablations of `STUDY_JOBS` -> controlnet_study.json

`condition_fidelity` is the toy's mask IoU; `evaluate` measures it (with class accuracy and FD) under the
paper's four prompt settings. The study also holds the alternative ControlNet avoids (fine-tuning the whole
base with the mask as an input channel) and the count of what a training step of each costs.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from dlearn import datasets, metrics, results, shipped
from dlearn.controlnet import CONTROLS, ControlNet, coarse_layout, control_mask, controlnet_loss, generate, toy_block_weights
from dlearn.distributions import levels_to_unit, unit_to_levels
from dlearn.metrics import iou
from dlearn.studies import text2image as text2image_study
from dlearn.text2image import (
    DIGIT_WORDS,
    TextToImage,
    attribute_bits,
    caption,
    evaluation_prompts,
    noised,
    tokenize,
    training_prompts,
)
from dlearn.text2image import generate as t2i_generate
from dlearn.train import TrainConfig, fit

# --------------------------------------------------------------------------------------------
# How well a generated digit follows its mask, and the condition encoder's shape arithmetic (C8)
# --------------------------------------------------------------------------------------------


def condition_fidelity(images: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
    """IoU (per image, shape (B,)) of generated images in [-1, 1] with their control masks: the toy's
    analogue of the paper's ADE20K segmentation IoU. The image is thresholded like the control (level > 8)."""
    if images.shape[0] != controls.shape[0]:
        raise ValueError(f"one control per image: got {controls.shape[0]} controls for {images.shape[0]} images")
    got = control_mask(unit_to_levels(images.detach().cpu().reshape(-1, 64)))
    return iou(got.bool(), controls.detach().cpu().reshape(got.shape).bool())


def encoder_output_size(size: int, layers: list[tuple[int, int, int]]) -> int:
    """Spatial size after convolutions given as (kernel, stride, padding): floor((n + 2p - k) / s) + 1 each."""
    for k, s, p in layers:
        if size + 2 * p < k:
            raise ValueError(f"a {k}x{k} kernel does not fit a {size}x{size} input with padding {p}")
        size = (size + 2 * p - k) // s + 1
    return size


PAPER_HINT_ENCODER = [(4, 2, 1)] * 4  # the paper's text: "four convolution layers with 4x4 kernels and 2x2 strides"
CODE_HINT_ENCODER = [(3, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1)]
"""The released code's `input_hint_block`: eight 3x3 convolutions, three of them with stride 2 (16, 16, 32, 32,
96, 96, 256 channels, then the zero convolution to the model's 320)."""


# --------------------------------------------------------------------------------------------
# Training data, the evaluation protocol (C19) and the recipe of the shipped ControlNets
# --------------------------------------------------------------------------------------------


def training_data(control: str = "mask", n_train: int | None = None, seed: int = 0):
    """(images in [-1, 1], labels, attribute bits, controls) of the training split, or a random `n_train` of it."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {sorted(CONTROLS)}, got {control!r}")
    x, y = datasets.digits("train")
    if n_train is not None:
        if not 1 <= n_train <= len(x):
            raise ValueError(f"n_train must be in 1..{len(x)}, got {n_train}")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_train]
        x, y = x[idx], y[idx]
    return levels_to_unit(x), y, attribute_bits(x, y), CONTROLS[control](control_mask(x))


def evaluation_set(n: int = 100, control: str = "mask"):
    """A fixed set for condition fidelity: the first `n` validation digits, their masks, classes and captions."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {sorted(CONTROLS)}, got {control!r}")
    x, y = datasets.digits("val")
    x, y = x[:n], y[:n]
    return CONTROLS[control](control_mask(x)), y, caption(x, y)


INTERPRETED = ("coarse",)
"""Controls that are not a copy of what the sample should show: their fidelity is measured against the digit's own
full mask, the same target as the base's, and not against the control itself."""


def fidelity_target(n: int = 100, control: str = "mask") -> torch.Tensor:
    """What the samples of `evaluation_set(n, control)` are scored against: the control itself, or for a control
    that must be interpreted (`INTERPRETED`) the digit's full mask."""
    return evaluation_set(n, "mask" if control in INTERPRETED else control)[0]


def coarse_fidelity(images: torch.Tensor, layouts: torch.Tensor) -> torch.Tensor:
    """IoU (per image) of the coarse layout of generated images with coarse layout maps (`coarse_layout`)."""
    got = control_mask(unit_to_levels(images.detach().cpu().reshape(-1, 64)))
    return condition_fidelity(coarse_layout(got) * 2 - 1, layouts)


PROMPT_SETTINGS = ("none", "insufficient", "conflicting", "perfect")


def prompts_for(setting: str, labels: torch.Tensor, captions: list[str]) -> list[str]:
    """The paper's four prompt settings (C19) for the toy: "none" (empty), "insufficient" (the caption without the
    digit word, e.g. "a thick"), "conflicting" (another digit: class + 5 mod 10), "perfect" (the full caption)."""
    if setting == "none":
        return [""] * len(labels)
    if setting == "perfect":
        return list(captions)
    if setting == "insufficient":
        return [" ".join(w for w in c.split() if w not in DIGIT_WORDS) for c in captions]
    if setting == "conflicting":
        return [f"a {DIGIT_WORDS[(int(c) + 5) % 10]}" for c in labels]
    raise ValueError(f"setting must be one of {PROMPT_SETTINGS}, got {setting!r}")


def conflicting_classes(labels: torch.Tensor) -> torch.Tensor:
    """The class named by the "conflicting" prompt."""
    return (labels + 5) % 10


def evaluate(base: TextToImage, cn, n: int = 100, control: str = "mask", steps: int = 20, guidance_scale: float = 1.0,
             settings=PROMPT_SETTINGS, classifier=None) -> dict[str, float]:  # fmt: skip
    """Condition fidelity (mean IoU), class accuracy (of the mask's class; for "conflicting" also of the prompt's
    class) and FD to the test split, for each prompt setting on the fixed evaluation set (C19)."""
    clf = metrics.shipped_classifier() if classifier is None else classifier
    masks, labels, captions = evaluation_set(n, control)
    target = fidelity_target(n, control)
    test_feats = metrics.features(clf, datasets.digits("test", form="unit")[0])
    out = {}
    for s in settings:
        imgs = generate(base, cn, masks if cn is not None else None, prompts_for(s, labels, captions), guidance_scale,
                        steps, seed=2)  # fmt: skip
        x = levels_to_unit(unit_to_levels(imgs))
        pred = metrics.predict(clf, x)
        out[f"iou_{s}"] = condition_fidelity(imgs, target).mean().item()
        if control in INTERPRETED:
            out[f"coarse_iou_{s}"] = coarse_fidelity(imgs, evaluation_set(n, control)[0]).mean().item()
        out[f"class_accuracy_{s}"] = metrics.accuracy(pred, labels)
        if s == "conflicting":
            out["prompt_class_accuracy_conflicting"] = metrics.accuracy(pred, conflicting_classes(labels))
        out[f"fd_{s}"] = metrics.frechet_distance(metrics.features(clf, x), test_feats)
    return out


def train_controlnet(seed: int = 0, max_steps: int = 1500, variant: str = "full", init: str = "zero",
                     control: str = "mask", p_uncond: float = 0.5, n_train: int | None = None, lr: float = 1e-3,
                     batch_size: int = 64, eval_every: int = 25, base: TextToImage | None = None,
                     progress: bool | None = None, checkpoint_dir: str | Path | None = None):  # fmt: skip
    """The zoo's recipe: a ControlNet on the shipped `text2image` base (locked), AdamW at constant `lr`, no EMA
    (so the learning curve is the raw one). At step 0 and every `eval_every` steps it logs the condition fidelity
    (mean IoU) of 100 validation masks with no prompt (DDIM-10, w = 1), and keeps the best. `checkpoint_dir`: `fit`
    checkpoints there, and the same call again resumes the run (`TrainConfig`; the step-0 record is measured again).

    Returns:
        the ControlNet (eval mode) and the `TrainResult`; every history record also holds the IoU with the perfect
        prompt ("iou_prompt") and the class accuracy of the no-prompt and perfect-prompt samples.
    """
    base = text2image_study.shipped_base() if base is None else base.requires_grad_(False).eval()
    cn = ControlNet.from_unet(base.unet, variant=variant, init=init, seed=seed, control=control)
    data = training_data(control, n_train, seed)
    masks, labels, captions = evaluation_set(100, control)
    target = fidelity_target(100, control)
    clf = metrics.shipped_classifier()

    def acc(imgs):
        return metrics.accuracy(metrics.predict(clf, levels_to_unit(unit_to_levels(imgs))), labels)

    def val_fn(m):
        """The mask IoU without a prompt selects the checkpoint; with the caption, and the class accuracy, are logged."""
        none = generate(base, m, masks, [""] * len(masks), steps=10, seed=1)
        perfect = generate(base, m, masks, captions, steps=10, seed=1)
        return {"iou_none": condition_fidelity(none, target).mean().item(),
                "iou_prompt": condition_fidelity(perfect, target).mean().item(),
                "class_accuracy_none": acc(none), "class_accuracy_prompt": acc(perfect)}  # fmt: skip

    with torch.no_grad():  # step 0: the loss and fidelity of the untrained ControlNet on the base
        at_start = val_fn(cn.eval())
        step0 = {"step": 0, "val": at_start.pop("iou_none")}
        g = torch.Generator().manual_seed(seed)
        batch = tuple(d[torch.randint(len(data[0]), (256,), generator=g)] for d in data)
        step0["loss"] = controlnet_loss(base, cn, batch, torch.Generator().manual_seed(seed), p_uncond).item()
        step0["base_loss"] = controlnet_loss(base, None, batch, torch.Generator().manual_seed(seed), p_uncond).item()
        step0.update(at_start)
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                      select="iou_none", higher_is_better=True, progress=progress, checkpoint_dir=checkpoint_dir)  # fmt: skip
    result = fit(cn, lambda m, b, g: controlnet_loss(base, m, b, g, p_uncond), data, cfg, val_fn=val_fn)
    result.history.insert(0, step0)
    return cn.eval(), result


def transition(steps: list[int], values: list[float], tail: int = 5) -> dict[str, float]:
    """Where a learning curve rises (C11): from its first value to the mean of its last `tail` values, the first
    steps at which it crosses 10%, 50% and 90% of the way, and the 10-90% width.

    A "sudden convergence" is a rise whose width is small against the step where it happens."""
    if len(steps) != len(values) or len(values) < tail + 1:
        raise ValueError(f"need matching steps and values, more than {tail}; got {len(steps)} and {len(values)}")
    start, end = values[0], sum(values[-tail:]) / tail
    if end <= start:
        raise ValueError(f"the curve does not rise: first value {start:.4g}, final level {end:.4g}")

    def crossing(frac):
        level = start + frac * (end - start)
        return next(s for s, v in zip(steps, values, strict=True) if v >= level)

    out = {"start": start, "end": end, "step_10": crossing(0.1), "step_50": crossing(0.5), "step_90": crossing(0.9)}
    out["width_10_90"] = out["step_90"] - out["step_10"]
    return out


def protocol_metrics(cn: ControlNet) -> dict[str, float]:
    """What the zoo records for a shipped ControlNet: `evaluate` on its control at w = 1 (DDIM-20), and the base's
    IoU on the same masks with the perfect prompt (no control)."""
    base = text2image_study.shipped_base()
    out = evaluate(base, cn, control=cn.control)
    out["base_iou_perfect"] = evaluate(base, None, control=cn.control, settings=("perfect",))["iou_perfect"]
    return out


def quick_metrics(cn: ControlNet) -> dict[str, float]:
    """The "none" and "perfect" rows of `protocol_metrics` (the test suite re-measures these)."""
    return evaluate(text2image_study.shipped_base(), cn, control=cn.control, settings=("none", "perfect"))


# --------------------------------------------------------------------------------------------
# The alternative ControlNet avoids (C2): fine-tune the whole base with the mask as a second input channel
# --------------------------------------------------------------------------------------------


class MaskChannelModel(nn.Module):
    """A copy of the base whose U-Net takes the mask as a second input channel (its new input weights start at 0,
    so at initialisation it equals the base); every parameter is trainable."""

    def __init__(self, base: TextToImage):
        super().__init__()
        self.model = copy.deepcopy(base).requires_grad_(True)
        old = self.model.unet.conv_in
        new = nn.Conv2d(2, old.out_channels, old.kernel_size, padding=old.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :1] = old.weight
            new.bias.copy_(old.bias)
        self.model.unet.conv_in = new
        self.alpha_bar = self.model.alpha_bar

    def forward(self, x_t, t, ids, control):
        return self.model(torch.cat([x_t, control], 1), t, ids)


def _mask_channel_loss(model: MaskChannelModel, batch, gen: torch.Generator, p_uncond: float,
                       p_mask_drop: float = 0.0) -> torch.Tensor:  # fmt: skip
    """`controlnet_loss` for the whole-model alternative: the same prompts, noise and time steps, mask as input.
    With `p_mask_drop` > 0 each pair's mask is replaced by the all-zero one with that probability, so that an
    all-zero mask is a trained input ("no control") rather than one never seen ("no ink anywhere")."""
    x0, labels, bits, control = batch
    if not 0.0 <= p_mask_drop < 1.0:
        raise ValueError(f"p_mask_drop must be in [0, 1), got {p_mask_drop}")
    if p_mask_drop > 0:
        keep = (torch.rand(len(control), generator=gen) >= p_mask_drop).to(control.dtype).view(-1, 1, 1, 1)
        control = control * keep.to(control.device)
    ids = tokenize(training_prompts(labels, bits, gen, p_uncond=p_uncond)).to(x0.device)
    x_t, t, eps = noised(x0, model.alpha_bar, gen)
    return ((model(x_t, t, ids, control) - eps) ** 2).mean()


@torch.no_grad()
def fixed_loss(loss_fn, data, seed: int = 0, repeats: int = 4) -> float:
    """The loss on every pair of `data`, `repeats` times, with noise and time steps fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    return sum(loss_fn(data, g).item() for _ in range(repeats)) / repeats


def finetune_with_mask_channel(seed: int = 0, n_pairs: int = 200, max_steps: int = 1500, lr: float = 1e-3,
                               eval_every: int = 250, base: TextToImage | None = None, progress: bool | None = None,
                               p_mask_drop: float = 0.0):  # fmt: skip
    """C2: train *every* parameter of a copy of the base (text encoder and U-Net, mask as an extra input channel) on
    `n_pairs` training pairs. Logs the loss on those pairs and on as many held-out pairs (validation split), the
    FD to the test split of prompt-only samples (mask channel all 0: the base's own task; a trained input only
    with `p_mask_drop` > 0), and, under the same control as `evaluate` gives a ControlNet (the 100 evaluation
    masks, their full captions, DDIM-20, w = 1, seed 2), the mask IoU and FD of controlled samples.

    Returns:
        the fine-tuned `MaskChannelModel` and the history (list of dicts).
    """
    base = text2image_study.shipped_base() if base is None else base
    train = training_data("mask", n_pairs, seed)
    xv, yv = datasets.digits("val")
    held = (levels_to_unit(xv[:n_pairs]), yv[:n_pairs], attribute_bits(xv[:n_pairs], yv[:n_pairs]),
            control_mask(xv[:n_pairs]))  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskChannelModel(base)
    clf = metrics.shipped_classifier()
    test_feats = metrics.features(clf, datasets.digits("test", form="unit")[0])
    eval_masks, _, eval_captions = evaluation_set(100)

    def controlled(m):
        imgs = t2i_generate(_ZeroMask(m, eval_masks), eval_captions, 1.0, steps=20, seed=2)
        fd = metrics.frechet_distance(metrics.features(clf, levels_to_unit(unit_to_levels(imgs))), test_feats)
        return {"controlled_iou": condition_fidelity(imgs, eval_masks).mean().item(), "controlled_fd": fd}

    def val_fn(m):
        """The held-out loss selects the checkpoint; the training pairs' loss and the prompt-only FD are logged."""
        loss = lambda d, g: _mask_channel_loss(m, d, g, 0.5)  # noqa: E731
        out = {"train_pairs_loss": fixed_loss(loss, train), "held_out_loss": fixed_loss(loss, held),
               "prompt_only_fd": prompt_only_fd(_ZeroMask(m), 3, clf, test_feats)}  # fmt: skip
        return {**out, **controlled(m)} if p_mask_drop > 0 else out

    model.eval()
    start = {"step": 0, **val_fn(model)}
    cfg = TrainConfig(max_steps=max_steps, batch_size=64, lr=lr, eval_every=eval_every, seed=seed, select="held_out_loss",
                      progress=progress)  # fmt: skip
    result = fit(model, lambda m, b, g: _mask_channel_loss(m, b, g, 0.5, p_mask_drop), train, cfg, val_fn=val_fn)
    keys = ("train_pairs_loss", "held_out_loss", "prompt_only_fd")  # "val" in fit's history is the held-out loss
    keys += ("controlled_iou", "controlled_fd") if p_mask_drop > 0 else ()
    records = [start] + [{"step": r["step"], **{k: r["val"] if k == "held_out_loss" else r[k] for k in keys}}
                         for r in result.history]  # fmt: skip
    return model, records


def prompt_only_fd(model: nn.Module, seed: int = 3, classifier=None, test_feats=None) -> float:
    """C2's measure of what a prompt-only model knows: FD to the test split, in the digit classifier's features, of
    its samples for `evaluation_prompts(per_prompt=3)` (240 prompts, DDIM-20, w = 1, sampling `seed`; the study
    used seed 3). `model` is the base or a fine-tune seen as prompt-only (`_ZeroMask`)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the base or a wrapped fine-tune), got {type(model).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    clf = metrics.shipped_classifier() if classifier is None else classifier
    if test_feats is None:
        test_feats = metrics.features(clf, datasets.digits("test", form="unit")[0])
    prompts, _, _ = evaluation_prompts(per_prompt=3)
    imgs = t2i_generate(model, prompts, 1.0, steps=20, seed=seed)
    return metrics.frechet_distance(metrics.features(clf, levels_to_unit(unit_to_levels(imgs))), test_feats)


class _ZeroMask(nn.Module):
    """A `MaskChannelModel` seen as a prompt-only model (mask channel all 0, or the fixed `masks`), for
    `text2image.generate`."""

    def __init__(self, m: MaskChannelModel, masks: torch.Tensor | None = None):
        super().__init__()
        self.m, self.alpha_bar, self.masks = m, m.alpha_bar, masks

    def forward(self, x_t, t, ids):
        if self.masks is None:
            return self.m(x_t, t, ids, torch.zeros_like(x_t))
        return self.m(x_t, t, ids, self.masks.to(x_t.device).expand(x_t.shape[0], -1, -1, -1))


# --------------------------------------------------------------------------------------------
# Cost of a training step (C12): ControlNet vs fine-tuning the whole base
# --------------------------------------------------------------------------------------------

COST_KINDS = ("controlnet", "finetune")


def training_step(kind: str, base: TextToImage, batch_size: int = 64, seed: int = 0):
    """(trainable module, a function running one forward + backward of its training loss) for `kind`:
    "controlnet" (locked base + ControlNet) or "finetune" (every weight of the base, mask as an input channel)."""
    if kind not in COST_KINDS:
        raise ValueError(f"kind must be one of {COST_KINDS}, got {kind!r}")
    data = training_data("mask", batch_size, seed)
    if kind == "controlnet":
        module = ControlNet.from_unet(base.unet)
        loss = lambda g: controlnet_loss(base, module, data, g)  # noqa: E731
    else:
        module = MaskChannelModel(base)
        loss = lambda g: _mask_channel_loss(module, data, g, 0.5)  # noqa: E731

    def step():
        module.zero_grad(set_to_none=True)
        loss(torch.Generator().manual_seed(seed)).backward()

    return module, step


def training_memory(kind: str, base: TextToImage, batch_size: int = 64) -> dict[str, int]:
    """Bytes a training step needs beyond the weights themselves: gradients and AdamW's two moments of every
    trainable parameter, and the activations autograd saves for the backward pass (counted with
    `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded). A count, not a
    measurement of the allocator, so it is exact and the same on every machine."""
    module, step = training_step(kind, base, batch_size)
    params = {p.untyped_storage().data_ptr() for p in [*module.parameters(), *base.parameters()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    out = {"trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
           "grad_and_adam_bytes": 3 * trainable, "saved_activation_bytes": sum(seen.values())}  # fmt: skip
    out["total_bytes"] = out["grad_and_adam_bytes"] + out["saved_activation_bytes"]
    return out


# --------------------------------------------------------------------------------------------
# The chapter's study: ablations and robustness, run once by a recipe and shipped as JSON
# --------------------------------------------------------------------------------------------

STUDY_PATH = shipped.WEIGHTS_DIR / "controlnet_study.json"  # shipped with the weights
STUDY_STEPS = 600
STUDY_JOBS = {
    **{f"{v}_{i}_seed{s}": {"variant": v, "init": i, "seed": s}
       for v, i in (("full", "zero"), ("full", "gaussian"), ("lite", "zero")) for s in (0, 1, 2)},
    "p_uncond0_seed0": {"p_uncond": 0.0},
    "n50_seed0": {"n_train": 50},
    "n500_seed0": {"n_train": 500},
    "finetune_mask_channel": {},
    **{f"finetune_mask_drop_seed{s}": {"p_mask_drop": 0.5, "seed": s} for s in (0, 1, 2)},
    **{f"cfg_placement_seed{s}": {"seed": s} for s in (0, 1, 2)},
    **{f"coarse_{i}_seed{s}": {"variant": "full", "init": i, "seed": s, "control": "coarse"}
       for i in ("zero", "gaussian") for s in (0, 1, 2)},
}  # fmt: skip
"""Every run of chapter 08's study (600 steps each, evaluation every 50): the init and variant ablations over three
seeds (C17, C18), prompt dropout 0 vs the default 0.5 (C10), 50 and 500 training pairs (C20), and the whole-model
fine-tune with the mask as an input channel (C2), the same with mask dropout 0.5 over three seeds (so that "no
mask" is an input it was trained on), the CFG placements over three sampling seeds (`cfg_placement`), and zero vs
Gaussian initialisation on the coarse layout control over three seeds (a control the ControlNet must interpret)."""


def run_study_job(name: str, base: TextToImage | None = None, steps: int = STUDY_STEPS) -> dict:
    """One run of the study: its learning curve and its final `evaluate` table (or, for the fine-tune, its curve)."""
    if name not in STUDY_JOBS:
        raise ValueError(f"no study job {name!r}; known: {sorted(STUDY_JOBS)}")
    base = text2image_study.shipped_base() if base is None else base
    start = time.perf_counter()
    if name.startswith("finetune_mask"):
        kwargs = STUDY_JOBS[name]
        _, history = finetune_with_mask_channel(max_steps=steps * 2, eval_every=steps // 3, base=base, **kwargs)
        return {"config": kwargs, "history": history, "seconds": round(time.perf_counter() - start, 1)}
    if name.startswith("cfg_placement"):
        rows = cfg_placement(base, shipped.load(ControlNet(control="mask"), "controlnet"), seed=STUDY_JOBS[name]["seed"])
        return {"config": STUDY_JOBS[name], "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    kwargs = {"seed": 0, **STUDY_JOBS[name]}
    cn, result = train_controlnet(max_steps=steps, eval_every=50, base=base, **kwargs)
    return {"config": kwargs, "history": result.history, "final": evaluate(base, cn, control=kwargs.get("control", "mask")),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


CFG_OPTIONS = ("(a) both", "(b) cond", "(b) cond, x0.5", "(b) cond, x2", "(c) cond, paper 8/h", "(c) cond, code 0.825^k")
CFG_SCALES = (3.0, 6.0)


def saturation(images: torch.Tensor) -> float:
    """Fraction of raw (unclamped) pixels beyond [-1, 1]."""
    return (images.abs() > 1).double().mean().item()


def cfg_placement(base: TextToImage, cn: ControlNet, seed: int = 0, n: int = 64) -> list[dict]:
    """C14-C15 for one sampling seed: mask IoU and saturated-pixel fraction (`saturation`) of `n` samples with no
    prompt and with the perfect prompt, for w = 1 and each placement of `CFG_OPTIONS` at each w of `CFG_SCALES`.
    The uniform scales 0.5 and 2 separate "how much control" from "which blocks get it"."""
    masks, _, captions = evaluation_set(n)
    weights = {"(a) both": ("both", 1.0), "(b) cond": ("cond", 1.0), "(b) cond, x0.5": ("cond", 0.5),
               "(b) cond, x2": ("cond", 2.0), "(c) cond, paper 8/h": ("cond", toy_block_weights(cn, "paper")),
               "(c) cond, code 0.825^k": ("cond", toy_block_weights(cn, "code"))}  # fmt: skip
    rows = []
    for w, name in [(1.0, "(a) both")] + [(w, k) for w in CFG_SCALES for k in CFG_OPTIONS]:
        placement, scale = weights[name]
        row = {"guidance_scale": w, "placement": name}
        for setting, prompts in (("none", [""] * n), ("perfect", captions)):
            imgs = generate(base, cn, masks, prompts, w, seed=4 + seed, placement=placement, scale=scale, clamp=False)
            row[f"iou_{setting}"] = condition_fidelity(imgs.clamp(-1, 1), masks).mean().item()
            row[f"saturation_{setting}"] = saturation(imgs)
        rows.append(row)
    return rows


def load_study(path=None) -> dict:
    """The shipped study results ({job: result}); `python -m dlearn.studies.controlnet study` recreates them."""
    return results.load_study(STUDY_PATH if path is None else path, "python -m dlearn.studies.controlnet study")


def main(argv: list[str] | None = None) -> None:
    results.study_cli(argv, "python -m dlearn.studies.controlnet", "chapter 08's study", STUDY_JOBS, run_study_job, STUDY_PATH)


if __name__ == "__main__":
    main()
