"""Chapter 10: DDIM inversion and null-text inversion (Mokady et al. 2023).

To edit a real image with a text-to-image model we first need noise (and conditions) that regenerate it: an
*inversion*. DDIM inversion runs the deterministic sampler backwards, reusing eps at the wrong end of each step;
without guidance (w = 1) its error shrinks with the step size, with classifier-free guidance (w > 1) it does not.
Null-text inversion keeps the w = 1 inversion's trajectory as *pivots* and, step by step from T down, optimises only
the unconditional ("null") embedding so that one guided step from the current point lands on the next pivot. The
model and the conditional embedding never change, so editing the prompt afterwards still works. Negative-prompt
inversion (Miyake et al. 2023, `negative_prompt_edit`) skips the optimisation: the source prompt's embedding is the
null at every step, which makes the guided reconstruction the w = 1 one exactly.

Two worlds share the code (a `World` gives the two noise predictions and the null embedding to start from):

- `MixtureWorld` (TB7): the exact 2-D mixture; the condition is a component, the "null embedding" the logits of the
  unconditional mixture weights;
- `TextWorld`: the tiny text-to-image model of chapter 07; the null embedding is the text encoder's output for "".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from dlearn import checks, ddim, distributions, guidance
from dlearn.checks import finite_number, finite_tensor, number_in, string_list, values_in
from dlearn.schedules import inference_timesteps
from dlearn.text2image import tokenize

# kept here for chapters 10-11: N8 (nothing but the null changes) and N13 (a lossy "encoder")
weights_fingerprint = checks.weights_fingerprint
quantise, expected_quantisation_mse = distributions.quantise, distributions.expected_quantisation_mse

# --------------------------------------------------------------------------------------------
# N1: the reconstruction metric; N2: the DDIM step in the paper's notation
# --------------------------------------------------------------------------------------------


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per example, shape (B,)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    return ((a.double() - b.double()) ** 2).reshape(len(a), -1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per example in dB, 10 log10(range^2 / MSE) (images in [-1, 1]: range 2)."""
    return 10 * torch.log10(data_range**2 / mse(a, b).clamp(min=1e-20))


def ddim_step_paper(z_t: torch.Tensor, eps: torch.Tensor, a_t, a_prev) -> torch.Tensor:
    """The null-text paper's DDIM step (alpha = the cumulative alpha-bar):
    z_{t-1} = sqrt(a_prev / a_t) z_t + sqrt(a_prev) (sqrt(1 / a_prev - 1) - sqrt(1 / a_t - 1)) eps."""
    a_t, a_prev = torch.as_tensor(a_t, dtype=z_t.dtype), torch.as_tensor(a_prev, dtype=z_t.dtype)
    return (a_prev / a_t).sqrt() * z_t + a_prev.sqrt() * ((1 / a_prev - 1).sqrt() - (1 / a_t - 1).sqrt()) * eps


# --------------------------------------------------------------------------------------------
# The two worlds
# --------------------------------------------------------------------------------------------


class MixtureWorld:
    """TB7: points of the 2-D mixture conditioned on component `labels`; every embedding is a (B, K) logit vector of
    mixture weights: the condition starts one-hot (the class-conditional model), the null at the unconditional
    weights' logits."""

    def __init__(self, mix, labels: torch.Tensor, alpha_bar: torch.Tensor):
        self.mix, self.labels, self.alpha_bar = mix, labels.long(), alpha_bar.double()
        self.num_train = len(alpha_bar)

    def null_init(self, n: int) -> torch.Tensor:
        return self.mix.weights.log().expand(n, -1).clone()

    def cond_init(self, n: int) -> torch.Tensor:
        big = torch.full((n, self.mix.num_components), -30.0, dtype=torch.float64)
        return big.scatter(1, self.labels[:n, None], 0.0)  # one-hot: the class-conditional model

    def eps(self, x: torch.Tensor, t: int, embedding: torch.Tensor) -> torch.Tensor:
        return self.mix.eps_star(x, self.alpha_bar[t], logits=embedding)


class TextWorld:
    """The tiny text-to-image model with one prompt per image; embeddings are text-encoder outputs (B, L, dim)."""

    def __init__(self, model, prompts: list[str]):
        self.model, self.prompts = model.eval().requires_grad_(False), list(prompts)
        self.alpha_bar = model.alpha_bar
        self.num_train = len(model.alpha_bar)
        with torch.no_grad():
            self._cond = model.text(tokenize(self.prompts).to(self.alpha_bar.device))
            self._null = model.text(tokenize([""]).to(self.alpha_bar.device))

    def null_init(self, n: int) -> torch.Tensor:
        return self._null.expand(n, -1, -1).clone()

    def cond_init(self, n: int) -> torch.Tensor:
        return self._cond[:n].clone()

    def with_prompts(self, prompts: list[str]) -> TextWorld:
        """The same model with other prompts (an edit)."""
        return TextWorld(self.model, prompts)

    def eps(self, x: torch.Tensor, t: int, embedding: torch.Tensor) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return self.model.unet(x, tt, encoder_hidden_states=embedding).sample


def guided_eps(world, x, t, cond, null, w: float) -> torch.Tensor:
    """eps_uc + w (eps_c - eps_uc), the unconditional branch with embedding `null` (N5: its weight is 1 - w)."""
    e_c = world.eps(x, t, cond)
    if w == 1.0:
        return e_c
    return guidance.cfg(world.eps(x, t, null), e_c, w)


# --------------------------------------------------------------------------------------------
# DDIM inversion and reconstruction (N3, N4)
# --------------------------------------------------------------------------------------------


@dataclass
class Inversion:
    """The result of DDIM inversion: `pivots[k]` is the point at level k (pivots[0] = the image, pivots[-1] = z_T);
    `timesteps` the sampler's (descending) timesteps it was made for."""

    pivots: list[torch.Tensor]
    timesteps: list[int]
    guidance_scale: float
    nulls: list[torch.Tensor] | None = None  # per-step null embeddings (null-text optimisation), or None
    stats: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def check_timesteps(expected: list[int], got) -> None:
    """A clear error when a sampler's timesteps and an inversion's do not line up."""
    got = [int(t) for t in got]
    if got != list(expected):
        raise ValueError(
            f"the sampler's timesteps do not match the inversion's: inverted with {len(expected)} steps "
            f"{list(expected)[:3]}...{list(expected)[-2:]}, sampling with {len(got)} steps {got[:3]}...{got[-2:]}; "
            "use the same number of steps and the same spacing"
        )


def sampler_timesteps(world, steps: int) -> list[int]:
    """The descending timesteps of a DDIM sampler with `steps` steps: the world's own (`world.timesteps(steps)`, e.g.
    a pipeline scheduler's, with its offset), else diffusers' default "leading" spacing."""
    if hasattr(world, "timesteps"):
        return [int(t) for t in world.timesteps(steps)]
    return inference_timesteps(world.num_train, steps).tolist()


def _final(world) -> float:
    """alpha-bar below the first timestep: 1 by default; Stable Diffusion's schedulers (set_alpha_to_one=False)
    use alpha_bar[0] (`world.final_alpha_bar`)."""
    return float(getattr(world, "final_alpha_bar", 1.0))


@torch.no_grad()
def ddim_invert(world, x0: torch.Tensor, steps: int = 50, guidance_scale: float = 1.0, cond=None, null=None) -> Inversion:
    """DDIM inversion: from the image up to z_T, one step per timestep, reusing eps(z at the lower level, t) for the
    step to level t (as diffusers' DDIMInverseScheduler and the null-text reference code do)."""
    finite_tensor("x0", x0)
    finite_number("guidance_scale", guidance_scale)
    n = x0.shape[0]
    cond = world.cond_init(n) if cond is None else cond
    null = world.null_init(n) if null is None else null
    ts = sampler_timesteps(world, steps)
    z, pivots = x0, [x0]
    for t in reversed(ts):
        eps = guided_eps(world, z, t, cond, null, guidance_scale)
        z, _ = ddim.ddim_inverse_step(world.alpha_bar, t, world.num_train, steps, z, eps, initial_alpha_bar=_final(world))
        pivots.append(z)
    return Inversion(pivots, ts, guidance_scale)


def _check_fits(world, inv: Inversion) -> None:
    """A clear error for an inversion made on a longer schedule than the world's (its steps would index past it)."""
    top = max(inv.timesteps)
    if inv.steps > world.num_train or top >= world.num_train:
        raise ValueError(f"the inversion ({inv.steps} steps, timesteps up to {top}) does not fit this world's "
                         f"{world.num_train} training steps: invert again in this world")  # fmt: skip


def denoise_step(world, z: torch.Tensor, t: int, prev: int, eps: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step from level t to level prev (prev < 0: the image): chapter 05's `ddim.ddim_step`
    with the world's alpha-bar below the first step."""
    return ddim.ddim_step(world.alpha_bar, t, prev, z, eps, final_alpha_bar=_final(world))[0]


@torch.no_grad()
def reconstruct(world, inv: Inversion, guidance_scale: float, cond=None, nulls=None, z_T=None, timesteps=None,
                return_trajectory: bool = False):  # fmt: skip
    """Sample back from z_T (the inversion's, or `z_T`) with guidance, using `nulls` (one per step, or one for all;
    default: the inversion's optimised ones if any, else the plain null embedding) and `cond` (an edit: other
    conditions). `timesteps`, if given, must match the inversion's (`check_timesteps`)."""
    if timesteps is not None:
        check_timesteps(inv.timesteps, timesteps)
    _check_fits(world, inv)
    z = inv.pivots[-1] if z_T is None else z_T
    n = z.shape[0]
    cond = world.cond_init(n) if cond is None else cond
    nulls = inv.nulls if nulls is None else nulls
    if nulls is None:
        nulls = world.null_init(n)
    per_step = isinstance(nulls, (list, tuple))
    if per_step and len(nulls) != inv.steps:
        raise ValueError(f"expected one null embedding per step ({inv.steps}), got {len(nulls)}")
    want = tuple(world.null_init(n).shape)  # one embedding per image: a batch that broadcasts is a mistake
    for what, e in [("the condition", cond)] + ([(f"the null embedding of step {i}", e) for i, e in enumerate(nulls)]
                                                  if per_step else [("the null embedding", nulls)]):  # fmt: skip
        if tuple(e.shape) != want:
            raise ValueError(f"{what} should have shape {want} (one per image, {n} images), got {tuple(e.shape)}")
    r = world.num_train // inv.steps
    path = [z]
    for i, t in enumerate(inv.timesteps):
        null = nulls[i] if per_step else nulls
        z = denoise_step(world, z, t, t - r, guided_eps(world, z, t, cond, null, guidance_scale))
        path.append(z)
    return (z, path) if return_trajectory else z


# --------------------------------------------------------------------------------------------
# Null-text optimisation (N6, N7, N9) and its ablations (N10)
# --------------------------------------------------------------------------------------------


def reference_lr(i: int, base_lr: float = 1e-2) -> float:
    """The reference code's learning rate for outer step i (of 50): 1e-2 (1 - i / 100), a fresh Adam each step."""
    return base_lr * (1.0 - i / 100.0)


def early_stop_threshold(i: int, epsilon: float = 1e-5) -> float:
    """The reference code stops the inner loop of step i once the loss is below epsilon + 2e-5 i."""
    return epsilon + i * 2e-5


def _restricted(null0: torch.Tensor, u: torch.Tensor, bound: float | None) -> torch.Tensor:
    if bound is None:
        return null0 + u
    if bound <= 0:
        raise ValueError(f"bound must be positive, got {bound}")
    return null0 + bound * torch.tanh(u / bound)


def null_text_optimisation(world, inv: Inversion, guidance_scale: float = 7.5, inner_steps: int = 10,
                           epsilon: float = 1e-5, base_lr: float = 1e-2, start: str = "pivot",
                           penalty: float = 0.0, bound: float | None = None,
                           generator: torch.Generator | None = None) -> Inversion:  # fmt: skip
    """Pivotal null-text inversion (the reference algorithm, batched over images).

    For i = 0 .. N-1 (t from T down): warm-start null_i from null_{i-1}; up to `inner_steps` Adam steps at
    `reference_lr(i)` on ||z*_{t-1} - step(z_bar_t, null_i)||^2 (mean over the batch's pixels), stopping early below
    `early_stop_threshold(i, epsilon)`; then advance z_bar with the optimised null_i.

    Args:
        inv: a w = 1 DDIM inversion (its pivots).
        start: "pivot" (z_bar_T = the inversion's z_T) or "random" (a random z_T: the random-pivot ablation).
        penalty: weight of ||null - null_init||^2 (restricts the null family, N10).
        bound: if given, the null stays within `bound` of its initial value in every coordinate
            (null = null_init + bound tanh(u / bound), u optimised): another restriction (N10).

    Returns:
        a copy of `inv` with `nulls` (one per step) and `stats` (optimiser calls, seconds, per-step losses, and the
        z_T it started from: reconstruct from `stats["z_start"]`).
    """
    if start not in ("pivot", "random"):
        raise ValueError(f"start must be 'pivot' or 'random', got {start!r}")
    finite_number("guidance_scale", guidance_scale)
    number_in("penalty", penalty, 0.0)
    _check_fits(world, inv)
    t0 = time.perf_counter()
    z = inv.pivots[-1]
    if start == "random":
        z = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
    z_start, n = z, z.shape[0]
    cond = world.cond_init(n)
    null0 = world.null_init(n)
    u = torch.zeros_like(null0)  # null = _restricted(null0, u, bound)
    r = world.num_train // inv.steps
    nulls, losses, calls = [], [], 0
    for i, t in enumerate(inv.timesteps):
        target = inv.pivots[inv.steps - i - 1]
        u = u.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=reference_lr(i, base_lr))
        with torch.no_grad():
            e_c = world.eps(z, t, cond)
        loss_value = float("nan")
        for k in range(inner_steps):
            null = _restricted(null0, u, bound)
            e_u = world.eps(z, t, null)
            z_prev = denoise_step(world, z, t, t - r, guidance.cfg(e_u, e_c, guidance_scale))
            loss = ((z_prev - target) ** 2).mean()
            if penalty > 0:
                loss = loss + penalty * ((null - null0) ** 2).mean()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise ValueError(f"null-text optimisation at step {i} (t = {t}), inner iteration {k}: the loss is "
                                 f"{loss_value}; check the inversion's pivots (finite?) and guidance_scale")  # fmt: skip
            opt.zero_grad()
            loss.backward()
            opt.step()
            calls += 1
            if loss_value < early_stop_threshold(i, epsilon):
                break
        losses.append(loss_value)
        null = _restricted(null0, u, bound).detach()
        if not bool(torch.isfinite(null).all()):
            raise ValueError(f"null-text optimisation at step {i} (t = {t}): the optimised null embedding is not finite")
        nulls.append(null.clone())
        with torch.no_grad():
            z = denoise_step(world, z, t, t - r, guided_eps(world, z, t, cond, null, guidance_scale))
    stats = {"optimiser_calls": calls, "seconds": time.perf_counter() - t0, "losses": losses, "z_start": z_start}
    return Inversion(inv.pivots, inv.timesteps, guidance_scale, nulls, stats)


def global_embedding_optimisation(world, inv: Inversion, guidance_scale: float = 7.5, iterations: int = 500,
                                  lr: float = 1e-2, which: str = "null", penalty: float = 0.0,
                                  bound: float | None = None) -> torch.Tensor:  # fmt: skip
    """The N10 ablations with one embedding for every step: minimise sum_t ||z*_{t-1} - step(z*_t, embedding)||^2 over
    the pivots by `iterations` Adam steps, each a pass through all the sampler steps. Budgets: iterations = inner_steps
    x steps (the default 500 = 10 x 50) matches the per-step method's Adam steps at `steps` times its network passes;
    iterations = inner_steps matches its network passes (and gives `steps` times fewer Adam steps).
    `which="null"` optimises a single global null embedding, `which="cond"` the conditional embedding instead.

    Returns:
        the optimised embedding (null, or cond).
    """
    if which not in ("null", "cond"):
        raise ValueError(f"which must be 'null' or 'cond', got {which!r}")
    n = inv.pivots[0].shape[0]
    cond0, null0 = world.cond_init(n), world.null_init(n)
    init = (null0 if which == "null" else cond0).clone()
    u = torch.zeros_like(init).requires_grad_(True)
    opt = torch.optim.Adam([u], lr=lr)
    r = world.num_train // inv.steps
    for _ in range(iterations):
        loss = 0.0
        var = _restricted(init, u, bound)
        for i, t in enumerate(inv.timesteps):
            z, target = inv.pivots[inv.steps - i], inv.pivots[inv.steps - i - 1]
            cond, null = (cond0, var) if which == "null" else (var, null0)
            z_prev = denoise_step(world, z, t, t - r, guided_eps(world, z, t, cond, null, guidance_scale))
            loss = loss + ((z_prev - target) ** 2).mean() / inv.steps  # the mean per-step loss, as per-step optimises
        if penalty > 0:
            loss = loss + penalty * ((var - init) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return _restricted(init, u, bound).detach()


# --------------------------------------------------------------------------------------------
# Real digits with the text-to-image model: invert, then edit the prompt
# --------------------------------------------------------------------------------------------

# The text-to-image model's most prompt-faithful evaluated scale: chapter 07 measured attribute accuracy rising with w
# over its scales 1, 2, 4 (the zoo record's `attribute_accuracy_w*`, printed in chapter 10), and an edit is only as
# good as the model's obedience to the edited word. It plays the role of SD's 7.5.
GUIDED_SCALE = 4.0


def invert_images(model, images: torch.Tensor, prompts: list[str], steps: int = 50, guidance_scale: float = GUIDED_SCALE,
                  **options) -> tuple[TextWorld, Inversion]:  # fmt: skip
    """Null-text inversion of images in [-1, 1] (B, 1, 8, 8) with their captions: a w = 1 DDIM inversion for the
    pivots, then `null_text_optimisation` at `guidance_scale` (reference defaults; `options` passed on)."""
    if images.ndim != 4 or images.shape[1:] != (1, 8, 8):
        raise ValueError(f"expected images (B, 1, 8, 8) in [-1, 1], got {tuple(images.shape)}")
    values_in("images", images, -1.0, 1.0, hint="grey levels 0..16 go through distributions.levels_to_unit")
    string_list("prompts", prompts)
    if len(prompts) != len(images):
        raise ValueError(f"one prompt per image: got {len(prompts)} prompts for {len(images)} images")
    world = TextWorld(model, prompts)
    return world, null_text_optimisation(world, ddim_invert(world, images, steps), guidance_scale, **options)


def edit(world: TextWorld, inv: Inversion, prompts: list[str]) -> torch.Tensor:
    """Regenerate an inverted batch with other prompts (same z_T, same optimised null embeddings), clamped to [-1, 1]."""
    string_list("prompts", prompts)
    if len(prompts) != inv.pivots[0].shape[0]:
        raise ValueError(f"one prompt per inverted image: got {len(prompts)} for {inv.pivots[0].shape[0]}")
    edited = world.with_prompts(prompts)
    return reconstruct(edited, inv, inv.guidance_scale, cond=edited.cond_init(len(prompts))).clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# Negative-prompt inversion (Miyake et al. 2023), and the small statistics chapter 10 ranks with
# --------------------------------------------------------------------------------------------


def negative_prompt_edit(world, inv: Inversion, guidance_scale: float, prompts: list[str] | None = None) -> torch.Tensor:
    """Negative-prompt inversion (Miyake et al. 2023): sample back from the w = 1 inversion's z_T with the *source*
    prompt's embedding as the negative (null) embedding at every step and `prompts` (default: the source prompts)
    as the positive one. With the source prompt on both sides CFG is eps_c, the w = 1 sampler: the reconstruction is
    the w = 1 DDIM reconstruction exactly, with no optimisation. Not clamped (compare `edit`)."""
    finite_number("guidance_scale", guidance_scale)
    n = inv.pivots[0].shape[0]
    source = world.cond_init(n)
    if prompts is None:
        return reconstruct(world, inv, guidance_scale, cond=source, nulls=source)
    string_list("prompts", prompts)
    if len(prompts) != n:
        raise ValueError(f"one prompt per inverted image: got {len(prompts)} for {n}")
    target = world.with_prompts(prompts)
    return reconstruct(target, inv, guidance_scale, cond=target.cond_init(n), nulls=source)


def subset(inv: Inversion, index) -> Inversion:
    """The inversion of some images of a batch (an index or slice into the batch): their pivots and, if optimised,
    their nulls; `stats` are the batch's and are dropped."""
    pick = (lambda e: e[index : index + 1]) if isinstance(index, int) else (lambda e: e[index])
    nulls = None if inv.nulls is None else [pick(e) for e in inv.nulls]
    return Inversion([pick(z) for z in inv.pivots], list(inv.timesteps), inv.guidance_scale, nulls)
