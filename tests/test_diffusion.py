"""Chapter 05 on the digits: the DDPM model, its losses and bound, and rows D1, D3, D4, D11, P1, P3, P7,
P11-P13. The numbers recorded with the shipped DDPMs (P10, D25, P12's bits/dim) are checked in tests/test_records.py."""

import math

import pytest
import torch

from dlearn import datasets, ddpm, diffusion, distributions, metrics, nets, schedules, toys, vdm


def _ab64(name="linear"):
    return schedules.alpha_bar_from_betas(schedules.make_betas(name, 1000).double())


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return diffusion.DigitsDDPM("eps", channels=(8, 16), num_steps=1000).eval()


def test_check_D1_latents_have_the_data_dimension_and_the_chain_is_markov(gen):
    """Every x_t of the chain lives in R^d (d = 64 for the digits); x_T is standard normal (see D5, P2)."""
    x0 = datasets.digits("val", form="unit")[0][:16]
    betas = schedules.linear_betas(1000)
    x = x0
    for t in range(1000):  # one encoder step at a time: q(x_t | x_{t-1}), a linear-Gaussian map
        x = (1 - betas[t]).sqrt() * x + betas[t].sqrt() * torch.randn(x.shape, generator=gen)
        assert x.shape == x0.shape
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1


def test_check_D3_reference_constants_and_learned_schedules():
    lin = _ab64("linear")
    assert lin[-1].item() == pytest.approx(4.04e-5, rel=0.01)
    # the cosine schedule without its clip reaches 3.7e-33 (float64: f(1) = cos(pi/2)^2 is rounding noise)
    s = 0.008
    f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert f(1) / f(0) == pytest.approx(3.7e-33, rel=0.05)
    assert schedules.cosine_betas(1000).max().item() == pytest.approx(0.999)  # hence the clip
    # fixed (a hyper-parameter: no parameters) or learned (VDM's learned log-SNR network: parameters)
    assert distributions is not None and sum(p.numel() for p in schedules.LinearLogSNR().parameters()) == 0
    assert sum(p.numel() for p in schedules.MonotoneLogSNR(hidden=8).parameters() if p.requires_grad) > 0


def test_check_D4_the_forward_process_has_no_parameters(tiny, gen):
    assert nets.count_parameters(tiny) == nets.count_parameters(tiny.net)
    assert "alpha_bar" in dict(tiny.named_buffers()) and not tiny.alpha_bar.requires_grad
    x0 = datasets.digits("val", form="unit")[0][:8]
    tiny.train()
    diffusion.training_loss(tiny, x0, gen).backward()
    tiny.eval()
    assert tiny.alpha_bar.grad is None and all(p.grad is not None for p in tiny.parameters())
    tiny.zero_grad()


def test_check_D11_denoising_matching_is_minimised_by_the_true_posterior_mean(gen):
    """KL(q(x_{t-1} | x_t, x0) || p_theta) over Gaussians with the schedule's variance: zero exactly at
    mu_theta = mu_q and growing with the mean error (the general Gaussian KL of torch.distributions)."""
    ab = _ab64()
    x0, eps = torch.randn(4, 64, generator=gen, dtype=torch.float64), torch.randn(4, 64, generator=gen, dtype=torch.float64)
    t = 300
    x_t = ddpm.q_sample(x0, ab[t], eps)
    mu_q, var = ddpm.posterior_mean_var(x0, x_t, ab[t], ab[t - 1])
    q = torch.distributions.Normal(mu_q, var.sqrt())
    kls = []
    for err in (0.0, 0.1, 0.2):
        mu_p, _ = ddpm.posterior_mean_var(x0 + err, x_t, ab[t], ab[t - 1])
        kls.append(torch.distributions.kl_divergence(q, torch.distributions.Normal(mu_p, var.sqrt())).sum(1))
    assert kls[0].abs().max() < 1e-12 and (kls[1] > 0).all() and (kls[2] > kls[1]).all()


def test_check_P1_ddpm_and_luo_notation_agree(gen):
    """DDPM's q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x, beta_t) is Luo's N(sqrt(alpha_t) x, 1 - alpha_t)."""
    betas = schedules.linear_betas(1000).double()
    alpha = 1 - betas
    torch.testing.assert_close(schedules.alpha_bar_from_betas(betas), torch.cumprod(alpha, 0), rtol=0, atol=0)
    x_prev, x_t = torch.randn(2, 1000, generator=gen, dtype=torch.float64)
    ddpm_form = torch.distributions.Normal((1 - betas).sqrt() * x_prev, betas.sqrt()).log_prob(x_t)
    luo_form = torch.distributions.Normal(alpha.sqrt() * x_prev, (1 - alpha).sqrt()).log_prob(x_t)
    torch.testing.assert_close(ddpm_form, luo_form, rtol=0, atol=1e-12)


def test_check_P3_closed_form_marginal_of_digits(gen):
    ab = _ab64()
    x0 = datasets.digits("val", form="unit")[0][:2].double()
    for t in (0, 99, 499, 999):
        eps = torch.randn((20_000, *x0.shape[1:]), generator=gen, dtype=torch.float64)
        x_t = ddpm.q_sample(x0[:1].expand_as(eps), ab[t], eps)
        assert (x_t.mean(0) - ab[t].sqrt() * x0[0]).abs().max() < 0.03
        assert ((x_t.var(0) / (1 - ab[t])) - 1).abs().max() < 0.05


def test_check_P7_ddpm_loss_terms_are_luo_eq58_term_by_term():
    model = vdm.GaussianDiffusion1D(torch.linspace(1e-4, 0.05, 50, dtype=torch.float64), m0=0.5, s0=0.3)
    traj = model.forward_trajectories(0.9, 500, torch.Generator().manual_seed(0))
    luo = model.denoising_terms(traj)  # log-likelihood side: reconstruction - KLs
    x0 = traj[:, 0]
    for t in range(2, model.num_steps):  # L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t))
        a_t, a_p = model.alpha_bar[t], model.alpha_bar[t - 1]
        mu_q, var = ddpm.posterior_mean_var(x0, traj[:, t], a_t, a_p)
        mu_p, _ = ddpm.posterior_mean_var(model.posterior_x0(t, traj[:, t])[0], traj[:, t], a_t, a_p)
        normal = torch.distributions.Normal
        kl = torch.distributions.kl_divergence(normal(mu_q, var.sqrt()), normal(mu_p, var.sqrt()))
        torch.testing.assert_close(kl, -luo[:, t], rtol=1e-9, atol=1e-12)
    # L_T + L_{T-1} is minus the last column; L_0 is minus the first
    a = model.alpha_bar[-1]
    l_T = 0.5 * (a * x0**2 + (1 - a) - 1 - torch.log(1 - a))
    assert (l_T > 0).all() and (-luo[:, -1] > l_T).all()


def test_check_P10_vlb_weights_are_largest_at_small_t():
    ab = _ab64()
    w = vdm.eps_loss_weight(ab[1:], ab[:-1])  # the bound's weight on |eps - eps_hat|^2, t = 2..T; L_simple's is 1
    assert w.argmax() == 0 and w[0] / w.min() > 50 and (w[1:100] < w[:99]).all()  # 0.60 at t = 2, about 0.01 from t = 300


def test_check_P11_one_step_helps_and_training_reaches_the_bayes_error():
    mix = toys.mixture_2d()
    ab = _ab64()
    t = 300
    g = torch.Generator().manual_seed(0)

    def batch(n):
        x0, _ = mix.sample(n, g)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        return ddpm.q_sample(x0, ab[t], eps).float(), eps.float()

    torch.manual_seed(0)
    net = nets.MLP(2, (128, 128, 128), 2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x_fixed, e_fixed = batch(256)
    before = ((net(x_fixed) - e_fixed) ** 2).mean()
    before.backward()
    opt.step()
    opt.zero_grad()
    assert ((net(x_fixed) - e_fixed) ** 2).mean() < before  # one step of Algorithm 1 decreases the loss
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3000)
    for _ in range(3000):
        x, e = batch(512)
        loss = ((net(x) - e) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    x, e = batch(200_000)
    with torch.no_grad():
        trained = ((net(x) - e) ** 2).sum(1).mean().item()
    bayes = ((mix.eps_star(x.double(), ab[t]) - e.double()) ** 2).sum(1).mean().item()
    assert bayes <= trained < 1.05 * bayes


def test_check_P13_eps_prediction_is_a_score_estimate(gen):
    mix = toys.mixture_2d()
    ab = _ab64()
    x = 2 * torch.randn(500, 2, generator=gen, dtype=torch.float64)
    for t in (10, 300, 900):
        torch.testing.assert_close(-mix.eps_star(x, ab[t]) / (1 - ab[t]).sqrt(), mix.score(x, ab[t]), rtol=1e-9, atol=1e-10)


# --- the digits model ---------------------------------------------------------------------------


def test_vlb_terms_add_up_and_the_vlb_loss_estimates_them(tiny):
    x, _ = datasets.digits("val")
    x = x[:32]
    terms = diffusion.vlb_terms(tiny, x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms.neg_elbo, terms.prior + terms.latent + terms.reconstruction)
    each = (terms.prior, terms.latent, terms.reconstruction, terms.neg_elbo)
    assert all(v.shape == (32,) and torch.isfinite(v).all() for v in each)
    assert (terms.prior > 0).all() and (terms.reconstruction >= 0).all()
    # the stratified estimate (every 10th step) agrees with the full sum within Monte Carlo error
    gens = [torch.Generator().manual_seed(s) for s in range(8)]
    strided = torch.stack([diffusion.vlb_terms(tiny, x, g, stride=10).neg_elbo.mean() for g in gens])
    assert abs(strided.mean() - terms.neg_elbo.mean()) < 4 * strided.std() / math.sqrt(8) + 0.02 * terms.neg_elbo.mean()
    # L_vlb training loss: T E_t[L_t] / d with t uniform on 0..T-1 is unbiased for (L_0 + sum_t L_t) / d
    g = torch.Generator().manual_seed(1)
    x0 = distributions.levels_to_unit(x)
    with torch.no_grad():
        draws = torch.stack([diffusion.training_loss(tiny, x0, g, "vlb") for _ in range(400)])
    target = (terms.latent + terms.reconstruction).mean().item() / 64
    assert abs(draws.mean().item() - target) < 4 * draws.std().item() / math.sqrt(400)


@pytest.mark.parametrize("ptype", ddpm.PREDICTION_TYPES)
def test_simple_loss_targets(ptype, gen):
    model = diffusion.DigitsDDPM(ptype, channels=(8, 16))
    x0 = datasets.digits("val", form="unit")[0][:4]
    loss = diffusion.training_loss(model, x0, gen)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_levels_parameterisation_snaps_onto_the_grey_levels(gen):
    torch.manual_seed(0)
    model = diffusion.DigitsDDPM("levels", channels=(8, 16)).eval()
    assert model.output_type == "x0"
    x, _ = datasets.digits("val")
    x0 = distributions.levels_to_unit(x[:8])
    with torch.no_grad():
        for t_val in (0, 1):  # little noise (std 0.010, 0.014; levels 0.125 apart): the likelihood decides
            t = torch.full((8,), t_val)
            x_t = ddpm.q_sample(x0, model.alpha_bar[t], torch.randn(x0.shape, generator=gen))
            assert (model(x_t, t) - x0).abs().max() < 1e-2
        t = torch.full((8,), 999)  # pure noise: a weighted mean of the levels, inside [-1, 1]
        out = model(torch.randn(x0.shape, generator=gen), t)
    assert out.abs().max() < 1 and (out - x0).abs().max() > 0.3


def test_generate_shapes_and_determinism(tiny):
    a = diffusion.generate(tiny, 5, "ddim", 5, seed=3, progress=False)
    b = diffusion.generate(tiny, 5, "ddim", 5, seed=3, progress=False)
    c = diffusion.generate(tiny, 5, "ancestral", 10, seed=3, progress=False)
    assert a.shape == c.shape == (5, 1, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1
    with pytest.raises(ValueError, match="sampler"):
        diffusion.generate(tiny, 2, "euler")


def test_memorisation_scores_copies_and_fresh_digits():
    train, _ = datasets.digits("train", form="unit")
    test, _ = datasets.digits("test", form="unit")
    assert metrics.memorisation(train[:300], train, test) == 1.0  # exact copies
    assert metrics.memorisation(test, train, test) == pytest.approx(0.05, abs=0.005)  # fresh digits: the quantile
    val, _ = datasets.digits("val", form="unit")
    assert metrics.memorisation(val, train, test) < 0.15
    with pytest.raises(ValueError, match="one image shape"):
        metrics.nearest_distances(train, test.reshape(len(test), -1))


def test_bad_input():
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.DigitsDDPM("score")
    with pytest.raises(ValueError, match="weighting"):
        diffusion.training_loss(diffusion.DigitsDDPM(channels=(8, 16)), torch.zeros(2, 1, 8, 8), weighting="snr")
    with pytest.raises(ValueError, match="stride"):
        diffusion.vlb_terms(diffusion.DigitsDDPM(channels=(8, 16)), torch.zeros(2, 1, 8, 8, dtype=torch.long), stride=0)


def test_vlb_gradients_are_finite_when_the_batch_mixes_the_decoder_and_kl_terms(gen):
    torch.manual_seed(0)
    model = diffusion.DigitsDDPM("eps", channels=(8, 16))
    x0 = distributions.levels_to_unit(datasets.digits("val")[0][:4])
    t = torch.tensor([0, 1, 500, 999])  # L_0 on the first image, KL terms on the others
    eps = torch.randn(x0.shape, generator=gen)
    x_t = ddpm.q_sample(x0, model.alpha_bar[t], eps)
    terms = diffusion._vlb_terms_at(model, x0, t, x_t, eps, model(x_t, t))
    terms.sum().backward()
    assert torch.isfinite(terms).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_check_P12_the_histogram_baseline_and_a_discretised_decoder_that_gives_a_proper_bound():
    """The per-pixel histogram baseline in bits/dim, and a 17-level DDPM's decoder term is a probability (for any
    weights: an untrained model). The shipped DDPMs' recorded bits/dim against the baselines: tests/test_records.py."""
    x_train, _ = datasets.digits("train")
    x_test, _ = datasets.digits("test")
    logits = distributions.pixel_histogram_logits(x_train).expand(len(x_test), -1, -1, -1, -1)
    hist_bpd = distributions.nats_to_bits_per_dim(-distributions.log_categorical_pixels(x_test, logits).mean().item(), 64)
    assert 2.3 < hist_bpd < math.log2(17)  # 2.40: the baseline is itself far better than uniform
    # and the decoder term is a proper probability: L_0 >= 0, so the bound is a bound on a discrete likelihood
    torch.manual_seed(0)
    model = diffusion.DigitsDDPM("levels", channels=(8, 16)).eval()
    terms = diffusion.vlb_terms(model, x_test[:50], torch.Generator().manual_seed(0), stride=10)
    assert (terms.reconstruction >= 0).all() and (terms.neg_elbo > 0).all()


def test_an_augmented_ddpm_samples_the_plain_digits_when_given_no_labels(gen):
    """Samplers call model(x_t, t): for an augmented model that is the all-zero label, the digits as they are."""
    torch.manual_seed(0)
    model = diffusion.DigitsDDPM("eps", channels=(8, 16), augment=True).eval()
    x, _ = datasets.digits("val", form="unit")
    t = torch.randint(0, 1000, (len(x),), generator=gen)
    with torch.no_grad():
        plain = model(x, t)
        assert torch.equal(plain, model(x, t, torch.zeros(len(x), 4)))
        _, labels = datasets.augment_digits(x, 1.0, gen)
        assert (model(x, t, labels) - plain).abs().max() > 1e-3
        loss = diffusion.training_loss(model, x, gen, aug=labels)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="cond given, but this denoiser was built without cond_dim"):
        diffusion.training_loss(diffusion.DigitsDDPM(channels=(8, 16)), x, gen, aug=labels)


@pytest.fixture(scope="module")
def tiny_class():
    torch.manual_seed(0)
    return diffusion.DigitsDDPM("eps", channels=(8, 16), num_classes=10).eval()


def test_a_class_conditional_ddpm_reads_its_labels(tiny_class, gen):
    x, y = datasets.digits("val", form="unit")
    t = torch.randint(0, 1000, (len(x),), generator=gen)
    with torch.no_grad():
        assert (tiny_class(x, t, labels=y) - tiny_class(x, t, labels=(y + 1) % 10)).abs().max() > 1e-4
        assert torch.isfinite(diffusion.training_loss(tiny_class, x, gen, labels=y))
        terms = diffusion.vlb_terms(tiny_class, datasets.digits("val")[0][:20], gen, stride=100, labels=y[:20])
    assert torch.isfinite(terms.neg_elbo).all()


def test_generate_samples_a_class_conditional_model_with_stratified_labels(tiny_class):
    """Without labels, generate draws x_T and then the shuffled train-proportion labels from one generator."""
    g = torch.Generator().manual_seed(4)
    torch.randn((30, 1, 8, 8), generator=g)
    labels = datasets.stratified_labels(30, "train", g)
    default = diffusion.generate(tiny_class, 30, "ddim", 4, seed=4, progress=False)
    assert torch.equal(default, diffusion.generate(tiny_class, 30, "ddim", 4, seed=4, progress=False, labels=labels))
    other = diffusion.generate(tiny_class, 30, "ddim", 4, seed=4, progress=False, labels=(labels + 1) % 10)
    assert not torch.equal(default, other)
    anc = diffusion.generate(tiny_class, 30, "ancestral", 5, seed=4, progress=False)
    assert anc.shape == (30, 1, 8, 8) and torch.isfinite(anc).all()


def test_class_conditional_bad_input(tiny, tiny_class):
    x = torch.zeros(3, 1, 8, 8)
    t = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        tiny_class(x, t)
    with pytest.raises(ValueError, match=r"class-conditional \(10 classes\): pass labels of shape \(3,\)"):
        diffusion.vlb_terms(tiny_class, torch.zeros(3, 1, 8, 8, dtype=torch.long), stride=100)
    with pytest.raises(ValueError, match="unconditional"):
        diffusion.generate(tiny, 3, "ddim", 2, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"int64 tensor of shape \(3,\), got torch.float32"):
        diffusion.generate(tiny_class, 3, "ddim", 2, labels=torch.zeros(3))
    with pytest.raises(ValueError, match=r"int64 tensor of shape \(3,\), got torch.int64 \(4,\)"):
        diffusion.generate(tiny_class, 3, "ddim", 2, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"0..9, got 0..10"):
        diffusion.generate(tiny_class, 3, "ddim", 2, labels=torch.tensor([0, 10, 2]))
    with pytest.raises(ValueError, match="num_classes must be None or an integer >= 2"):
        diffusion.DigitsDDPM(num_classes=1)
