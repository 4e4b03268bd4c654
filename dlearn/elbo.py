"""Chapter 01: the evidence lower bound, on models where log p(x) is known exactly.

For a latent-variable model p(x, z) = p(z) p(x | z) and any distribution q(z) over the latent,

    log p(x) = ELBO(q) + KL(q(z) || p(z | x)),   ELBO(q) = E_q[log p(x, z) - log q(z)]

(Luo 2022, Sec. 2.1). The functions here compute every term of that identity in closed form for
TB1 (`toys.LinearGaussianLatent`) and by Monte Carlo for any model, plus the
importance-weighted bound (Burda et al. 2016) that tightens the ELBO as its sample count K grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dlearn.toys import LinearGaussianLatent

MVN = torch.distributions.MultivariateNormal


@dataclass(frozen=True)
class BoundTerms:
    """The terms of a negative ELBO, per example, in nats: every model of the book reports its bound so.

        -ELBO = reconstruction + prior + latent

    Each term is a cost, shape (B,):
        reconstruction: -log p(x | z) at the latent nearest the data (one draw): the reconstruction NLL;
            a diffusion's decoder term L_0.
        prior: how far the top of the latent hierarchy is from its prior: KL(q(z | x) || p(z)) for a VAE,
            the whole prior-matching part of an HVAE, KL(q(x_T | x_0) || N(0, I)) = L_T for a diffusion.
        latent: the terms in between, zero where a model has none (a VAE, an HVAE): a diffusion's
            denoising matching, sum_t L_{t-1}, or its continuous-time limit (Kingma et al. 2021, Eq. 17).
        neg_elbo: the bound, computed by the model in the order it sums its terms.
        parts: a model's finer split of a term, e.g. an HVAE's KL of each level ("kl1", "kl2").
    """

    reconstruction: torch.Tensor
    prior: torch.Tensor
    latent: torch.Tensor
    neg_elbo: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        shape = self.neg_elbo.shape
        for name in ("reconstruction", "prior", "latent"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.shape != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"BoundTerms.{name} must be a tensor of the bound's shape {tuple(shape)}, got {got}")


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log((1/K) sum_k exp(log_w_k)) along `dim`, computed stably."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def elbo_closed_form(model: LinearGaussianLatent, x: torch.Tensor, q_mean: torch.Tensor, q_cov: torch.Tensor) -> torch.Tensor:
    """ELBO of a Gaussian q(z) = N(q_mean, q_cov) for TB1, exactly:

        E_q[log p(z)]     = -k/2 log 2 pi - 1/2 (|m|^2 + tr S)
        E_q[log p(x | z)] = -d/2 log(2 pi s2) - (|x - W m - b|^2 + tr(W S W^T)) / (2 s2)
        H[q]              =  k/2 (1 + log 2 pi) + 1/2 log det S

    Args:
        x: data points, shape (B, d).
        q_mean: means of q, one per point, shape (B, k).
        q_cov: covariance of q, shape (k, k) (shared) or (B, k, k).

    Returns:
        ELBO per point, shape (B,).
    """
    k, d, s2 = model.latent_dim, model.data_dim, model.sigma2
    x, q_mean, q_cov = (torch.as_tensor(t, dtype=torch.float64) for t in (x, q_mean, q_cov))
    if q_mean.shape != (x.shape[0], k) or q_cov.shape[-2:] != (k, k):
        raise ValueError(
            f"need q_mean ({x.shape[0]}, {k}) and q_cov (..., {k}, {k}), got {tuple(q_mean.shape)}, {tuple(q_cov.shape)}"
        )
    tr_s = torch.diagonal(q_cov, dim1=-2, dim2=-1).sum(-1)
    prior = -0.5 * k * math.log(2 * math.pi) - 0.5 * ((q_mean**2).sum(-1) + tr_s)
    resid = x - q_mean @ model.weight.T - model.bias
    tr_wsw = torch.diagonal(model.weight @ q_cov @ model.weight.T, dim1=-2, dim2=-1).sum(-1)
    recon = -0.5 * d * math.log(2 * math.pi * s2) - ((resid**2).sum(-1) + tr_wsw) / (2 * s2)
    entropy = 0.5 * k * (1 + math.log(2 * math.pi)) + 0.5 * torch.logdet(q_cov)
    return prior + recon + entropy


def kl_gaussians(mean_q, cov_q, mean_p, cov_p) -> torch.Tensor:
    """KL(N(mean_q, cov_q) || N(mean_p, cov_p)) for full covariances, per row of the means."""
    return torch.distributions.kl_divergence(MVN(mean_q, cov_q), MVN(mean_p, cov_p))


def kl_to_posterior(model: LinearGaussianLatent, x, q_mean, q_cov) -> torch.Tensor:
    """KL(q(z) || p(z | x)) for TB1, exactly (the gap between log p(x) and the ELBO), shape (B,)."""
    post_mean, post_cov = model.posterior(x)
    q_cov = torch.as_tensor(q_cov, dtype=torch.float64)
    return kl_gaussians(torch.as_tensor(q_mean, dtype=torch.float64), q_cov, post_mean, post_cov)


def rsample(q: torch.distributions.Distribution, num_samples: int, generator=None) -> torch.Tensor:
    """Reparameterised samples z = mu + L eps of a Gaussian q, eps ~ N(0, I) drawn from `generator`.

    Args:
        q: a `MultivariateNormal`, or an `Independent(Normal)` / `Normal` (diagonal), batch shape (B,).

    Returns:
        samples of shape (num_samples, B, k); gradients flow to q's parameters.
    """
    base = q.base_dist if isinstance(q, torch.distributions.Independent) else q
    shape = (num_samples, *q.batch_shape, *q.event_shape)
    eps = torch.randn(shape, generator=generator, dtype=base.mean.dtype, device=base.mean.device)
    if isinstance(base, MVN):
        return base.loc + (base.scale_tril @ eps[..., None])[..., 0]
    if isinstance(base, torch.distributions.Normal):
        return base.loc + base.scale * eps
    raise TypeError(f"q must be a Gaussian (MultivariateNormal or Normal), got {type(q).__name__}")


def elbo_monte_carlo(log_joint, q: torch.distributions.Distribution, x: torch.Tensor, num_samples: int, generator=None):
    """Monte Carlo ELBO from samples of q only: the mean over z_i ~ q of log p(x, z_i) - log q(z_i).

    Args:
        log_joint: (x, z) -> log p(x, z), z with a leading sample dimension (N, B, k).
        q: a Gaussian over z with batch shape (B,) (see `rsample`).
        x: data, shape (B, d).
        num_samples: N.

    Returns:
        (estimate, standard error), each of shape (B,).
    """
    z = rsample(q, num_samples, generator)  # (N, B, k)
    terms = log_joint(x, z) - q.log_prob(z)  # (N, B)
    return terms.mean(0), terms.std(0) / math.sqrt(num_samples)


def iwae_bound(log_joint, q: torch.distributions.Distribution, x: torch.Tensor, num_samples: int, generator=None):
    """The importance-weighted bound log (1/K) sum_k p(x, z_k) / q(z_k), z_k ~ q (Burda et al. 2016, Eq. 8).

    K = 1 is the ELBO (in expectation); the expected bound rises monotonically with K to log p(x).

    Returns:
        one draw of the bound per point, shape (B,).
    """
    z = rsample(q, num_samples, generator)
    return log_mean_exp(log_joint(x, z) - q.log_prob(z), dim=0)


def naive_log_evidence(model: LinearGaussianLatent, x: torch.Tensor, num_samples: int, generator=None) -> torch.Tensor:
    """log of (1/N) sum_i p(x | z_i) with z_i ~ p(z): unbiased for p(x), biased low in log, noisy (E2)."""
    z = torch.randn(num_samples, x.shape[0], model.latent_dim, generator=generator, dtype=torch.float64)
    return log_mean_exp(model.log_likelihood(x, z), dim=0)


def fit_gaussian_q(model: LinearGaussianLatent, x: torch.Tensor, steps: int = 3000, lr: float = 0.05, seed: int = 0):
    """Maximise the closed-form ELBO over q = N(m, L L^T) for one point x (gradient ascent with Adam).

    Returns:
        the fitted (mean, cov) and a history (steps + 1, 2) of (ELBO, KL to the true posterior) per step.
    """
    if x.ndim != 1 or x.shape[0] != model.data_dim:
        raise ValueError(f"x must be one point of shape ({model.data_dim},), got {tuple(x.shape)}")
    g = torch.Generator().manual_seed(seed)
    k = model.latent_dim
    mean = torch.randn(k, generator=g, dtype=torch.float64).requires_grad_(True)
    raw = (torch.randn(k, k, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    opt = torch.optim.Adam([mean, raw], lr=lr)
    history = []

    def current():
        chol = torch.tril(raw, -1) + torch.diag(torch.nn.functional.softplus(torch.diagonal(raw)) + 1e-6)
        return mean, chol @ chol.T

    for step in range(steps + 1):
        m, cov = current()
        elbo = elbo_closed_form(model, x[None], m[None], cov)[0]
        with torch.no_grad():
            history.append((elbo.item(), kl_to_posterior(model, x[None], m[None], cov)[0].item()))
        if step == steps:
            break
        opt.zero_grad()
        (-elbo).backward()
        opt.step()
    m, cov = current()
    return m.detach(), cov.detach(), torch.tensor(history, dtype=torch.float64)
