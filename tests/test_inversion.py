"""Chapter 10: DDIM inversion and null-text inversion, on the exact mixture (TB7) and on real digits."""

import pytest
import torch

from dlearn import datasets, ddim, schedules, toys
from dlearn import inversion as I


@pytest.fixture(scope="module")
def alpha_bar():
    return schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())


@pytest.fixture(scope="module")
def tb7(alpha_bar):
    mix = toys.mixture_2d()
    x0 = mix.component(0).sample(100, torch.Generator().manual_seed(0))[0]
    return mix, x0, I.MixtureWorld(mix, torch.zeros(100, dtype=torch.long), alpha_bar)


def _err(a, b):
    return (a - b).norm(dim=1).mean().item()


def test_check_N1_reconstruction_metrics():
    a = torch.zeros(2, 1, 8, 8)
    b = a.clone()
    b[1] += 0.5
    torch.testing.assert_close(I.mse(a, b), torch.tensor([0.0, 0.25], dtype=torch.float64))
    assert I.psnr(a[1:], b[1:]).item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.25)).item())
    with pytest.raises(ValueError, match="shapes differ"):
        I.mse(a, b[:1])


def test_check_N2_paper_form_of_the_ddim_step(alpha_bar, gen):
    z, eps = torch.randn(2, 50, 64, generator=gen, dtype=torch.float64)
    for t, prev in ((999, 979), (500, 480), (20, 0)):
        a_t, a_p = alpha_bar[t], alpha_bar[prev]
        x0_form, _ = ddim.ddim_step(alpha_bar, t, prev, z, eps)
        torch.testing.assert_close(I.ddim_step_paper(z, eps, a_t, a_p), x0_form, rtol=1e-12, atol=1e-12)
        without = (a_p / a_t).sqrt() * z + ((1 / a_p - 1).sqrt() - (1 / a_t - 1).sqrt()) * eps  # the missing factor
        if t >= 500:  # (near t = 0, sqrt(alpha_bar_prev) ~ 1 and the slip is invisible)
            assert (without - x0_form).abs().max() > 1e-3


def test_check_N3_unguided_inversion_error_falls_like_one_over_steps(tb7):
    _, x0, world = tb7
    errs = [_err(I.reconstruct(world, I.ddim_invert(world, x0, n), 1.0), x0) for n in (10, 50, 200, 1000)]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    for (n1, e1), (n2, e2) in zip(
        zip((10, 50, 200), errs, strict=False), zip((50, 200, 1000), errs[1:], strict=True), strict=True
    ):
        assert 0.5 < (e1 / e2) / (n2 / n1) < 1.5  # error ratio ~ step ratio


def test_check_N4_guidance_leaves_a_bias_more_steps_do_not_remove(tb7):
    _, x0, world = tb7
    errs = [_err(I.reconstruct(world, I.ddim_invert(world, x0, n), 7.5), x0) for n in (10, 50, 200, 1000)]
    assert min(errs) > 1.0 and max(errs) / min(errs) < 1.1


def test_check_N5_sensitivity_to_the_null_is_one_minus_w(tb7, alpha_bar):
    _, x0, world = tb7
    cond, null = world.cond_init(100), world.null_init(100)
    d = torch.zeros_like(null)
    d[:, 1] = 1e-4
    sens = {}
    for w in (7.5, 3.0, 1.0):
        step = lambda nl, w=w: I.denoise_step(world, x0, 500, 480, I.guided_eps(world, x0, 500, cond, nl, w))  # noqa: E731
        sens[w] = (step(null + d) - step(null - d)).abs().mean().item()
    assert sens[1.0] == 0.0
    assert sens[7.5] / sens[3.0] == pytest.approx(6.5 / 2.0, rel=1e-5)


def test_check_N6_N7_pivotal_null_text_restores_the_unguided_level(tb7):
    _, x0, world = tb7
    inv = I.ddim_invert(world, x0, 50)
    w1 = _err(I.reconstruct(world, inv, 1.0), x0)
    plain = _err(I.reconstruct(world, inv, 7.5), x0)
    nt = I.null_text_optimisation(world, inv, 7.5, base_lr=0.1)
    fixed = _err(I.reconstruct(world, nt, 7.5), x0)
    assert plain > 5 * w1 and fixed < 1.2 * w1
    rnd = I.null_text_optimisation(world, inv, 7.5, base_lr=0.1, start="random", generator=torch.Generator().manual_seed(1))
    assert _err(I.reconstruct(world, rnd, 7.5, z_T=rnd.stats["z_start"]), x0) > 3 * fixed  # N6: the pivot matters


def test_check_N8_N11_only_the_null_changes_and_the_edit_works(tb7):
    """N8; and N11's stand-in for Prompt-to-Prompt on the toy: a condition swap after inversion."""
    mix, x0, world = tb7
    cond = world.cond_init(100)
    before = I.weights_fingerprint(cond, mix.means, mix.covs, mix.weights)
    inv = I.ddim_invert(world, x0, 50)
    nt = I.null_text_optimisation(world, inv, 7.5, base_lr=0.1)
    assert I.weights_fingerprint(world.cond_init(100), mix.means, mix.covs, mix.weights) == before
    other = I.MixtureWorld(mix, torch.ones(100, dtype=torch.long), world.alpha_bar)  # the edit: class 0 -> 1
    edited = I.reconstruct(other, nt, 7.5, cond=other.cond_init(100))
    assert mix.class_posterior(edited)[:, 1].mean() >= 0.9


def test_check_N9_reference_schedule_and_early_stopping(tb7):
    assert I.reference_lr(0) == 1e-2 and I.reference_lr(49) == pytest.approx(1e-2 * 0.51)
    assert I.early_stop_threshold(0) == 1e-5 and I.early_stop_threshold(10) == pytest.approx(1e-5 + 2e-4)
    _, x0, world = tb7
    nt = I.null_text_optimisation(world, I.ddim_invert(world, x0, 50), 7.5)
    assert nt.stats["optimiser_calls"] <= 10 * 50 and len(nt.nulls) == 50
    loose = I.null_text_optimisation(world, I.ddim_invert(world, x0, 50), 7.5, epsilon=1e6)  # stops at once
    assert loose.stats["optimiser_calls"] == 50


def test_check_N10_global_null_degenerates_unless_restricted(tb7):
    _, x0, world = tb7
    inv = I.ddim_invert(world, x0, 20)  # per-step: at most 10 x 20 Adam steps; the global null gets as many
    w1 = _err(I.reconstruct(world, inv, 1.0), x0)
    free = I.global_embedding_optimisation(world, inv, 7.5, iterations=200, lr=0.1)
    assert torch.softmax(free, 1)[:, 0].mean() > 0.95  # the null learned the condition: eps_uc -> eps_c
    assert _err(I.reconstruct(world, inv, 7.5, nulls=free), x0) < 1.5 * w1  # ... and so reaches the w = 1 level
    per_step = I.null_text_optimisation(world, inv, 7.5, base_lr=0.1, bound=2.0)
    restricted = I.global_embedding_optimisation(world, inv, 7.5, iterations=200, lr=0.1, bound=2.0)
    assert _err(I.reconstruct(world, per_step, 7.5), x0) < _err(I.reconstruct(world, inv, 7.5, nulls=restricted), x0)
    with pytest.raises(ValueError, match="bound"):
        I.null_text_optimisation(world, inv, 7.5, bound=-1.0)


def test_check_N13_reconstruction_sits_at_the_encoders_error(tb7):
    """The inversion sees only the encoded points q: by the triangle inequality its RMS error against the originals
    is the encoder's to within its own miss of q, |RMS(rec - x0) - RMS(q - x0)| <= RMS(rec - q); the live claim is
    that this miss is small (under a quarter of the encoder's error), so the error sits at the encoder's level
    (it may land a little below it, as chapter 10 prints)."""
    _, x0, world = tb7
    q = I.quantise(x0, 0.5)
    assert ((q - x0) ** 2).mean().item() == pytest.approx(I.expected_quantisation_mse(0.5), rel=0.3)
    rec = I.reconstruct(world, I.ddim_invert(world, q, 200), 1.0)
    rms = lambda a, b: ((a - b) ** 2).mean().sqrt().item()  # noqa: E731
    enc, miss, total = rms(q, x0), rms(rec, q), rms(rec, x0)
    assert abs(total - enc) <= miss + 1e-12  # the triangle inequality (an identity)
    assert miss < 0.25 * enc  # the inversion reproduces what the encoder kept
    assert 0.75 * enc < total < 1.25 * enc
    with pytest.raises(ValueError, match="step"):
        I.quantise(x0, 0.0)


def test_timesteps_must_line_up(tb7):
    _, x0, world = tb7
    inv = I.ddim_invert(world, x0[:4], 50)
    I.reconstruct(world, inv, 1.0, timesteps=schedules.inference_timesteps(1000, 50))
    with pytest.raises(ValueError, match="do not match the inversion's: inverted with 50 steps"):
        I.reconstruct(world, inv, 1.0, timesteps=schedules.inference_timesteps(1000, 25))
    with pytest.raises(ValueError, match="do not match"):
        I.reconstruct(world, inv, 1.0, timesteps=schedules.inference_timesteps(1000, 50, "trailing"))
    with pytest.raises(ValueError, match="one null embedding per step"):
        I.reconstruct(world, inv, 7.5, nulls=[world.null_init(4)] * 3)


def test_text_world_inversion_and_edit():
    """On real digits: null-text inversion brings the guided reconstruction back to the unguided level, leaves the
    model and the prompt embedding alone, and an edited prompt changes the class."""
    from dlearn import metrics, zoo
    from dlearn import text2image as t2i
    from dlearn.distributions import levels_to_unit

    model = zoo.load("text2image")
    x, y = datasets.digits("test")
    keep = y == 3
    x0, prompts = levels_to_unit(x[keep][:6]), t2i.caption(x[keep][:6], y[keep][:6])
    before = I.weights_fingerprint(model)
    world, nt = I.invert_images(model, x0, prompts, steps=25)
    w1 = I.mse(I.reconstruct(world, nt, 1.0, nulls=world.null_init(6)), x0).mean()
    plain = I.mse(I.reconstruct(world, nt, I.GUIDED_SCALE, nulls=world.null_init(6)), x0).mean()
    fixed = I.mse(I.reconstruct(world, nt, I.GUIDED_SCALE), x0).mean()
    assert plain > 10 * w1 and fixed < 3 * w1
    assert I.weights_fingerprint(model) == before
    edited = I.edit(world, nt, [p.replace("three", "eight") for p in prompts])
    assert metrics.accuracy(metrics.predict(zoo.load("digits_classifier"), edited), torch.full((6,), 8)) >= 0.5
    with pytest.raises(ValueError, match="one prompt per image"):
        I.invert_images(model, x0, prompts[:2])


def test_record_N12_reported_user_study_shares():
    """N12 is reported, not reproduced (a record: it reads chapter 10's text and recomputes nothing of the model): the
    chapter quotes the paper's user study; its shares must add up."""
    import json
    from pathlib import Path

    nb = json.loads((Path(__file__).parents[1] / "notebooks" / "10_null_text.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    shares = [65.1, 16.6, 14.5, 3.8]
    assert all(f"{v}%" in text for v in shares) and abs(sum(shares) - 100) < 1e-9


def _own_w1_inversion(eps_c, x0, alpha_bar, steps):
    """DDIM inversion at w = 1 written out here: timesteps 0, r, 2r, ... (r = T / steps, diffusers' "leading"),
    each step from the level below (alpha-bar 1 below t = 0) up to t, with the conditional eps at the lower point and
    timestep t (as diffusers' DDIMInverseScheduler and the null-text reference code)."""
    r = len(alpha_bar) // steps
    z, path = x0, [x0]
    for t in range(0, len(alpha_bar), r):
        a_s = alpha_bar[t - r] if t >= r else torch.tensor(1.0, dtype=alpha_bar.dtype)
        e = eps_c(z, t)
        z = alpha_bar[t].sqrt() * (z - (1 - a_s).sqrt() * e) / a_s.sqrt() + (1 - alpha_bar[t]).sqrt() * e
        path.append(z)
    return path


def test_check_N6_the_pivot_is_the_unguided_inversion(tb7, alpha_bar):
    """The pivots of `ddim_invert` (default scale) are the w = 1 DDIM inversion with the conditional model alone,
    here the exact eps of component 0, recomputed by this test's own loop; a guided (w = 7.5) inversion is not."""
    mix, x0, world = tb7
    for steps in (10, 50):
        inv = I.ddim_invert(world, x0, steps)
        own = _own_w1_inversion(lambda z, t: mix.component(0).eps_star(z, alpha_bar[t]), x0, alpha_bar, steps)
        assert inv.timesteps == list(range(1000 - 1000 // steps, -1, -(1000 // steps))) and len(inv.pivots) == steps + 1
        for got, ref in zip(inv.pivots, own, strict=True):
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
        guided = I.ddim_invert(world, x0, steps, guidance_scale=7.5)
        assert (guided.pivots[-1] - own[-1]).norm(dim=1).mean() > 0.5


def test_check_N6_invert_images_pivots_on_the_conditional_inversion(gen):
    """`invert_images` (the text world) keeps the w = 1 inversion as its pivots whatever the edit scale: the model's
    conditional branch alone, called directly by this test's loop, not through the inversion module."""
    from dlearn import text2image as t2i

    torch.manual_seed(0)
    model = t2i.TextToImage(channels=(16, 32)).eval()
    x0 = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    prompts = ["a thick three", "a seven", "a slanted one"]
    ids = t2i.tokenize(prompts)
    with torch.no_grad():
        own = _own_w1_inversion(lambda z, t: model(z, torch.full((3,), t), ids), x0, model.alpha_bar, 4)
        uncond = _own_w1_inversion(lambda z, t: model(z, torch.full((3,), t), t2i.tokenize([""] * 3)), x0, model.alpha_bar, 4)
    assert (own[-1] - uncond[-1]).abs().max() > 0.05  # the branches differ: a pivot from the other one would show
    world, nt = I.invert_images(model, x0, prompts, steps=4, guidance_scale=4.0, inner_steps=1)
    assert nt.guidance_scale == 4.0 and len(nt.nulls) == 4
    for got, ref in zip(nt.pivots, own, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


class _OffsetWorld:
    """A world whose null embedding is a free offset of the noise prediction, eps(x, t, e) = eps_0(x, t) + e, with
    eps_0 the exact eps of component 0 and the condition and the null starting at 0: the guided eps is then
    eps_0 + (1 - w) null, so every pivot is within reach of one step and the optimisation converges (a quadratic loss)."""

    def __init__(self, mix, alpha_bar):
        self.mix, self.alpha_bar, self.num_train = mix, alpha_bar, len(alpha_bar)

    def null_init(self, n):
        return torch.zeros(n, 2, dtype=torch.float64)

    cond_init = null_init

    def eps(self, x, t, embedding):
        return self.mix.component(0).eps_star(x, self.alpha_bar[t]) + embedding


def test_check_N6_null_text_lands_on_each_pivot_step_by_step(tb7, alpha_bar):
    """Mokady et al. 2023, Algorithm 1: each step's null is optimised so that the guided step from the current point
    lands on the pivot's next latent z*_{t-1}. The optimiser stops once the mean squared miss is below
    `early_stop_threshold(i)` (then takes that step), so each landing misses its pivot by an RMS of about
    sqrt(threshold) at most: twice that is allowed, under a quarter of the distance to the neighbouring pivots
    (so landing on the level before or after would fail)."""
    mix, x0, _ = tb7
    world = _OffsetWorld(mix, alpha_bar)
    steps = 5
    inv = I.ddim_invert(world, x0[:40], steps)
    nt = I.null_text_optimisation(world, inv, 7.5, inner_steps=100)
    _, path = I.reconstruct(world, nt, 7.5, return_trajectory=True)
    pivots = inv.pivots  # pivots[k]: level k, the image at 0; step i goes from level steps - i to steps - i - 1

    def rms(a, b):
        return ((a - b) ** 2).mean().sqrt().item()

    for i in range(steps):
        level, tol = steps - i - 1, 2 * I.early_stop_threshold(i) ** 0.5
        target = pivots[level]
        assert rms(path[i + 1], target) < tol, i
        neighbours = [pivots[k] for k in (level + 1, level - 1) if min(k, level) > 0]  # levels 0 and 1 nearly coincide
        assert all(tol < 0.25 * rms(p, target) for p in neighbours), i
    plain = I.reconstruct(world, inv, 7.5)  # the plain null: eps_0, the w = 1 sampler, which misses the pivots
    assert rms(plain, x0[:40]) > 3 * rms(path[-1], x0[:40])


def test_check_N17_negative_prompt_inversion(gen):
    """Negative-prompt inversion (Miyake et al. 2023): with the source prompt as both the positive and the negative
    embedding CFG is eps_c, so the reconstruction is the w = 1 reconstruction exactly; with a target prompt each step
    uses eps(source) + w (eps(target) - eps(source)), written out here with the model called directly."""
    from dlearn import text2image as t2i

    torch.manual_seed(0)
    model = t2i.TextToImage(channels=(16, 32)).eval()
    x0 = torch.rand(3, 1, 8, 8, generator=gen) * 2 - 1
    source, target = ["a thick three", "a seven", "a slanted one"], ["a thick eight", "a one", "a slanted seven"]
    world = I.TextWorld(model, source)
    inv = I.ddim_invert(world, x0, 5)
    torch.testing.assert_close(I.negative_prompt_edit(world, inv, 4.0), I.reconstruct(world, inv, 1.0), atol=0, rtol=0)
    z, r, w = inv.pivots[-1], 1000 // 5, 4.0
    with torch.no_grad():
        for t in inv.timesteps:
            tt = torch.full((3,), t)
            e_s, e_t = model(z, tt, t2i.tokenize(source)), model(z, tt, t2i.tokenize(target))
            z = ddim.ddim_step(model.alpha_bar, t, t - r, z, e_s + w * (e_t - e_s))[0]
    torch.testing.assert_close(I.negative_prompt_edit(world, inv, w, target), z, atol=1e-5, rtol=0)
    assert (z - I.reconstruct(world, inv, 1.0)).abs().max() > 1e-3  # the edit changed something
    with pytest.raises(ValueError, match="one prompt per inverted image"):
        I.negative_prompt_edit(world, inv, w, target[:2])


def test_subset_of_an_inversion(tb7):
    _, x0, world = tb7
    inv = I.null_text_optimisation(world, I.ddim_invert(world, x0[:6], 5), 7.5, inner_steps=2)
    one, some = I.subset(inv, 2), I.subset(inv, slice(1, 4))
    assert one.pivots[0].shape == (1, 2) and len(one.nulls) == 5 and one.timesteps == inv.timesteps
    torch.testing.assert_close(one.nulls[3], inv.nulls[3][2:3], atol=0, rtol=0)
    torch.testing.assert_close(some.pivots[-1], inv.pivots[-1][1:4], atol=0, rtol=0)
    rec = I.reconstruct(world, inv, 7.5)
    torch.testing.assert_close(I.reconstruct(world, some, 7.5), rec[1:4], atol=1e-12, rtol=0)  # images are independent
    assert I.subset(I.ddim_invert(world, x0[:6], 5), 0).nulls is None
