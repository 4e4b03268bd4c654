"""Bad input gets a clear error naming what was expected and what came (issue 18): no silent wrong result, no NaN
passed on, no crash deep inside torch. One test per case; tiny untrained models keep them fast."""

import pytest
import torch

from dlearn import checks, datasets, ddim, ddpm, diffusion, guidance, metrics, schedules, toys
from dlearn import controlnet as C
from dlearn import inversion as I
from dlearn import text2image as t2i
from dlearn.distributions import levels_to_unit

NAN = float("nan")


@pytest.fixture(scope="module")
def alpha_bar():
    return schedules.alpha_bar_from_betas(schedules.linear_betas(1000))


@pytest.fixture(scope="module")
def clf():
    torch.manual_seed(0)
    return metrics.DigitClassifier().eval()


@pytest.fixture(scope="module")
def digits():
    x, _ = datasets.digits("test")
    return x[:4]


@pytest.fixture(scope="module")
def tb7():
    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())
    mix = toys.mixture_2d()
    x0 = mix.component(0).sample(4, torch.Generator().manual_seed(0))[0]
    world = I.MixtureWorld(mix, torch.zeros(4, dtype=torch.long), ab)
    return mix, x0, world, I.ddim_invert(world, x0, 10)


# --------------------------------------------------------------------------------------------
# Silent wrong results or NaN before
# --------------------------------------------------------------------------------------------


def test_classifier_rejects_nan_pixels(clf, digits):
    x = levels_to_unit(digits)
    x[0, 0, 3, 3] = NAN
    with pytest.raises(ValueError, match=r"finite values in \[-1, 1\], got NaN values"):
        metrics.predict(clf, x)
    with pytest.raises(ValueError, match="NaN"):
        metrics.features(clf, x)


def test_classifier_rejects_levels_as_floats(clf, digits):
    with pytest.raises(ValueError, match=r"in \[-1, 1\], got values in \[0, 16\].*levels_to_unit"):
        metrics.predict(clf, digits.float())


def test_controlnet_rejects_levels_as_control(base, digits):
    cn = C.ControlNet.from_unet(base.unet)
    with pytest.raises(ValueError, match=r"control.*in \[0, 1\], got values in \[0, 16\].*control_mask"):
        C.generate(base, cn, digits.float(), ["a one"] * 4, steps=2)


def test_invert_images_rejects_levels(base, digits):
    with pytest.raises(ValueError, match=r"images should hold finite values in \[-1, 1\], got values in \[0, 16\]"):
        I.invert_images(base, digits.float(), ["a one"] * 4, steps=2, inner_steps=1)


def test_text2image_generate_rejects_nan_guidance_scale(base):
    with pytest.raises(ValueError, match="guidance_scale should be a finite number, got nan"):
        t2i.generate(base, ["a one"], guidance_scale=NAN, steps=2)


def test_cfg_rejects_nan_guidance_scale():
    with pytest.raises(ValueError, match="should be a finite number, got nan"):
        guidance.cfg(torch.zeros(2), torch.ones(2), NAN)
    with pytest.raises(TypeError, match="finite number"):
        guidance.cfg(torch.zeros(2), torch.ones(2), "2")


def test_ddim_step_rejects_nan_or_out_of_range_eta(alpha_bar, gen):
    x, out, noise = torch.randn(3, 2, 1, 8, 8, generator=gen)
    for eta in (NAN, 5.0, 1.01, -0.1):
        with pytest.raises(ValueError, match=r"eta should be"):
            ddim.ddim_step(alpha_bar, 500, 480, x, out, eta=eta, noise=noise)
    assert torch.isfinite(ddim.ddim_step(alpha_bar, 500, 480, x, out, eta=1.0, noise=noise)[0]).all()


def test_diffusion_generate_rejects_zero_steps():
    torch.manual_seed(0)
    model = diffusion.DigitsDDPM(channels=(8, 16))
    for sampler in ("ancestral", "ddim"):
        with pytest.raises(ValueError, match=r"steps should be an integer in 1..1000, got 0"):
            diffusion.generate(model, 4, sampler, 0)
    with pytest.raises(ValueError, match="at least one step"):
        ddpm.sample(model, torch.zeros(2, 1, 8, 8), model.alpha_bar, torch.tensor([], dtype=torch.long))


def test_ddpm_step_rejects_negative_timestep(alpha_bar):
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"timestep should be an integer in 0..999, got -1"):
        ddpm.ddpm_step(alpha_bar, -1, x, x)


# --------------------------------------------------------------------------------------------
# Unhelpful crashes before
# --------------------------------------------------------------------------------------------


def test_classifier_accepts_float64_images(clf, digits):
    """The classifier takes float images (its documented contract): float64 is cast to its weights' dtype, so it
    gives the float32 result exactly (before: a conv dtype error)."""
    x = levels_to_unit(digits)
    assert torch.equal(metrics.predict(clf, x.double()), metrics.predict(clf, x))
    assert torch.equal(metrics.features(clf, x.double()), metrics.features(clf, x))


def test_frechet_distance_rejects_nan_features(gen):
    a, b = torch.randn(2, 20, 3, generator=gen)
    a[4, 1] = NAN
    with pytest.raises(ValueError, match=r"feats_a should be finite, got 1 NaN or infinite value"):
        metrics.frechet_distance(a, b)
    with pytest.raises(ValueError, match="mu_b should be finite"):
        metrics.frechet_distance_gaussians(torch.zeros(3), torch.eye(3), torch.full((3,), NAN), torch.eye(3))


def test_generate_rejects_a_bare_string_as_prompts(base):
    with pytest.raises(TypeError, match=r"prompts should be a list of strings.*bare string 'a one'"):
        t2i.generate(base, "a one", steps=2)
    with pytest.raises(TypeError, match="bare string"):
        C.generate(base, None, None, "a one", steps=2)


def test_generate_rejects_an_empty_prompt_list(base):
    with pytest.raises(ValueError, match="prompts should hold at least one string, got an empty list"):
        t2i.generate(base, [], steps=2)
    with pytest.raises(ValueError, match="at least one string"):
        C.generate(base, None, None, [], steps=2)


def test_ddpm_step_rejects_timestep_T(alpha_bar):
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"timestep should be an integer in 0..999, got 1000"):
        ddpm.ddpm_step(alpha_bar, 1000, x, x, noise=x)


def test_reconstruct_rejects_an_inversion_from_a_longer_schedule(tb7):
    mix, x0, world, _ = tb7
    short = I.MixtureWorld(mix, torch.zeros(4, dtype=torch.long), world.alpha_bar[::2].contiguous())
    inv = I.ddim_invert(world, x0, 1000)
    with pytest.raises(ValueError, match=r"1000 steps.*up to 999.*500 training steps"):
        I.reconstruct(short, inv, 1.0)


def test_reconstruct_rejects_a_null_batch_that_does_not_match_the_images(tb7):
    _, _, world, inv = tb7
    with pytest.raises(ValueError, match=r"null embedding.*shape \(4, 3\).*got \(3, 3\)"):
        I.reconstruct(world, inv, 7.5, nulls=world.null_init(3))
    with pytest.raises(ValueError, match=r"null embedding of step 0.*got \(3, 3\)"):
        I.reconstruct(world, inv, 7.5, nulls=[world.null_init(3)] * inv.steps)


def test_null_text_optimisation_names_the_step_of_a_nan(tb7):
    _, _, world, inv = tb7
    pivots = list(inv.pivots)
    pivots[5] = torch.full_like(pivots[5], NAN)  # the target of step 10 - 5 - 1 = 4
    bad = I.Inversion(pivots, inv.timesteps, 1.0)
    with pytest.raises(ValueError, match=r"null-text optimisation at step 4 \(t = 500\).*loss is nan"):
        I.null_text_optimisation(world, bad, 7.5)


def test_checks_helpers_name_what_came():
    with pytest.raises(TypeError, match="bool"):
        checks.finite_number("w", True)
    with pytest.raises(ValueError, match=r"x should be in \[0, 1\], got 2"):
        checks.number_in("x", 2, 0, 1)
    with pytest.raises(TypeError, match="integer"):
        checks.integer_in("t", 1.5, 0, 9)
    checks.integer_in("t", torch.tensor(3), 0, 9)
    checks.values_in("x", torch.empty(0), -1, 1)
    with pytest.raises(TypeError, match="strings only"):
        checks.string_list("prompts", ["a one", None])
