"""Chapter 07's guidance on the exact mixture (rows G1-G6)."""

import pytest
import torch

from dlearn import ddim, guidance, schedules, toys


def _ab():
    return schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())


def test_check_G1_classifier_guidance_is_bayes_rule_on_scores(gen):
    mix = toys.mixture_2d()
    x = 2 * torch.randn(100, 2, generator=gen, dtype=torch.float64)
    for a in (0.9, 0.3, 0.01):
        for y in range(3):
            conditional = mix.component(y).score(x, a)  # the exact class-conditional score
            torch.testing.assert_close(guidance.classifier_guided_score(mix, x, a, y), conditional, rtol=1e-10, atol=1e-10)


def test_check_G2_the_guidance_scale_sharpens_the_class():
    mix = toys.mixture_2d()
    ab = _ab()
    x_T = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    post, spread = [], []
    for scale in (0.0, 1.0, 3.0, 10.0):

        def eps_fn(x, t, s=scale):
            return -(1 - ab[t]).sqrt()[:, None] * guidance.classifier_guided_score(mix, x, ab[t], 0, s)

        out = ddim.sample(eps_fn, x_T, ab, 50, progress=False)
        post.append(mix.class_posterior(out)[:, 0].mean().item())
        spread.append(out[mix.class_posterior(out).argmax(1) == 0].std(0).sum().item())
    assert all(b >= a - 1e-6 for a, b in zip(post, post[1:], strict=False)) and post[-1] > 0.99
    assert spread[3] < spread[1]


def test_check_G3_three_forms_of_classifier_free_guidance(gen):
    e_u, e_c = torch.randn(2, 50, 2, generator=gen, dtype=torch.float64)
    a = 0.37
    s_u, s_c = -e_u / (1 - a) ** 0.5, -e_c / (1 - a) ** 0.5
    for w in (0.0, 1.0, 2.5, 7.5):
        ref = guidance.cfg(e_u, e_c, w)
        torch.testing.assert_close(guidance.cfg_ho_salimans(e_u, e_c, w - 1), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(-((1 - a) ** 0.5) * guidance.cfg_score(s_u, s_c, w), ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(guidance.cfg(e_u, e_c, 1.0), e_c) and torch.equal(guidance.cfg(e_u, e_c, 0.0), e_u)
    # elsewhere, bit for bit the sum diffusers' pipelines compute (noise_pred_uncond + w * (text - uncond))
    assert torch.equal(guidance.cfg(e_u, e_c, 7.5), e_u + 7.5 * (e_c - e_u))
    # w = 1 and w = 0 reproduce the conditional and unconditional samplers exactly
    mix, ab = toys.mixture_2d(), _ab()
    x_T = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    cond = ddim.sample(lambda x, t: mix.component(1).eps_star(x, ab[t]), x_T, ab, 50, progress=False)
    uncond = ddim.sample(lambda x, t: mix.eps_star(x, ab[t]), x_T, ab, 50, progress=False)
    assert torch.equal(guidance.guided_ddim(mix, 1, 1.0, x_T, ab, 50), cond)
    assert torch.equal(guidance.guided_ddim(mix, 1, 0.0, x_T, ab, 50), uncond)
    with pytest.raises(ValueError, match="one shape"):
        guidance.cfg(e_u, e_c[:3], 2.0)


def test_check_G4_condition_dropout_trains_both_branches():
    mix, ab = toys.mixture_2d(), _ab()
    errs = {p: guidance.branch_errors(guidance.train_class_conditional_mlp(mix, ab, p, steps=3000), mix) for p in (0.0, 0.1, 0.5)}
    (cond0, uncond0), (cond1, uncond1), (cond5, uncond5) = errs[0.0], errs[0.1], errs[0.5]
    assert uncond0 > 20 * max(uncond1, uncond5)  # never trained: the "no class" branch is far off
    assert max(cond0, cond1, cond5) < 0.01 and max(uncond1, uncond5) < 0.1  # with dropout, one net serves both
    assert cond5 > cond1  # giving half the data to the empty label costs the conditional branch a little


def test_check_G5_guidance_trades_diversity_for_fidelity():
    mix, ab = toys.mixture_2d(), _ab()
    x_T = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dist, std = {}, {}
    for w in (1.0, 3.0, 7.5):
        out = guidance.guided_ddim(mix, 0, w, x_T, ab, 100)
        dist[w] = (out - mix.means[0]).norm(dim=1).mean().item()
        std[w] = out[:, 0].std().item()
    true = (mix.component(0).sample(20_000, torch.Generator().manual_seed(1))[0] - mix.means[0]).norm(dim=1).mean().item()
    assert abs(dist[1.0] - true) < 0.08  # w = 1 samples the class
    assert dist[1.0] < dist[3.0] < dist[7.5] and std[7.5] < std[1.0]  # overshoot: pushed past the class, less diverse


def test_check_G6_guidance_breaks_the_exact_invertibility_of_ddim():
    """DDIM inversion, then sampling with the same guided eps: the round trip misses x0 by the discretisation
    error at w = 1 (eps is evaluated at the wrong end of each step) and by several times more as w grows."""
    mix, ab = toys.mixture_2d(), _ab()
    x0 = mix.component(0).sample(200, torch.Generator().manual_seed(0))[0]
    n = 50
    errors = {}
    for w in (1.0, 3.0, 7.5):

        def eps(x, a, w=w):
            return guidance.cfg(mix.eps_star(x, a), mix.component(0).eps_star(x, a), w)

        x = x0
        for t in schedules.inference_timesteps(1000, n).flip(0).tolist():
            src = t - 1000 // n
            a_src = ab[src] if src >= 0 else torch.tensor(1.0 - 1e-12, dtype=torch.float64)  # alpha_bar = 1 has no eps
            x, _ = ddim.ddim_inverse_step(ab, t, 1000, n, x, eps(x, a_src))
        back = ddim.sample(lambda y, t, e=eps: e(y, ab[t]), x, ab, n, progress=False)
        errors[w] = (back - x0).abs().mean().item()
    assert errors[1.0] < errors[3.0] < errors[7.5] and errors[7.5] > 3 * errors[1.0]


def test_cfg_branch_order_is_pinned_by_bayes_rule(gen):
    """On the exact mixture, eps_c - eps_uc = -sqrt(1 - a) grad log p(y | x_t) (Bayes' rule on scores), so CFG at
    scale w is classifier guidance with the exact noisy classifier at scale s = w, computed here by autograd of
    the class posterior without guidance.cfg. That pins which branch gets weight w: swapped, the guided eps would
    be the one at scale 1 - w. Checked on the combination and on whole guided DDIM samples."""
    mix, ab = toys.mixture_2d(), _ab()
    x = 2 * torch.randn(200, 2, generator=gen, dtype=torch.float64)

    def bayes_eps(x, a, y, w):
        scale = (1 - torch.as_tensor(a, dtype=torch.float64)).sqrt().reshape(-1, 1)
        return -scale * guidance.classifier_guided_score(mix, x, a, y, w)

    for a in (0.9, 0.3, 0.02):
        for w in (0.0, 1.0, 3.0):
            got = guidance.cfg(mix.eps_star(x, a), mix.component(2).eps_star(x, a), w)
            torch.testing.assert_close(got, bayes_eps(x, a, 2, w), rtol=1e-9, atol=1e-9)
            if w != 0.5:
                assert (got - bayes_eps(x, a, 2, 1 - w)).abs().max() > 1e-2
    x_T = torch.randn(300, 2, generator=gen, dtype=torch.float64)
    e_c, e_u = mix.component(1).eps_star, mix.eps_star
    for w in (0.0, 3.0):
        own = ddim.sample(lambda x, t, w=w: bayes_eps(x, ab[t], 1, w), x_T, ab, 20, progress=False)
        got = guidance.guided_ddim(mix, 1, w, x_T, ab, 20)
        torch.testing.assert_close(got, own, rtol=1e-7, atol=1e-7)
        swapped = ddim.sample(lambda x, t, w=w: e_c(x, ab[t]) + w * (e_u(x, ab[t]) - e_c(x, ab[t])), x_T, ab, 20, progress=False)
        assert (got - swapped).abs().max() > 0.1
