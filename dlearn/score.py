"""Chapter 06: the score view of diffusion: Tweedie's formula, score matching, Langevin dynamics and the
probability-flow ODE.

For the variance-preserving process x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = alpha_bar_t; Luo 2022, Sec. 2.6):

    Tweedie:  sqrt(a) E[x0 | x_t] = x_t + (1 - a) grad log p(x_t)                       (Luo eq. 133)
    score:    grad log p(x_t) = -E[eps | x_t] / sqrt(1 - a)                              (Luo eq. 151)
    mean:     mu_q = (x_t + beta_t grad log p(x_t)) / sqrt(1 - beta_t)                   (Luo eq. 143)

so a network may predict x0, eps or the score: three targets with closed-form conversions.
Variable name -> symbol: `a` alpha_bar_t, `one_minus_beta` 1 - beta_t = alpha_bar_t / alpha_bar_{t-1} (Luo's alpha_t),
`s` a score value.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dlearn.distributions import append_dims
from dlearn.nets import MLP, sinusoidal_embedding
from dlearn.toys import GaussianMixture
from dlearn.train import show_progress
from dlearn.vdm import posterior_variance

# --------------------------------------------------------------------------------------------
# Tweedie's formula and the three targets
# --------------------------------------------------------------------------------------------


def _a(alpha_bar, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(alpha_bar, dtype=like.dtype, device=like.device)
    if ((a <= 0) | (a > 1)).any():
        raise ValueError(f"alpha_bar must be in (0, 1], got {a.min().item()} .. {a.max().item()}")
    return append_dims(a, like.ndim)


def tweedie_denoiser(z: torch.Tensor, score: torch.Tensor, noise_var) -> torch.Tensor:
    """Tweedie's formula for z = mu + noise, noise ~ N(0, noise_var I): E[mu | z] = z + noise_var * grad log p(z)."""
    if score.shape != z.shape:
        raise ValueError(f"score must have z's shape {tuple(z.shape)}, got {tuple(score.shape)}")
    return z + torch.as_tensor(noise_var, dtype=z.dtype) * score


def tweedie_quadrature_1d(prior_log_prob: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, noise_std: float,
                          grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """E[mu | z] and grad log p(z) for z = mu + noise_std * eps, by quadrature over `grid` (1-D).

    p(z) = int p(mu) N(z; mu, s^2) dmu, E[mu | z] = int mu p(mu) N(z; mu, s^2) dmu / p(z), and the score is
    d/dz log p(z) = int (mu - z) / s^2 p(mu) N(z; mu, s^2) dmu / p(z). The two are computed independently,
    so that Tweedie's formula E[mu | z] = z + s^2 score(z) can be checked, not assumed.

    Returns:
        (posterior means, scores), each of z's shape.
    """
    if not noise_std > 0:
        raise ValueError(f"noise_std must be positive, got {noise_std}")
    mu = grid.reshape(1, -1).double()
    zz = z.double().reshape(-1, 1)
    logw = prior_log_prob(mu) - (zz - mu) ** 2 / (2 * noise_std**2)  # (B, G), up to constants
    w = torch.softmax(logw, dim=1)  # quadrature weights of the posterior over the grid
    mean = (w * mu).sum(1)
    score = (w * (mu - zz)).sum(1) / noise_std**2
    return mean.reshape(z.shape), score.reshape(z.shape)


def x0_from_score(x_t: torch.Tensor, score: torch.Tensor, alpha_bar) -> torch.Tensor:
    """x0_hat = (x_t + (1 - a) s) / sqrt(a) (Tweedie applied to q(x_t | x0); Luo eq. 133)."""
    a = _a(alpha_bar, x_t)
    return (x_t + (1 - a) * score) / a.sqrt()


def score_from_eps(eps: torch.Tensor, alpha_bar) -> torch.Tensor:
    """s = -eps / sqrt(1 - a) (Luo eq. 151)."""
    a = _a(alpha_bar, eps)
    if (a >= 1).any():
        raise ValueError("the score is undefined at alpha_bar = 1 (no noise)")
    return -eps / (1 - a).sqrt()


def eps_from_score(score: torch.Tensor, alpha_bar) -> torch.Tensor:
    """eps = -sqrt(1 - a) s, the inverse of `score_from_eps`."""
    return -(1 - _a(alpha_bar, score)).sqrt() * score


def posterior_mean_score_form(x_t: torch.Tensor, score: torch.Tensor, alpha_bar_t, alpha_bar_prev) -> torch.Tensor:
    """mu_q = x_t / sqrt(1 - beta_t) + beta_t / sqrt(1 - beta_t) * score (Luo eq. 143), 1 - beta_t = a_t / a_prev."""
    one_minus_beta = _a(alpha_bar_t, x_t) / _a(alpha_bar_prev, x_t)
    return x_t / one_minus_beta.sqrt() + (1 - one_minus_beta) / one_minus_beta.sqrt() * score


def score_loss_weight(alpha_bar_t, alpha_bar_prev):
    """The denoising KL as a score regression: beta_t^2 / (2 sigma_q^2 (1 - beta_t)) |s_theta - s|^2 (Luo eq. 148)."""
    one_minus_beta = alpha_bar_t / alpha_bar_prev
    return (1 - one_minus_beta) ** 2 / (2 * posterior_variance(alpha_bar_t, alpha_bar_prev) * one_minus_beta)


# --------------------------------------------------------------------------------------------
# Score matching
# --------------------------------------------------------------------------------------------


def conditional_score(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar) -> torch.Tensor:
    """grad_{x_t} log q(x_t | x0) = -(x_t - sqrt(a) x0) / (1 - a): the denoising score matching target."""
    a = _a(alpha_bar, x_t)
    return -(x_t - a.sqrt() * x0) / (1 - a)


def dsm_loss(score_fn: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, alpha_bar, eps: torch.Tensor) -> torch.Tensor:
    """Denoising score matching per example: |s(x_t) - grad log q(x_t | x0)|^2 with x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    a = _a(alpha_bar, x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return ((score_fn(x_t) - conditional_score(x_t, x0, alpha_bar)) ** 2).reshape(len(x0), -1).sum(1)


def esm_loss(score_fn: Callable[[torch.Tensor], torch.Tensor], x_t: torch.Tensor, true_score: torch.Tensor) -> torch.Tensor:
    """Explicit score matching per example: |s(x_t) - grad log p(x_t)|^2 (needs the true score: toy worlds only)."""
    return ((score_fn(x_t) - true_score) ** 2).reshape(len(x_t), -1).sum(1)


# --------------------------------------------------------------------------------------------
# Langevin dynamics
# --------------------------------------------------------------------------------------------


def smoothed(mixture: GaussianMixture, sigma: float) -> GaussianMixture:
    """The mixture convolved with N(0, sigma^2 I) (variance-exploding noise, as in Song & Ermon 2019)."""
    eye = torch.eye(mixture.dim, dtype=torch.float64)
    return GaussianMixture(mixture.means, mixture.covs + sigma**2 * eye, mixture.weights)


def _noise(shape, dtype, generator) -> torch.Tensor:
    """Standard normal noise of `shape`; with a list of K generators, the rows (dim 0) are split into K equal
    blocks and block k is drawn from generator k, so that one batched run equals K runs with one seed each."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(shape, generator=generator, dtype=dtype)
    k = len(generator)
    if k == 0 or shape[0] % k:
        raise ValueError(f"with {k} generators the number of rows must be a positive multiple of {k}, got {shape[0]}")
    block = (shape[0] // k, *shape[1:])
    return torch.cat([torch.randn(block, generator=g, dtype=dtype) for g in generator])


def langevin(score_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, step_size: float, num_steps: int,
             generator=None, return_path: bool = False):  # fmt: skip
    """Unadjusted Langevin dynamics x <- x + c grad log p(x) + sqrt(2c) z (Luo Sec. 3; Song & Ermon 2019, Eq. 4
    with their step alpha = 2c).

    Args:
        generator: a torch.Generator, or a list of K generators: then the rows of x are K equal blocks and
            block k takes its noise from generator k (K independent sampling seeds in one batched run).

    Returns:
        the final points, or (points, path of shape (num_steps + 1, ...)) with `return_path`.
    """
    if not step_size > 0 or num_steps < 1:
        raise ValueError(f"need step_size > 0 and num_steps >= 1, got {step_size} and {num_steps}")
    path = [x] if return_path else None
    for _ in range(num_steps):
        x = x + step_size * score_fn(x) + math.sqrt(2 * step_size) * _noise(x.shape, x.dtype, generator)
        if return_path:
            path.append(x)
    return (x, torch.stack(path)) if return_path else x


def annealed_langevin(score_fn: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigmas, steps_per_level: int,
                      eps: float, generator=None) -> torch.Tensor:  # fmt: skip
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): Langevin at each noise level sigma_i,
    from the largest to the smallest, with step size eps * sigma_i^2 / sigma_L^2.

    Args:
        score_fn: (x, sigma) -> grad log p_sigma(x), the score of the data smoothed by N(0, sigma^2 I).
        sigmas: decreasing noise levels.
        generator: a torch.Generator, or a list of generators, one per equal block of rows (see `langevin`).
    """
    sigmas = [float(s) for s in sigmas]
    if any(b >= a for a, b in zip(sigmas, sigmas[1:], strict=False)) or sigmas[-1] <= 0:
        raise ValueError(f"sigmas must be positive and strictly decreasing, got {sigmas}")
    for sigma in sigmas:
        step = eps * sigma**2 / sigmas[-1] ** 2
        x = langevin(lambda y, s=sigma: score_fn(y, s), x, step, steps_per_level, generator)
    return x


def mode_weights(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """The share of points assigned to each component (by the largest responsibility), shape (K,)."""
    labels = mixture.class_posterior(x).argmax(1)
    return torch.bincount(labels, minlength=mixture.num_components).double() / len(x)


# --------------------------------------------------------------------------------------------
# The probability-flow ODE
# --------------------------------------------------------------------------------------------


def probability_flow(eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x_T: torch.Tensor, alpha_bars: torch.Tensor,
                     substeps: int = 1) -> torch.Tensor:  # fmt: skip
    """Integrate the probability-flow ODE of the VP process from alpha_bars[0] (noisy) to alpha_bars[-1].

    In the variables y = x / sqrt(a) and sigma = sqrt((1 - a) / a) the ODE is dy / dsigma = eps(x, a)
    (Song et al. 2021; Karras et al. 2022), with eps = -sqrt(1 - a) grad log p(x). Heun's method with
    `substeps` steps per interval of `alpha_bars` (uniform in sigma). DDIM with eta = 0 is exactly one Euler
    step of this ODE per sampler step, so DDIM converges to this flow as its steps shrink.

    Args:
        eps_fn: (x, alpha_bar per point (B,)) -> eps prediction, shape of x.
        alpha_bars: increasing signal levels to pass through, e.g. the sampler's alpha_bar sequence.
    """
    if alpha_bars.ndim != 1 or (alpha_bars[1:] <= alpha_bars[:-1]).any():
        raise ValueError("alpha_bars must be a strictly increasing 1-D sequence (from noisy to clean)")
    sig = lambda a: ((1 - a) / a).sqrt()  # noqa: E731
    a_of = lambda s: 1 / (1 + s**2)  # noqa: E731
    y = x_T / alpha_bars[0].sqrt()

    def f(y, s):
        a = a_of(s)
        return eps_fn(y * a.sqrt(), a.expand(len(y)))

    for a0, a1 in zip(alpha_bars[:-1], alpha_bars[1:], strict=True):
        grid = torch.linspace(float(sig(a0)), float(sig(a1)), substeps + 1, dtype=x_T.dtype)
        for s0, s1 in zip(grid[:-1], grid[1:], strict=True):
            d0 = f(y, s0)
            y_euler = y + (s1 - s0) * d0
            y = y + (s1 - s0) * 0.5 * (d0 + f(y_euler, s1)) if s1 > 0 else y_euler
    return y * alpha_bars[-1].sqrt()


# --------------------------------------------------------------------------------------------
# A score network for 2-D data, trained by denoising score matching
# --------------------------------------------------------------------------------------------


class ScoreMLP(torch.nn.Module):
    """An MLP that predicts the noise eps(x_t, t) of 2-D (or d-D) data; `score(x, t)` converts it.

    Args:
        alpha_bar: the schedule, shape (T,) (kept as a buffer; the step t indexes it).
        dim: data dimension; hidden: widths; emb_dim: size of the sinusoidal embedding of t.
    """

    def __init__(self, alpha_bar: torch.Tensor, dim: int = 2, hidden=(128, 128, 128), emb_dim: int = 32):
        super().__init__()
        self.emb_dim = emb_dim
        self.register_buffer("alpha_bar", alpha_bar.float())
        self.mlp = MLP(dim + emb_dim, tuple(hidden), dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.ndim != 2 or t.shape != (x_t.shape[0],):
            raise ValueError(f"expected x_t (B, d) and t (B,), got {tuple(x_t.shape)} and {tuple(t.shape)}")
        return self.mlp(torch.cat([x_t.float(), sinusoidal_embedding(t.float(), self.emb_dim)], 1)).to(x_t.dtype)

    def score(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return score_from_eps(self(x_t, t), self.alpha_bar[t].to(x_t.dtype))


def train_score_mlp(mixture: GaussianMixture, alpha_bar: torch.Tensor, steps: int = 3000, batch_size: int = 512,
                    lr: float = 2e-3, seed: int = 0, progress: bool | None = None) -> tuple[ScoreMLP, list[float]]:  # fmt: skip
    """Denoising score matching on samples of `mixture`, in its eps form (Ho et al. 2020, Algorithm 1): t uniform,
    |eps - eps_theta(x_t, t)|^2, AdamW with cosine decay. Returns the network and the loss of every step."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ScoreMLP(alpha_bar, mixture.dim)
    opt = torch.optim.AdamW(net.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for _ in tqdm(range(steps), disable=not show_progress(progress), leave=False):
        x0, _ = mixture.sample(batch_size, g)
        t = torch.randint(0, len(alpha_bar), (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        a = append_dims(alpha_bar[t].double(), x0.ndim)
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
        loss = ((net(x_t, t) - eps.float()) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return net.eval(), losses


@torch.no_grad()
def score_error_over_t(net: ScoreMLP, mixture: GaussianMixture, steps, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Relative error E|s_theta - s|^2 / E|s|^2 of a score network against the exact score at each step in `steps`,
    on samples of x_t."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in steps:
        a = net.alpha_bar[t].double()
        x0, _ = mixture.sample(n, g)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        exact = mixture.score(x_t, a)
        got = net.score(x_t, torch.full((n,), int(t))).double()
        out.append(((got - exact) ** 2).sum(1).mean() / (exact**2).sum(1).mean())
    return torch.stack(out)
