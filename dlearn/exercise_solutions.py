"""Reference solutions of the exercises of `dlearn.exercises`, one per key, each with its derivation.

Kept apart from the chapters: no chapter module imports this one. `answer(key)` gives what a student would
pass to `exercises.check(key, ...)`: the function itself for a function answer, and for a number answer the
value that the documented function computes (derivations from their closed form, experiments by measuring).
"""

from __future__ import annotations

import math

import torch

from dlearn import distributions, elbo, exercises, hvae, toys, vae

# --------------------------------------------------------------------------------------------
# chapter 01
# --------------------------------------------------------------------------------------------


def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    """01.1: log((1/K) sum_k exp(log_w_k)) = m + log((1/K) sum_k exp(log_w_k - m)) with m = max_k log_w_k.

    Subtracting the largest log-weight makes the largest term exp(0) = 1: nothing overflows, and the sum is
    at least 1, so its log does not underflow either.
    """
    m = log_w.max(dim=0).values
    return m + torch.log(torch.exp(log_w - m).mean(dim=0))


def gap_at_the_prior() -> float:
    """01.2: log p(x) - ELBO(q) = KL(q || p(z | x)) (chapter 01's identity).

    At x = b the posterior is N(0, M^{-1}) with M = W^T W / sigma2 + I, and q = N(0, I), so
        KL(N(0, I) || N(0, M^{-1})) = 1/2 (tr(M) - k - log det M).
    """
    model = toys.linear_gaussian()
    k = model.latent_dim
    m = model.weight.T @ model.weight / model.sigma2 + torch.eye(k, dtype=torch.float64)
    return 0.5 * (torch.trace(m) - k - torch.logdet(m)).item()


def iwae_fraction(num_repeats: int = 20_000, seed: int = 0) -> float:
    """01.3 (experiment): the fraction (L_10 - ELBO) / (log p(x) - ELBO) closed by K = 10 importance samples.

    Draws `num_repeats` independent bounds L_10 (one q per draw, so no two share their z) and averages them;
    the ELBO and log p(x) are TB1's closed forms. Its standard error at 20,000 draws is about 0.002.
    """
    model, x, q = exercises.iwae_experiment_setting()
    many = torch.distributions.MultivariateNormal(q.mean.expand(num_repeats, -1), q.covariance_matrix[0])
    bounds = elbo.iwae_bound(model.log_joint, many, x.expand(num_repeats, -1), 10, torch.Generator().manual_seed(seed))
    elbo_q = elbo.elbo_closed_form(model, x, q.mean, q.covariance_matrix[0])[0].item()
    return (bounds.mean().item() - elbo_q) / (model.log_marginal(x)[0].item() - elbo_q)


def elbo_1d(x, m, s2, w, b, sigma2):
    """01.4: the ELBO of z ~ N(0, 1), x | z ~ N(w z + b, sigma2), q = N(m, s2), term by term:

    E_q[log p(z)]     = -1/2 log(2 pi) - (m^2 + s2) / 2
    E_q[log p(x | z)] = -1/2 log(2 pi sigma2) - ((x - w m - b)^2 + w^2 s2) / (2 sigma2)
    H[q]              =  1/2 log(2 pi e s2)
    """
    prior = -0.5 * math.log(2 * math.pi) - 0.5 * (m**2 + s2)
    recon = -0.5 * torch.log(2 * math.pi * sigma2) - ((x - w * m - b) ** 2 + w**2 * s2) / (2 * sigma2)
    entropy = 0.5 * torch.log(2 * math.pi * math.e * s2)
    return prior + recon + entropy


# --------------------------------------------------------------------------------------------
# chapter 02
# --------------------------------------------------------------------------------------------


def kl_diag(mean_q, logvar_q, mean_p, logvar_p):
    """02.1: KL(N(mu_q, s_q^2) || N(mu_p, s_p^2)) = E_q[log q - log p]
        = 1/2 [log s_p^2 - log s_q^2 + (s_q^2 + (mu_q - mu_p)^2) / s_p^2 - 1],
    using E_q[(z - mu_p)^2] = s_q^2 + (mu_q - mu_p)^2 and E_q[(z - mu_q)^2] = s_q^2.
    """
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p) ** 2) / logvar_p.exp() - 1)


def best_baseline() -> float:
    """02.2: with eps = (z - mu) / sigma, the estimator is (f(z) - b) eps / sigma. E[eps] = 0, so b adds nothing to
    the mean (unbiased for any b); its variance E[(f - b)^2 eps^2] / sigma^2 - (E f')^2 is a parabola in b with
    vertex b* = E[f(z) eps^2] / E[eps^2]. For f(z) = z^2, mu = sigma = 1: z = 1 + eps,
        b* = E[(1 + eps)^2 eps^2] = E[eps^2] + 2 E[eps^3] + E[eps^4] = 1 + 0 + 3 = 4,
    not the mean of f (E f = 2, the usual choice).
    """
    return 4.0


def neg_elbo(x_levels, mean, logvar, eps, decode):
    """02.3: the VAE's negative ELBO per image at one draw: z = mean + exp(logvar / 2) eps (reparameterisation),
    the closed-form KL to N(0, I), and the categorical reconstruction cost summed over the 64 pixels."""
    z = mean + torch.exp(0.5 * logvar) * eps
    log_probs = torch.log_softmax(decode(z), dim=1)  # (B, 17, 1, 8, 8)
    log_lik = log_probs.gather(1, x_levels.unsqueeze(1)).sum((1, 2, 3, 4))
    kl = 0.5 * (mean**2 + logvar.exp() - logvar - 1).sum(1)
    return kl - log_lik


def variance_ratio(num_samples: int = 200_000, seed: int = 0) -> float:
    """02.4 (experiment): Var(score function) / Var(reparameterisation) of per-sample estimates of d/dmu E[f(z)],
    f(z) = (z - c)^2, measured with chapter 02's two estimators (exact value by quadrature: 55.5)."""
    mu, sigma, c = exercises.score_function_setting()
    f = lambda z: (z - c) ** 2  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    rep = vae.reparam_gradient_samples(f, mu, sigma, num_samples, g)
    sf = vae.score_function_gradient_samples(f, mu, sigma, num_samples, g)
    return (sf.var() / rep.var()).item()


# --------------------------------------------------------------------------------------------
# chapter 03
# --------------------------------------------------------------------------------------------


def two_level_neg_elbo(log_lik, m1, lv1, pm1, plv1, m2, lv2):
    """03.1: -ELBO = -log p(x | z1, z2) + KL(q(z1 | x, z2) || p(z1 | z2)) + KL(q(z2 | x) || N(0, I)),
    each KL the diagonal-Gaussian closed form summed over dimensions (`distributions.kl_normal_diag`)."""
    return distributions.kl_normal_diag(m1, lv1, pm1, plv1) + distributions.kl_normal_diag(m2, lv2) - log_lik


def warmup_loss(recon_nll, kl_dims, step, warmup_steps, free_bits):
    """03.2: as `hvae.training_loss`: kappa = min(1, (step + 1) / warmup_steps) (1 without warm-up), and each
    dimension's batch-mean KL floored at free_bits before the sum."""
    kappa = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return recon_nll.mean() + kappa * kl_dims.mean(0).clamp(min=free_bits).sum()


def ignored_input_gap() -> float:
    """03.3: by the chain rule of the KL, with q(z1 | x) = p(z1 | x) exact,
        gap = KL(q(z1, z2 | x) || p(z1, z2 | x)) = E_{q(z1|x)}[KL(q(z2 | z1) || p(z2 | z1))],
    and p(z2 | z1) = N(G z1 + o, C2) (`hvae.markov_posterior_factors`). For q(z2 | z1) = N(0, I),
        KL = 1/2 [tr(C2^{-1}) - k2 + log det C2 + (G z1 + o)^T C2^{-1} (G z1 + o)],
    and over z1 ~ N(m1, C1): E[(G z1 + o)^T C2^{-1} (G z1 + o)] = (G m1 + o)^T C2^{-1} (G m1 + o) + tr(C2^{-1} G C1 G^T).
    """
    model, x = exercises.two_level_setting()
    (m1, c1), (gain, offset, c2) = hvae.markov_posterior_factors(model, x)
    k2 = c2.shape[0]
    prec = torch.linalg.inv(c2)
    mean = m1[0] @ gain.T + offset
    quad = mean @ prec @ mean + torch.trace(prec @ gain @ c1 @ gain.T)
    return 0.5 * (torch.trace(prec) - k2 + torch.logdet(c2) + quad).item()


def perturbed_gap(num_samples: int = 200_000, seed: int = 0) -> float:
    """03.4 (experiment): log p(x) minus the Monte Carlo bound of the perturbed encoder (SE about 0.006)."""
    model, x = exercises.two_level_setting()
    q1, q2 = exercises.perturbed_encoder(model, x)
    bound, _ = hvae.markov_elbo_monte_carlo(model, x, q1, q2, num_samples, torch.Generator().manual_seed(seed))
    return (model.log_marginal(x) - bound)[0].item()


SOLUTIONS = {
    "01.1": log_mean_exp, "01.2": gap_at_the_prior, "01.3": iwae_fraction, "01.4": elbo_1d,
    "02.1": kl_diag, "02.2": best_baseline, "02.3": neg_elbo, "02.4": variance_ratio,
    "03.1": two_level_neg_elbo, "03.2": warmup_loss, "03.3": ignored_input_gap, "03.4": perturbed_gap,
}  # fmt: skip


def answer(key: str):
    """What to pass to `exercises.check(key, ...)`: the solution function, or the number it computes."""
    if key not in SOLUTIONS:
        raise ValueError(f"no solution for {key!r}; known keys: {sorted(SOLUTIONS)}")
    solution = SOLUTIONS[key]
    return solution() if exercises.REGISTRY[key].answer_type == "number" else solution
