"""Chapter 03: hierarchical VAEs, exactly on TB1's two-level model and by training on the digits.

The Markovian HVAE (Luo 2022, Sec. 2.3) with two latent levels has the generative chain
p(z2) p(z1 | z2) p(x | z1) and the encoder chain q(z1 | x) q(z2 | z1); its bound is

    log p(x) >= E_q[ log p(z2) p(z1 | z2) p(x | z1) - log q(z1 | x) q(z2 | z1) ].

`HVAE` implements that ("markov" inference) and the top-down variant of Ladder VAEs and NVAE
(Sonderby et al. 2016; Vahdat & Kautz 2020): q(z2 | x) q(z1 | x, z2), the posterior over z1 written
as a correction of the prior p(z1 | z2) ("residual"), with the decoder seeing both levels
("skip"). Training can warm the KL terms up from 0 to 1 and keep "free bits" per latent
dimension (Kingma et al. 2016); evaluation always uses the true bound. The recipe of the shipped
weights and its likelihood protocol (`train_hvae`, `protocol_metrics`) are in `dlearn.studies.hvae`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dlearn.distributions import kl_normal_diag_per_dim, levels_to_unit, log_normal_diag
from dlearn.elbo import BoundTerms, log_mean_exp
from dlearn.nets import MLP
from dlearn.toys import TwoLevelLinearGaussian
from dlearn.vae import check_images, log_likelihood_in_pieces, upsampling_head

INFERENCE = ("markov", "top_down")

# --------------------------------------------------------------------------------------------
# TB1, two levels: the Markovian bound in closed form
# --------------------------------------------------------------------------------------------


def markov_posterior_factors(model: TwoLevelLinearGaussian, x: torch.Tensor):
    """The exact posterior written as a Markov encoder q(z1 | x) q(z2 | z1) (H2).

    Because z2 -> z1 -> x is a chain, p(z2 | z1, x) = p(z2 | z1): the true posterior is
    p(z1 | x) p(z2 | z1), and the second factor is linear-Gaussian, N(gain z1 + offset, cov2).

    Returns:
        (mean1 (B, k1), cov1 (k1, k1)) and (gain (k2, k1), offset (k2,), cov2 (k2, k2)).
    """
    k2, k1, _ = model.dims
    mean, cov = model.posterior(x)  # over the stacked (z2, z1)
    jm, jc = model.joint_mean_cov()
    prior = jc[: k2 + k1, : k2 + k1]  # joint prior of (z2, z1)
    gain = torch.linalg.solve(prior[k2:, k2:], prior[k2:, :k2]).T  # S_21 S_11^{-1}
    offset = jm[:k2] - gain @ jm[k2 : k2 + k1]
    cov2 = prior[:k2, :k2] - gain @ prior[k2:, :k2]
    return (mean[:, k2:], cov[k2:, k2:]), (gain, offset, 0.5 * (cov2 + cov2.T))


def markov_q_joint(q1, q2) -> tuple[torch.Tensor, torch.Tensor]:
    """The joint Gaussian over the stacked (z2, z1) of q(z1 | x) = N(m1, C1), q(z2 | z1) = N(A z1 + c, C2).

    Returns:
        means (B, k2 + k1) and covariance (k2 + k1, k2 + k1).
    """
    (m1, c1), (a, c, c2) = q1, q2
    mean = torch.cat([m1 @ a.T + c, m1], dim=-1)
    cov = torch.cat([torch.cat([a @ c1 @ a.T + c2, a @ c1], 1), torch.cat([c1 @ a.T, c1], 1)])
    return mean, cov


def _expected_log_normal(lin: torch.Tensor, shift: torch.Tensor, var: float, mean: torch.Tensor, cov: torch.Tensor):
    """E_w[log N(lin w + shift; 0, var I)] for w ~ N(mean, cov): uses E|L w + s|^2 = |L m + s|^2 + tr(L S L^T)."""
    resid = mean @ lin.T + shift
    sq = (resid**2).sum(-1) + torch.trace(lin @ cov @ lin.T)
    return -0.5 * (lin.shape[0] * math.log(2 * math.pi * var) + sq / var)


def markov_elbo_closed_form(model: TwoLevelLinearGaussian, x: torch.Tensor, q1, q2) -> torch.Tensor:
    """The Markovian HVAE bound of TB1's two-level model for a Gaussian Markov encoder, in closed form (H3).

        E_q[log p(z2) + log p(z1 | z2) + log p(x | z1)] + H[q(z1, z2 | x)],

    each expectation of a Gaussian log-density of a linear function of w = (z2, z1) under the Gaussian q.
    """
    k2, k1, d = model.dims
    mean, cov = markov_q_joint(q1, q2)
    eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
    pick_z2 = torch.cat([eye(k2), torch.zeros(k2, k1, dtype=torch.float64)], 1)
    pick_z1 = torch.cat([torch.zeros(k1, k2, dtype=torch.float64), eye(k1)], 1)
    log_p_z2 = _expected_log_normal(pick_z2, torch.zeros(k2, dtype=torch.float64), 1.0, mean, cov)
    log_p_z1 = _expected_log_normal(pick_z1 - model.a @ pick_z2, torch.zeros(k1, dtype=torch.float64), model.s1, mean, cov)
    x = torch.as_tensor(x, dtype=torch.float64)
    resid_x = -(x - model.bias)  # x - B z1 - b = -(B z1 - (x - b))
    lin = model.b_weight @ pick_z1
    log_p_x = -0.5 * (
        d * math.log(2 * math.pi * model.s0)
        + (((mean @ lin.T + resid_x) ** 2).sum(-1) + torch.trace(lin @ cov @ lin.T)) / model.s0
    )
    entropy = torch.distributions.MultivariateNormal(mean, cov).entropy()
    return log_p_z2 + log_p_z1 + log_p_x + entropy


def markov_elbo_monte_carlo(model: TwoLevelLinearGaussian, x, q1, q2, num_samples: int, generator=None):
    """Monte Carlo estimate of the same bound from samples of the Markov encoder, per point (H3).

    Returns:
        (estimate, standard error), each (B,); also usable for any q1 (mean (B, k1), cov) and q2 (gain, offset, cov).
    """
    mvn = torch.distributions.MultivariateNormal
    (m1, c1), (a, c, c2) = q1, q2
    k2, k1, _ = model.dims
    b = x.shape[0]
    eps1 = torch.randn(num_samples, b, k1, generator=generator, dtype=torch.float64)
    z1 = m1 + eps1 @ torch.linalg.cholesky(c1).T  # z1 ~ q(z1 | x)
    m2 = z1 @ a.T + c
    eps2 = torch.randn(num_samples, b, k2, generator=generator, dtype=torch.float64)
    z2 = m2 + eps2 @ torch.linalg.cholesky(c2).T  # z2 ~ q(z2 | z1)
    log_q = mvn(m1, c1).log_prob(z1) + mvn(m2, c2).log_prob(z2)
    terms = model.log_joint(x, z1, z2) - log_q
    return terms.mean(0), terms.std(0) / math.sqrt(num_samples)


class FixedGaussianEncoder(nn.Module):
    """H4's bridge to chapter 04: a Markov encoder with no learnable parameters.

        q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I),  t = 1..T

    Every latent has the data's dimension; the schedule `one_minus_betas` (1 - beta_t, Luo's alpha_t) is a
    buffer, not a parameter.
    """

    def __init__(self, one_minus_betas: torch.Tensor):
        super().__init__()
        one_minus_betas = torch.as_tensor(one_minus_betas, dtype=torch.float64)
        if one_minus_betas.ndim != 1 or not ((one_minus_betas > 0) & (one_minus_betas < 1)).all():
            raise ValueError(f"one_minus_betas must be a 1-D tensor of values in (0, 1), got {one_minus_betas}")
        self.register_buffer("one_minus_betas", one_minus_betas)

    def forward(self, x0: torch.Tensor, generator=None) -> list[torch.Tensor]:
        """Sample the chain x_1, ..., x_T from x_0; returns the list of latents, each shaped like x0."""
        latents, x = [], x0
        for a in self.one_minus_betas:
            x = a.sqrt() * x + (1 - a).sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype)
            latents.append(x)
        return latents


# --------------------------------------------------------------------------------------------
# a two-level HVAE on the digits
# --------------------------------------------------------------------------------------------


@dataclass
class HVAEConfig:
    """Architecture and inference of `HVAE`.

    Args:
        z1_channels: the lower latent z1 is a (z1_channels, 4, 4) map, as in chapter 02's VAE.
        z2_dim: size of the upper latent vector z2.
        inference: "markov" (q(z1 | x) q(z2 | z1), Luo's MHVAE) or "top_down" (q(z2 | x) q(z1 | x, z2)).
        residual: in top-down inference, parameterise q(z1 | x, z2) relative to p(z1 | z2).
        skip: the decoder sees z2 as well as z1 (p(x | z1, z2)); False keeps the chain Markovian.
    """

    z1_channels: int = 2
    z2_dim: int = 16
    channels: tuple[int, int] = (32, 64)
    hidden: int = 256
    dropout: float = 0.1
    inference: str = "top_down"
    residual: bool = True
    skip: bool = True

    def __post_init__(self):
        if self.inference not in INFERENCE:
            raise ValueError(f"inference must be one of {INFERENCE}, got {self.inference!r}")

    @property
    def z1_dim(self) -> int:
        return 16 * self.z1_channels


def _split(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = stats.chunk(2, dim=-1)
    return mean, logvar.clamp(-12, 8)


def _maps_to_stats(maps: torch.Tensor) -> torch.Tensor:
    """(N, 2C, 4, 4) mean and log-variance maps -> (N, 2 * 16C) as [means, log-variances]."""
    c = maps.shape[1] // 2
    return torch.cat([maps[:, :c].flatten(1), maps[:, c:].flatten(1)], dim=-1)


def _stats_to_maps(stats: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of `_maps_to_stats`."""
    mean, logvar = stats.chunk(2, dim=-1)
    return torch.cat([mean.reshape(-1, channels, 4, 4), logvar.reshape(-1, channels, 4, 4)], dim=1)


class HVAE(nn.Module):
    """A two-level hierarchical VAE for the digits with categorical pixels (see the module docstring).

    z1 is a (z1_channels, 4, 4) map under a learned prior p(z1 | z2); z2 is a vector under N(0, I).
    """

    def __init__(self, config: HVAEConfig | None = None, **kwargs):
        super().__init__()
        self.config = c = config or HVAEConfig(**kwargs)
        c1, c2 = c.channels
        zc = c.z1_channels
        self.trunk = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),  # 8x8 -> 4x4
            nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU(), nn.Dropout(c.dropout),
        )  # fmt: skip
        self.prior1 = MLP(c.z2_dim, (c.hidden,), 2 * c.z1_dim)  # p(z1 | z2)
        if c.inference == "markov":
            self.q1 = nn.Conv2d(c2, 2 * zc, 3, padding=1)  # q(z1 | x)
            self.q2 = MLP(c.z1_dim, (c.hidden,), 2 * c.z2_dim)  # q(z2 | z1)
        else:
            self.q2 = MLP(16 * c2, (c.hidden,), 2 * c.z2_dim)  # q(z2 | x)
            self.q1 = nn.Sequential(  # q(z1 | x, z2), from the features and p(z1 | z2)'s maps
                nn.Conv2d(c2 + 2 * zc, c2, 3, padding=1), nn.SiLU(), nn.Conv2d(c2, 2 * zc, 3, padding=1)
            )
        self.skip = nn.Linear(c.z2_dim, 16 * zc) if c.skip else None
        self.decoder = nn.Sequential(
            nn.Conv2d(zc * (2 if c.skip else 1), c2, 3, padding=1), nn.SiLU(), nn.Dropout(c.dropout), upsampling_head(c1, c2)
        )

    def features(self, x_levels: torch.Tensor) -> torch.Tensor:
        """Bottom-up features of the images, shape (B, c2, 4, 4)."""
        return self.trunk(levels_to_unit(x_levels).to(next(self.parameters()).device))

    def posterior_z2(self, x_levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z2 | x) of top-down inference: mean and log-variance, each (B, z2_dim)."""
        if self.config.inference != "top_down":
            raise ValueError("q(z2 | x) exists only with top-down inference; the Markov encoder infers z2 from z1")
        return _split(self.q2(self.features(x_levels).flatten(1)))

    def prior_z1(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z1 | z2): mean and log-variance, each (N, z1_dim)."""
        return _split(self.prior1(z2))

    def decode(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """p(x | z1[, z2]): logits (N, 17, 1, 8, 8) from z1 (N, z1_dim) and z2 (N, z2_dim)."""
        zc = self.config.z1_channels
        h = z1.reshape(-1, zc, 4, 4)
        if self.skip is not None:
            h = torch.cat([h, self.skip(z2).reshape(-1, zc, 4, 4)], dim=1)
        return self.decoder(h).unsqueeze(2)


def _draw(model: HVAE, x_levels: torch.Tensor, num_samples: int, generator) -> dict[str, torch.Tensor]:
    """Draw K samples of (z1, z2) from q for each image and return the terms of the bound, each (K, B).

    Keys: "log_lik" log p(x | z), "log_p_z" log p(z1 | z2) + log p(z2), "log_q_z" log q(z | x), and in
    top-down inference the per-dimension analytic KLs "kl1_dims", "kl2_dims" given the parent sample.
    """
    c = model.config
    h = model.features(x_levels)  # (B, c2, 4, 4)
    b, k, dev = h.shape[0], num_samples, h.device
    eps1 = torch.randn((k * b, c.z1_dim), generator=generator).to(dev)
    eps2 = torch.randn((k * b, c.z2_dim), generator=generator).to(dev)
    hk = h.expand(k, *h.shape).reshape(k * b, *h.shape[1:])  # sample-major: row s * B + i
    if c.inference == "top_down":
        m2, lv2 = _split(model.q2(hk.flatten(1)))
        z2 = m2 + (0.5 * lv2).exp() * eps2
        pm1, plv1 = model.prior_z1(z2)
        prior_maps = _stats_to_maps(torch.cat([pm1, plv1], -1), c.z1_channels)
        d_m1, d_lv1 = _split(_maps_to_stats(model.q1(torch.cat([hk, prior_maps], 1))))
        m1, lv1 = (pm1 + d_m1, (plv1 + d_lv1).clamp(-12, 8)) if c.residual else (d_m1, d_lv1)
        z1 = m1 + (0.5 * lv1).exp() * eps1
    else:
        m1, lv1 = _split(_maps_to_stats(model.q1(hk)))
        z1 = m1 + (0.5 * lv1).exp() * eps1
        m2, lv2 = _split(model.q2(z1))
        z2 = m2 + (0.5 * lv2).exp() * eps2
        pm1, plv1 = model.prior_z1(z2)
    zeros = torch.zeros_like(z2)
    log_q = log_normal_diag(z1, m1, lv1) + log_normal_diag(z2, m2, lv2)
    log_p = log_normal_diag(z1, pm1, plv1) + log_normal_diag(z2, zeros, zeros)
    x_rep = x_levels.to(dev).expand(k, *x_levels.shape).reshape(-1, *x_levels.shape[1:])
    out = {
        "log_lik": log_likelihood_in_pieces(lambda sl: model.decode(z1[sl], z2[sl]), x_rep).reshape(k, b),
        "log_p_z": log_p.reshape(k, b),
        "log_q_z": log_q.reshape(k, b),
    }
    if c.inference == "top_down":
        out["kl1_dims"] = kl_normal_diag_per_dim(m1, lv1, pm1, plv1).reshape(k, b, -1)
        out["kl2_dims"] = kl_normal_diag_per_dim(m2, lv2, 0.0, 0.0).reshape(k, b, -1)
    return out


def elbo_terms(model: HVAE, x_levels: torch.Tensor, generator=None) -> BoundTerms:
    """One-sample estimate of the negative ELBO per image and its terms, in nats; every term is a cost.

        -ELBO = -log p(x | z1, z2) + [log q(z1, z2 | x) - log p(z1 | z2) - log p(z2)]

    at one joint draw (z1, z2) ~ q (the two-level bound of Luo 2022, Sec. 2.3, negated; top-down inference:
    Sonderby et al. 2016).

    Args:
        x_levels: the images as grey levels 0..16, shape (B, 1, 8, 8).
        generator: the noise of the draw.

    Returns:
        `BoundTerms`, each of shape (B,): reconstruction -log p(x | z) (the reconstruction NLL), prior the
        whole prior-matching part (in top-down inference the analytic KL of each level given the parent
        sample, in `parts` as "kl1" = KL(q(z1 | z2, x) || p(z1 | z2)) and "kl2" = KL(q(z2 | x) || p(z2));
        in Markov inference log q - log p at the draw, `parts` empty), latent zero, neg_elbo = prior + reconstruction.
    """
    x_levels = check_images(x_levels)
    d = _draw(model, x_levels, 1, generator)
    recon = d["log_lik"][0]
    if model.config.inference == "top_down":
        kl1, kl2 = d["kl1_dims"][0].sum(-1), d["kl2_dims"][0].sum(-1)
        kl = kl1 + kl2
        parts = {"kl1": kl1, "kl2": kl2}
    else:
        kl = (d["log_q_z"] - d["log_p_z"])[0]
        parts = {}
    return BoundTerms(reconstruction=-recon, prior=kl, latent=torch.zeros_like(kl), neg_elbo=kl - recon, parts=parts)


@torch.no_grad()
def iwae_bound(model: HVAE, x_levels: torch.Tensor, num_samples: int = 1000, generator=None, chunk: int = 20_000) -> torch.Tensor:
    """Importance-weighted bound on log p(x) with K = num_samples joint samples of (z1, z2), per image (B,)."""
    x_levels = check_images(x_levels)
    per_chunk = max(1, chunk // num_samples)
    out = []
    for i in range(0, len(x_levels), per_chunk):
        d = _draw(model, x_levels[i : i + per_chunk], num_samples, generator)
        out.append(log_mean_exp(d["log_lik"] + d["log_p_z"] - d["log_q_z"], dim=0))
    return torch.cat(out)


def training_loss(model: HVAE, x_levels, generator, step: int, warmup_steps: int = 0, free_bits: float = 0.0) -> torch.Tensor:
    """The training objective: the reconstruction NLL plus beta * KL, with beta rising linearly to 1 over
    `warmup_steps`, and each latent dimension's KL (batch mean) floored at `free_bits` nats (top-down).

    Equal to the mean negative ELBO when warmup_steps = 0 and free_bits = 0.
    """
    beta = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if model.config.inference == "markov" or free_bits == 0:
        t = elbo_terms(model, x_levels, generator)
        return (beta * t.prior + t.reconstruction).mean()
    d = _draw(model, check_images(x_levels), 1, generator)
    kl = sum(d[key][0].mean(0).clamp(min=free_bits).sum() for key in ("kl1_dims", "kl2_dims"))
    return beta * kl - d["log_lik"][0].mean()
