"""Log-densities, KL divergences and pixel likelihoods used throughout the book.

Every function returns one number per example: it sums over all dimensions but the first
(the batch), as the ELBO terms in google-research/vdm do (`# [B]`). All quantities are in nats;
bits per dimension only through `nats_to_bits_per_dim`.

The digits have 17 grey levels 0..16. The book maps level k to the value k / 8 - 1 in [-1, 1];
the bin of level k is [v - 1/16, v + 1/16], and the two outer bins extend to -inf and +inf
(Ho et al. 2020, Eq. 13, with 17 levels instead of 256).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NUM_LEVELS = 17
"""Grey levels of the scikit-learn digits (0..16)."""

HALF_BIN = 1.0 / (NUM_LEVELS - 1)
"""Half the width of one level's bin in [-1, 1] units (the levels are 2/16 apart)."""

LOG_2PI = math.log(2 * math.pi)


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-example tensor (B,) (or a scalar) to (B, 1, ..., 1) with `ndim` dimensions in all.

    The book's one broadcasting helper: every per-example schedule value (alpha_bar_t, a variance) meets
    a batch of images or points through it."""
    v = torch.as_tensor(v)
    return v.reshape(*v.shape, *([1] * (ndim - v.ndim)))


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: shape (B, ...) -> (B,)."""
    if x.ndim == 0:
        raise ValueError("expected a tensor with a batch dimension, got a scalar")
    return x.reshape(x.shape[0], -1).sum(dim=1)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


def log_normal_diag(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, diag(exp(logvar))), summed over all but the batch dimension.

        log N(x; m, s^2) = -1/2 [ log(2 pi) + log s^2 + (x - m)^2 / s^2 ]

    Args:
        x: points, shape (B, ...).
        mean: means, broadcastable to x.
        logvar: log-variances, broadcastable to x.

    Returns:
        log-density per example, shape (B,).
    """
    logvar = torch.as_tensor(logvar, dtype=x.dtype, device=x.device)
    elementwise = -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))
    if elementwise.shape != x.shape:
        raise ValueError(f"mean and logvar must broadcast to x's shape {tuple(x.shape)}, got {tuple(elementwise.shape)}")
    return sum_except_batch(elementwise)


def kl_normal_diag(
    mean_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mean_p: torch.Tensor | float = 0.0,
    logvar_p: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p))) for diagonal Gaussians.

        KL = 1/2 sum_j [ logvar_p - logvar_q + (exp(logvar_q) + (mean_q - mean_p)^2) / exp(logvar_p) - 1 ]

    With the defaults p = N(0, I) this is the VAE's prior-matching term
    1/2 sum_j (mean_j^2 + var_j - log var_j - 1) (Kingma & Welling 2014, Appendix B).

    Args:
        mean_q, logvar_q: the first Gaussian, shape (B, ...).
        mean_p, logvar_p: the second, broadcastable to mean_q (default: standard normal).

    Returns:
        KL per example in nats, shape (B,).
    """
    kl = kl_normal_diag_per_dim(mean_q, logvar_q, mean_p, logvar_p)
    return sum_except_batch(kl.expand(torch.broadcast_shapes(kl.shape, mean_q.shape)))


def kl_normal_diag_per_dim(mean_q, logvar_q, mean_p=0.0, logvar_p=0.0) -> torch.Tensor:
    """The terms of `kl_normal_diag` before the sum: one KL per dimension, shape of mean_q (for free bits)."""
    mean_p = torch.as_tensor(mean_p, dtype=mean_q.dtype, device=mean_q.device)
    logvar_p = torch.as_tensor(logvar_p, dtype=mean_q.dtype, device=mean_q.device)
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mean_q - mean_p) ** 2) * torch.exp(-logvar_p) - 1.0)


def check_levels(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Return x as int64 after checking it holds integer grey levels 0..16; raise otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of grey levels 0..16, got {type(x).__name__}")
    if x.is_floating_point():
        if not torch.equal(x, x.round()):
            raise ValueError(f"{name} must hold integer grey levels 0..16, got non-integer values")
    if x.numel() and (x.min() < 0 or x.max() > NUM_LEVELS - 1):
        raise ValueError(f"{name} must hold grey levels 0..{NUM_LEVELS - 1}, got values in [{x.min().item()}, {x.max().item()}]")
    return x.long()


def levels_to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map grey levels 0..16 to floats in [-1, 1]: v = k / 8 - 1."""
    return check_levels(x).float() / ((NUM_LEVELS - 1) / 2) - 1.0


def unit_to_levels(v: torch.Tensor) -> torch.Tensor:
    """Round floats in [-1, 1] to the nearest grey level 0..16 (values outside are clamped to the ends).

    This is a quantiser for model outputs (samples), not a check of data: use `check_levels` on data.
    """
    return ((v.clamp(-1, 1) + 1) * ((NUM_LEVELS - 1) / 2)).round().long()


def log_categorical_pixels(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log p(x) for independent categorical pixels over the 17 grey levels.

    Args:
        x: grey levels 0..16, shape (B, ...).
        logits: unnormalised log-probabilities, shape (B, 17, ...) (the class dimension second,
            as in `F.cross_entropy`).

    Returns:
        log-likelihood per example in nats, shape (B,).
    """
    x = check_levels(x)
    expected = (x.shape[0], NUM_LEVELS, *x.shape[1:])
    if tuple(logits.shape) != expected:
        raise ValueError(f"logits must have shape {expected} for x of shape {tuple(x.shape)}, got {tuple(logits.shape)}")
    return -sum_except_batch(F.cross_entropy(logits, x, reduction="none"))


def _bin_z(x: torch.Tensor, mean: torch.Tensor, inv_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised upper and lower bin edges (u_k - mean) / s and (l_k - mean) / s, always finite."""
    v = x.to(mean.dtype) / ((NUM_LEVELS - 1) / 2) - 1.0
    return (v + HALF_BIN - mean) * inv_scale, (v - HALF_BIN - mean) * inv_scale


def _log_bin_mass(x, log_cdf_upper, log_cdf_lower, log_sf_upper, log_sf_lower) -> torch.Tensor:
    """log(F(u) - F(l)) per pixel, with the outer bins open: log F(u) for level 0, log(1 - F(l)) for 16.

    The middle bins use log F(u) + log(-expm1(log F(l) - log F(u))) left of the median and the same
    with survival functions right of it, so that neither tail loses precision. All inputs are finite,
    so no NaN gradient leaks through `torch.where`.
    """
    left = log_cdf_upper + torch.log(-torch.expm1(log_cdf_lower - log_cdf_upper))
    right = log_sf_lower + torch.log(-torch.expm1(log_sf_upper - log_sf_lower))
    middle = torch.where(log_cdf_upper < math.log(0.5), left, right)
    return torch.where(x == 0, log_cdf_upper, torch.where(x == NUM_LEVELS - 1, log_sf_lower, middle))


def log_discretized_gaussian(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log P(x) of a Gaussian on [-1, 1] discretised into the 17 grey-level bins.

        P(k) = Phi((u_k - mean) / s) - Phi((l_k - mean) / s),  with l_0 = -inf and u_16 = +inf

    (Ho et al. 2020, Eq. 13, with 17 levels). Usable as a diffusion decoder p(x_0 | x_1).

    Args:
        x: grey levels 0..16, shape (B, ...).
        mean: means in [-1, 1] units, shape of x.
        logvar: log-variances, broadcastable to x.

    Returns:
        log-probability per example in nats, shape (B,).
    """
    x = check_levels(x)
    _check_same_shape(x=x, mean=mean)
    logvar = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    z_u, z_l = _bin_z(x, mean, torch.exp(-0.5 * logvar))
    ndtr = torch.special.log_ndtr
    logp = _log_bin_mass(x, ndtr(z_u), ndtr(z_l), ndtr(-z_u), ndtr(-z_l))
    return sum_except_batch(logp)


def log_discretized_logistic(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of a logistic distribution on [-1, 1] discretised into the 17 grey-level bins.

        P(k) = sigmoid((u_k - mean) / s) - sigmoid((l_k - mean) / s),  l_0 = -inf, u_16 = +inf

    (Salimans et al. 2017, PixelCNN++, Sec. 2.1, with 17 levels).

    Args:
        x: grey levels 0..16, shape (B, ...).
        mean: locations in [-1, 1] units, shape of x.
        log_scale: log of the logistic scale s, broadcastable to x.

    Returns:
        log-probability per example in nats, shape (B,).
    """
    x = check_levels(x)
    _check_same_shape(x=x, mean=mean)
    log_scale = torch.as_tensor(log_scale, dtype=mean.dtype, device=mean.device)
    z_u, z_l = _bin_z(x, mean, torch.exp(-log_scale))
    # log sigmoid(z) is the logistic log-CDF; log sigmoid(-z) its log-survival function.
    logp = _log_bin_mass(x, F.logsigmoid(z_u), F.logsigmoid(z_l), F.logsigmoid(-z_u), F.logsigmoid(-z_l))
    return sum_except_batch(logp)


def pixel_histogram_logits(train_levels: torch.Tensor, pseudo_count: float = 1.0) -> torch.Tensor:
    """The independent per-pixel baseline: each pixel's histogram of levels over a training set.

    Args:
        train_levels: grey levels 0..16, shape (N, ...).
        pseudo_count: added to every count (Laplace smoothing), so unseen levels keep some mass; > 0.

    Returns:
        log-probabilities of shape (1, 17, ...), usable as logits by `log_categorical_pixels`.
    """
    x = check_levels(train_levels, "train_levels")
    if not pseudo_count > 0:
        raise ValueError(f"pseudo_count must be > 0, got {pseudo_count}")
    counts = torch.nn.functional.one_hot(x, NUM_LEVELS).sum(0).movedim(-1, 0).double() + pseudo_count
    return (counts / counts.sum(0, keepdim=True)).log().unsqueeze(0)


def nats_to_bits_per_dim(nats: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """Convert a negative log-likelihood in nats per example to bits per dimension: nats / (D ln 2)."""
    if num_dims <= 0:
        raise ValueError(f"num_dims must be a positive number of dimensions, got {num_dims}")
    return nats / (num_dims * math.log(2))


def bits_per_dim_to_nats(bpd: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """Inverse of `nats_to_bits_per_dim`: bits/dim * D ln 2."""
    if num_dims <= 0:
        raise ValueError(f"num_dims must be a positive number of dimensions, got {num_dims}")
    return bpd * num_dims * math.log(2)


def quantise(x: torch.Tensor, step: float) -> torch.Tensor:
    """N13's lossy "autoencoder" for the toy: round to a grid of `step`."""
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    return torch.round(x / step) * step


def expected_quantisation_mse(step: float) -> float:
    """The MSE of rounding a smooth density to a grid of `step`: step^2 / 12 per coordinate."""
    return step**2 / 12 if step > 0 else math.nan
