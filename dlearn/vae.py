"""Chapter 02: the variational autoencoder on the digits and its bounds.

A VAE learns an encoder q_phi(z | x) = N(mu_phi(x), diag sigma_phi^2(x)) and a decoder p_theta(x | z)
together by maximising the ELBO (Kingma & Welling 2014; Luo 2022, Sec. 2.2):

    ELBO = E_q[log p_theta(x | z)] - KL(q_phi(z | x) || N(0, I))
           reconstruction             prior matching

`elbo_terms` reports the negative ELBO as `dlearn.elbo.BoundTerms`, each term a cost: the reconstruction
NLL -log p_theta(x | z) and the prior-matching KL.

The decoder here is a categorical distribution over the 17 grey levels of each pixel, so the
bound is a bound on the discrete likelihood of the book's protocol, in nats per image. The recipe of
the shipped weights and the likelihood protocol (`train_vae`, `evaluate`, `protocol_metrics`) are in
`dlearn.studies.vae`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dlearn import toys
from dlearn.distributions import (
    NUM_LEVELS,
    check_levels,
    kl_normal_diag,
    levels_to_unit,
    log_categorical_pixels,
)
from dlearn.elbo import BoundTerms, log_mean_exp


@dataclass
class VAEConfig:
    """Architecture of `ConvVAE`.

    Args:
        latent_dim: size of a vector latent (used when latent_channels is None).
        latent_channels: if set, the latent is a (latent_channels, 4, 4) feature map and both networks
            are fully convolutional (weight sharing across positions suits 1000 training images).
        channels: conv widths at 8x8 and 4x4.
        hidden: width of the fully connected layer of the vector-latent networks.
        dropout: dropout probability inside both networks.
    """

    latent_dim: int = 16
    latent_channels: int | None = None
    channels: tuple[int, int] = (32, 64)
    hidden: int = 256
    dropout: float = 0.1

    @property
    def size(self) -> int:
        """Number of latent dimensions."""
        return self.latent_dim if self.latent_channels is None else 16 * self.latent_channels


class ConvEncoder(nn.Module):
    """8x8 image in [-1, 1] -> a vector of `out_dim` (two convs at 8x8, a strided conv to 4x4, an MLP)."""

    def __init__(self, out_dim: int, channels=(32, 64), hidden: int = 256, dropout: float = 0.0, in_ch: int = 1):
        super().__init__()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, c1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),  # 8x8 -> 4x4
            nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(16 * c2, hidden), nn.SiLU(), nn.Linear(hidden, out_dim),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """A vector -> per-pixel logits over the 17 grey levels, shape (B, 17, 1, 8, 8)."""

    def __init__(self, in_dim: int, channels=(32, 64), hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        c1, c2 = channels
        self.c2 = c2
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden, 16 * c2), nn.SiLU())
        self.conv = upsampling_head(c1, c2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).reshape(-1, self.c2, 4, 4)
        return self.conv(h).unsqueeze(2)  # (B, 17, 1, 8, 8)


def upsampling_head(c1: int, c2: int) -> nn.Sequential:
    """(B, c2, 4, 4) -> logits (B, 17, 8, 8)."""
    return nn.Sequential(
        nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU(),
        nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.SiLU(),  # 4x4 -> 8x8
        nn.Conv2d(c1, c1, 3, padding=1), nn.SiLU(),
        nn.Conv2d(c1, NUM_LEVELS, 3, padding=1),
    )  # fmt: skip


class ConvVAE(nn.Module):
    """A convolutional VAE: diagonal-Gaussian encoder, N(0, I) prior, categorical pixels (see `VAEConfig`)."""

    def __init__(self, config: VAEConfig | None = None, **kwargs):
        super().__init__()
        self.config = c = config or VAEConfig(**kwargs)
        c1, c2 = c.channels
        if c.latent_channels is None:
            self.encoder = ConvEncoder(2 * c.latent_dim, c.channels, c.hidden, c.dropout)
            self.decoder = ConvDecoder(c.latent_dim, c.channels, c.hidden, c.dropout)
        else:
            zc = c.latent_channels
            self.encoder = nn.Sequential(
                nn.Conv2d(1, c1, 3, padding=1), nn.SiLU(),
                nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.SiLU(),  # 8x8 -> 4x4
                nn.Conv2d(c2, c2, 3, padding=1), nn.SiLU(), nn.Dropout(c.dropout),
                nn.Conv2d(c2, 2 * zc, 3, padding=1),  # mean and log-variance maps
            )  # fmt: skip
            self.decoder = nn.Sequential(
                nn.Conv2d(zc, c2, 3, padding=1), nn.SiLU(), nn.Dropout(c.dropout), upsampling_head(c1, c2)
            )

    def encode(self, x_levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x): mean and log-variance, each (B, latent size), from grey levels (B, 1, 8, 8)."""
        x = levels_to_unit(x_levels).to(next(self.parameters()).device)
        h = self.encoder(x)
        if self.config.latent_channels is None:
            mean, logvar = h.chunk(2, dim=-1)
        else:
            zc = self.config.latent_channels
            mean, logvar = h[:, :zc].flatten(1), h[:, zc:].flatten(1)
        return mean, logvar.clamp(-12, 8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """p(x | z): logits of shape (B, 17, 1, 8, 8)."""
        if self.config.latent_channels is None:
            return self.decoder(z)
        return self.decoder(z.reshape(-1, self.config.latent_channels, 4, 4)).unsqueeze(2)


def check_images(x_levels: torch.Tensor) -> torch.Tensor:
    """The images as grey levels 0..16 of shape (B, 1, 8, 8), or a ValueError saying what is wrong."""
    x_levels = check_levels(x_levels, "x_levels")
    if x_levels.ndim != 4 or x_levels.shape[1:] != (1, 8, 8):
        raise ValueError(f"expected digits of shape (B, 1, 8, 8) as grey levels, got {tuple(x_levels.shape)}")
    return x_levels


def elbo_terms(model: ConvVAE, x_levels: torch.Tensor, generator: torch.Generator | None = None) -> BoundTerms:
    """One-sample estimate of the negative ELBO per image and its two terms, in nats; every term is a cost.

        -ELBO = -E_q[log p(x | z)] + KL(q(z | x) || p(z))   (the negative of Luo 2022, Eq. 19)

    Args:
        x_levels: the images as grey levels 0..16, shape (B, 1, 8, 8).

    Returns:
        `BoundTerms`, each of shape (B,): reconstruction -log p(x | z) at one z ~ q(z | x) (the
        reconstruction NLL, >= 0 for these categorical pixels), prior KL(q(z | x) || N(0, I)) (exact),
        latent zero (a VAE has no terms in between), neg_elbo = prior + reconstruction.
    """
    x_levels = check_images(x_levels)
    mean, logvar = model.encode(x_levels)
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    z = mean + (0.5 * logvar).exp() * eps  # reparameterisation (Luo eq. 19/20 area; Kingma & Welling 2014)
    recon = log_categorical_pixels(x_levels.to(mean.device), model.decode(z))
    kl = kl_normal_diag(mean, logvar)
    return BoundTerms(reconstruction=-recon, prior=kl, latent=torch.zeros_like(kl), neg_elbo=kl - recon)


def log_likelihood_in_pieces(logits_fn, x_levels: torch.Tensor, piece: int = 2000) -> torch.Tensor:
    """log p(x_i | z_i) for many rows, decoding `piece` rows at a time: the same numbers as one big
    batch, without materialising (N, 17, 1, 8, 8) logits for N in the hundreds of thousands (which is slow).

    Args:
        logits_fn: a slice of rows -> the decoder's logits for those rows.
        x_levels: the images, one per row, shape (N, 1, 8, 8).
    """
    n = x_levels.shape[0]
    return torch.cat(
        [log_categorical_pixels(x_levels[i : i + piece], logits_fn(slice(i, i + piece))) for i in range(0, n, piece)]
    )


@torch.no_grad()
def iwae_bound(
    model: ConvVAE, x_levels: torch.Tensor, num_samples: int = 1000, generator=None, chunk: int = 20_000
) -> torch.Tensor:
    """Importance-weighted lower bound on log p(x) with K = num_samples samples of q, per image (B,).

    log p(x) >= log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x),  z_k ~ q(z | x)   (Burda et al. 2016)
    """
    x_levels = check_images(x_levels)
    out = []
    per_chunk = max(1, chunk // num_samples)
    for i in range(0, len(x_levels), per_chunk):
        xb = x_levels[i : i + per_chunk]
        mean, logvar = model.encode(xb)
        b, k = mean.shape
        eps = torch.randn((num_samples, b, k), generator=generator).to(mean.device)
        z = mean + (0.5 * logvar).exp() * eps  # (K, B, k)
        log_q = (-0.5 * (math.log(2 * math.pi) + logvar + eps**2)).sum(-1)
        log_prior = (-0.5 * (math.log(2 * math.pi) + z**2)).sum(-1)
        x_rep = xb.to(mean.device).expand(num_samples, *xb.shape).reshape(-1, *xb.shape[1:])
        flat = z.reshape(-1, k)
        log_lik = log_likelihood_in_pieces(lambda sl, flat=flat: model.decode(flat[sl]), x_rep).reshape(num_samples, b)
        out.append(log_mean_exp(log_lik + log_prior - log_q, dim=0))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# V2, V3, V5: the two terms of the ELBO on TB1, in closed form
# --------------------------------------------------------------------------------------------


def reconstruction_term(model: toys.LinearGaussianLatent, x, q_mean, q_cov) -> torch.Tensor:
    """E_q[log p(x | z)] for TB1 and q = N(q_mean, q_cov), exactly, shape (B,).

    = -d/2 log(2 pi s2) - (|x - W m - b|^2 + tr(W S W^T)) / (2 s2)
    """
    x, q_mean, q_cov = (torch.as_tensor(t, dtype=torch.float64) for t in (x, q_mean, q_cov))
    resid = x - q_mean @ model.weight.T - model.bias
    tr = torch.diagonal(model.weight @ q_cov @ model.weight.T, dim1=-2, dim2=-1).sum(-1)
    return -0.5 * model.data_dim * math.log(2 * math.pi * model.sigma2) - ((resid**2).sum(-1) + tr) / (2 * model.sigma2)


def prior_matching_term(q_mean, q_cov) -> torch.Tensor:
    """KL(N(q_mean, q_cov) || N(0, I)) exactly, shape (B,): 1/2 (|m|^2 + tr S - k - log det S)."""
    q_mean, q_cov = torch.as_tensor(q_mean, dtype=torch.float64), torch.as_tensor(q_cov, dtype=torch.float64)
    k = q_mean.shape[-1]
    tr = torch.diagonal(q_cov, dim1=-2, dim2=-1).sum(-1)
    return 0.5 * ((q_mean**2).sum(-1) + tr - k - torch.logdet(q_cov))


def reconstruction_monte_carlo(model: toys.LinearGaussianLatent, x, q_mean, q_cov, num_samples: int, generator=None):
    """(1/L) sum_l log p(x | z_l), z_l ~ q: the Monte Carlo reconstruction term (Luo Sec. 2.2), shape (B,)."""
    chol = torch.linalg.cholesky(torch.as_tensor(q_cov, dtype=torch.float64))
    eps = torch.randn(num_samples, *q_mean.shape, generator=generator, dtype=torch.float64)
    z = q_mean + (chol @ eps[..., None])[..., 0] if chol.ndim == 3 else q_mean + eps @ chol.T
    return model.log_likelihood(x, z).mean(0)


# --------------------------------------------------------------------------------------------
# V7: two gradient estimators of d/dmu E_{z ~ N(mu, sigma^2)}[f(z)]
# --------------------------------------------------------------------------------------------


def reparam_gradient_samples(f, mu: float, sigma: float, num_samples: int, generator=None) -> torch.Tensor:
    """Per-sample reparameterisation estimates of d/dmu E[f(z)], z = mu + sigma eps: f'(mu + sigma eps), shape (N,).

    Each z_i depends on mu with dz_i/dmu = 1, so one backward pass through f(z).sum() gives every
    sample's own estimate f'(z_i).
    """
    eps = torch.randn(num_samples, generator=generator, dtype=torch.float64)
    z = (mu + sigma * eps).requires_grad_(True)
    (per_sample,) = torch.autograd.grad(f(z).sum(), z)
    return per_sample


def score_function_gradient_samples(
    f, mu: float, sigma: float, num_samples: int, generator=None, baseline: float | None = None
) -> torch.Tensor:
    """Per-sample score-function (REINFORCE) estimates (f(z) - b) (z - mu) / sigma^2 of d/dmu E[f(z)], shape (N,).

    Args:
        baseline: b, a constant subtracted from f (None: no baseline). Unbiased for any constant b.
    """
    eps = torch.randn(num_samples, generator=generator, dtype=torch.float64)
    z = mu + sigma * eps
    fz = f(z) - (baseline or 0.0)
    return fz * (z - mu) / sigma**2


# --------------------------------------------------------------------------------------------
# V9: a linear-Gaussian VAE recovers probabilistic PCA
# --------------------------------------------------------------------------------------------


def ppca_fit(x: torch.Tensor, latent_dim: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Maximum-likelihood probabilistic PCA (Tipping & Bishop 1999, Eqs. 7-8).

        sigma2 = mean of the d - k smallest eigenvalues of the sample covariance
        W      = U_k (Lambda_k - sigma2 I)^{1/2}

    Args:
        x: data, shape (N, d).

    Returns:
        W (d, k), b = the data mean (d,), sigma2.
    """
    x = x.double()
    b = x.mean(0)
    cov = (x - b).T @ (x - b) / x.shape[0]  # the ML (biased) covariance
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0), vecs.flip(1)
    sigma2 = vals[latent_dim:].mean().item()
    w = vecs[:, :latent_dim] * (vals[:latent_dim] - sigma2).clamp(min=0).sqrt()
    return w, b, sigma2


def ppca_log_likelihood(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, sigma2: float) -> torch.Tensor:
    """log N(x; b, W W^T + sigma2 I) per row, shape (N,)."""
    cov = w @ w.T + sigma2 * torch.eye(w.shape[0], dtype=torch.float64)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x.double())


class LinearGaussianVAE(nn.Module):
    """A VAE whose encoder and decoder are linear: q(z | x) = N(A x + c, diag(s)), p(x | z) = N(W z + b, sigma2 I)."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.enc = nn.Linear(data_dim, latent_dim).double()
        self.enc_logvar = nn.Parameter(torch.zeros(latent_dim, dtype=torch.float64))
        self.dec = nn.Linear(latent_dim, data_dim).double()
        self.log_sigma2 = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """The ELBO in closed form (the Gaussian decoder's expectation is analytic), per row, shape (N,).

        E_q log p(x | z) = -d/2 log(2 pi sigma2) - (|x - W m - b|^2 + tr(W diag(s) W^T)) / (2 sigma2)
        """
        x = x.double()
        d = x.shape[1]
        m, s = self.enc(x), self.enc_logvar.exp()
        w = self.dec.weight
        resid = x - self.dec(m)
        sigma2 = self.log_sigma2.exp()
        recon = -0.5 * d * (math.log(2 * math.pi) + self.log_sigma2) - ((resid**2).sum(1) + (w**2 @ s).sum()) / (2 * sigma2)
        kl = 0.5 * (m**2 + s - self.enc_logvar - 1).sum(1)
        return recon - kl


def fit_linear_vae(x: torch.Tensor, latent_dim: int, steps: int = 4000, lr: float = 0.02, seed: int = 0) -> LinearGaussianVAE:
    """Train a `LinearGaussianVAE` on all of x (full batch, Adam) to convergence."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LinearGaussianVAE(x.shape[1], latent_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        (-model.elbo(x).mean()).backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def decoder_mean(model: ConvVAE, z: torch.Tensor) -> torch.Tensor:
    """The mean image of p(x | z) in [-1, 1] units, shape (B, 1, 8, 8): sum_k P(level k) (k / 8 - 1)."""
    probs = F.softmax(model.decode(z), dim=1)  # (B, 17, 1, 8, 8)
    values = torch.linspace(-1, 1, NUM_LEVELS, device=probs.device).reshape(1, -1, 1, 1, 1)
    return (probs * values).sum(1)


@torch.no_grad()
def sample(model: ConvVAE, num_samples: int, generator=None) -> torch.Tensor:
    """Draw digits from the model: z ~ N(0, I), then every pixel's level from p(x | z). Levels (N, 1, 8, 8)."""
    z = torch.randn(num_samples, model.config.size, generator=generator).to(next(model.parameters()).device)
    probs = F.softmax(model.decode(z), dim=1).movedim(1, -1).reshape(-1, NUM_LEVELS).cpu()
    return torch.multinomial(probs, 1, generator=generator).reshape(num_samples, 1, 8, 8)


@torch.no_grad()
def interpolate(model: ConvVAE, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 11) -> torch.Tensor:
    """Decoder means along the straight line between the posterior means of two images, (steps, 1, 8, 8)."""
    (m_a, _), (m_b, _) = model.encode(x_a[None]), model.encode(x_b[None])
    w = torch.linspace(0, 1, steps, device=m_a.device)[:, None]
    return decoder_mean(model, (1 - w) * m_a + w * m_b)


@torch.no_grad()
def single_label_change(model: ConvVAE, classifier: nn.Module, x_a, x_b, label_a: int, label_b: int, steps: int = 21) -> bool:
    """Whether the classifier's label along `interpolate(model, x_a, x_b)` goes from label_a to label_b in one change."""
    device = next(classifier.parameters()).device
    path = interpolate(model, x_a, x_b, steps).to(device)
    labels = classifier(path).argmax(1).cpu()
    return bool(labels[0] == label_a and labels[-1] == label_b and int((labels[1:] != labels[:-1]).sum()) == 1)


def reconstruction_mse(model: ConvVAE, x_levels: torch.Tensor) -> float:
    """Mean squared error in [-1, 1] units between images and the decoder's mean at z = E[z | x]."""
    with torch.no_grad():
        mean, _ = model.encode(x_levels)
        recon = decoder_mean(model, mean)
    return ((recon.cpu() - levels_to_unit(x_levels)) ** 2).mean().item()
