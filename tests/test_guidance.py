"""Chapter 07's guidance on the exact mixture (rows G1-G6; G1 and G3 are identity checks: algebra, not findings)."""

import pytest
import torch

from dlearn import ddim, guidance, schedules, toys


def _ab():
    return schedules.alpha_bar_from_betas(schedules.linear_betas(1000).double())


def test_identity_check_G1_classifier_guidance_is_bayes_rule_on_scores(gen):
    mix = toys.mixture_2d()
    x = 2 * torch.randn(100, 2, generator=gen, dtype=torch.float64)
    for a in (0.9, 0.3, 0.01):
        for y in range(3):
            conditional = mix.component(y).score(x, a)  # the exact class-conditional score
            torch.testing.assert_close(guidance.classifier_guided_score(mix, x, a, y), conditional, rtol=1e-10, atol=1e-10)


def _mean_se(values):
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std() / len(v) ** 0.5).item()


def _paired(a, b):
    """Mean and SE of the per-seed differences a - b (the arms share their seeds)."""
    return _mean_se([x - y for x, y in zip(a, b, strict=True)])


SEEDS = (0, 1, 2)


def test_check_G2_the_guidance_scale_sharpens_the_class():
    """As chapter 07 states it: three sampling seeds of 500 points, ranked only beyond 2 SE of the paired difference."""
    mix = toys.mixture_2d()
    ab = _ab()
    post, spread = {s: [] for s in (0.0, 1.0, 10.0)}, {s: [] for s in (0.0, 1.0, 10.0)}
    for seed in SEEDS:
        x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for scale in post:

            def eps_fn(x, t, s=scale):
                return -(1 - ab[t]).sqrt()[:, None] * guidance.classifier_guided_score(mix, x, ab[t], 0, s)

            out = ddim.sample(eps_fn, x_T, ab, 50, progress=False)
            post[scale].append(mix.class_posterior(out)[:, 0].mean().item())
            spread[scale].append(out[mix.class_posterior(out).argmax(1) == 0].std(0).sum().item())
    d, se = _paired(post[1.0], post[0.0])
    assert d > 2 * se and _mean_se(post[10.0])[0] > 0.99
    d, se = _paired(spread[10.0], spread[1.0])
    assert d < -2 * se


def test_identity_check_G3_three_forms_of_classifier_free_guidance(gen):
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
    """As chapter 07 states it: three training seeds per rate, 1000 steps each, ranked only beyond 2 SE."""
    mix, ab = toys.mixture_2d(), _ab()
    errs = {p: [guidance.branch_errors(guidance.train_class_conditional_mlp(mix, ab, p, steps=1000, seed=s), mix) for s in SEEDS]
            for p in (0.0, 0.1, 0.5)}  # fmt: skip
    cond = {p: _mean_se([c for c, _ in v]) for p, v in errs.items()}
    uncond = {p: _mean_se([u for _, u in v]) for p, v in errs.items()}

    def beyond(a, b):  # a above b by more than 2 SE of the difference
        return a[0] - b[0] > 2 * (a[1] ** 2 + b[1] ** 2) ** 0.5

    # never trained: the "no class" branch is far off
    assert beyond(uncond[0.0], uncond[0.1]) and beyond(uncond[0.0], uncond[0.5]) and uncond[0.0][0] > 5 * uncond[0.1][0]
    # p_uncond 0.5: a better "no class" branch, a worse conditional one
    assert beyond(cond[0.5], cond[0.1]) and beyond(uncond[0.1], uncond[0.5])


def test_check_G5_guidance_trades_diversity_for_fidelity():
    mix, ab = toys.mixture_2d(), _ab()
    dist, std = {w: [] for w in (1.0, 3.0, 7.5)}, {w: [] for w in (1.0, 3.0, 7.5)}
    for seed in SEEDS:
        x_T = torch.randn(300, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for w in dist:
            out = guidance.guided_ddim(mix, 0, w, x_T, ab, 100)
            dist[w].append((out - mix.means[0]).norm(dim=1).mean().item())
            std[w].append(out[:, 0].std().item())
    true = (mix.component(0).sample(20_000, torch.Generator().manual_seed(1))[0] - mix.means[0]).norm(dim=1).mean().item()
    assert abs(_mean_se(dist[1.0])[0] - true) < 0.08  # w = 1 samples the class
    for a, b in ((dist[3.0], dist[1.0]), (dist[7.5], dist[3.0]), (std[1.0], std[7.5])):  # overshoot, less diverse
        d, se = _paired(a, b)
        assert d > 2 * se


def test_check_G6_guidance_breaks_the_exact_invertibility_of_ddim():
    """DDIM inversion, then sampling with the same guided eps: the round trip misses x0 by the discretisation
    error at w = 1 (eps is evaluated at the wrong end of each step) and by several times more as w grows
    (three draws of 200 points, ranked beyond 2 SE of the paired difference)."""
    mix, ab = toys.mixture_2d(), _ab()
    n = 50
    errors = {w: [] for w in (1.0, 3.0, 7.5)}
    for seed in SEEDS:
        x0 = mix.component(0).sample(200, torch.Generator().manual_seed(seed))[0]
        for w in errors:

            def eps(x, a, w=w):
                return guidance.cfg(mix.eps_star(x, a), mix.component(0).eps_star(x, a), w)

            x = x0
            for t in schedules.inference_timesteps(1000, n).flip(0).tolist():
                src = t - 1000 // n
                a_src = ab[src] if src >= 0 else torch.tensor(1.0 - 1e-12, dtype=torch.float64)  # alpha_bar = 1 has no eps
                x, _ = ddim.ddim_inverse_step(ab, t, 1000, n, x, eps(x, a_src))
            back = ddim.sample(lambda y, t, e=eps: e(y, ab[t]), x, ab, n, progress=False)
            errors[w].append((back - x0).abs().mean().item())
    for a, b in ((errors[3.0], errors[1.0]), (errors[7.5], errors[3.0])):
        d, se = _paired(a, b)
        assert d > 2 * se
    assert _mean_se(errors[7.5])[0] > 3 * _mean_se(errors[1.0])[0]


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
