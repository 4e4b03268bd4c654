"""The toy worlds with exact densities: the book checks its methods against them.

- TB1: a linear-Gaussian latent model, one and two levels, with closed-form log p(x) and posterior.
- TB2: Gaussian data, whose diffused marginal and posterior over x0 are Gaussian.
- TB3: a Gaussian mixture; for any variance-preserving noise level alpha_bar its diffused density,
  score, E[x0 | x_t] and class posteriors are exact.

Everything computes in float64 so that identities hold to machine precision. The digits are in
`dlearn.datasets`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------
# Gaussian helpers
# --------------------------------------------------------------------------------------------


def _as64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def _check_cov(cov: torch.Tensor, name: str) -> None:
    if cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"{name} must be square, got shape {tuple(cov.shape)}")
    if not torch.allclose(cov, cov.transpose(-1, -2)):
        raise ValueError(f"{name} must be symmetric")
    if torch.linalg.cholesky_ex(cov).info.any():
        raise ValueError(f"{name} must be positive definite")


def _check_alpha_bar(alpha_bar) -> torch.Tensor:
    alpha_bar = _as64(alpha_bar)
    if not torch.all((alpha_bar > 0) & (alpha_bar <= 1)):
        raise ValueError(f"alpha_bar must lie in (0, 1], got values in [{alpha_bar.min()}, {alpha_bar.max()}]")
    return alpha_bar


def gaussian_condition(
    mean: torch.Tensor, cov: torch.Tensor, observed: list[int], value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Condition a joint Gaussian N(mean, cov) on some coordinates.

        mu_{a|b} = mu_a + S_ab S_bb^{-1} (x_b - mu_b),   S_{a|b} = S_aa - S_ab S_bb^{-1} S_ba

    Args:
        mean: joint mean, shape (D,).
        cov: joint covariance, shape (D, D).
        observed: indices b of the observed coordinates.
        value: their values, shape (B, len(observed)).

    Returns:
        conditional means of the other coordinates in increasing order, shape (B, D - len(b)),
        and their covariance, shape (D - len(b), D - len(b)) (the same for every value).
    """
    dim = mean.shape[0]
    if value.shape[-1] != len(observed):
        raise ValueError(f"value must have {len(observed)} columns (one per observed index), got {value.shape[-1]}")
    free = [i for i in range(dim) if i not in set(observed)]
    s_ab, s_bb = cov[free][:, observed], cov[observed][:, observed]
    gain = torch.linalg.solve(s_bb, s_ab.T).T  # S_ab S_bb^{-1}, shape (a, b)
    cond_mean = mean[free] + (value - mean[observed]) @ gain.T
    cond_cov = cov[free][:, free] - gain @ s_ab.T
    return cond_mean, 0.5 * (cond_cov + cond_cov.T)


# --------------------------------------------------------------------------------------------
# TB1: linear-Gaussian latent models
# --------------------------------------------------------------------------------------------


@dataclass
class LinearGaussianLatent:
    """TB1: z ~ N(0, I_k), x | z ~ N(W z + b, sigma2 I_d), in float64.

    Exact: p(x) = N(x; b, W W^T + sigma2 I) and p(z | x) = N(M^{-1} W^T (x - b) / sigma2, M^{-1})
    with M = W^T W / sigma2 + I (Tipping & Bishop 1999).
    """

    weight: torch.Tensor  # W, shape (d, k)
    bias: torch.Tensor  # b, shape (d,)
    sigma2: float

    def __post_init__(self):
        self.weight, self.bias = _as64(self.weight), _as64(self.bias)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"weight must be (d, k) and bias (d,), got {tuple(self.weight.shape)}, {tuple(self.bias.shape)}")
        if not self.sigma2 > 0:
            raise ValueError(f"sigma2 must be positive, got {self.sigma2}")

    @property
    def data_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    def marginal_cov(self) -> torch.Tensor:
        """Cov(x) = W W^T + sigma2 I, shape (d, d)."""
        return self.weight @ self.weight.T + self.sigma2 * torch.eye(self.data_dim, dtype=torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral samples (x, z), shapes (n, d) and (n, k)."""
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=torch.float64)
        noise = torch.randn(n, self.data_dim, generator=generator, dtype=torch.float64)
        return z @ self.weight.T + self.bias + math.sqrt(self.sigma2) * noise, z

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z), shape (B,)."""
        return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z), shape (B,) (z may carry extra leading sample dimensions)."""
        mean = z @ self.weight.T + self.bias
        return torch.distributions.Normal(mean, math.sqrt(self.sigma2)).log_prob(x).sum(-1)

    def log_joint(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x, z) = log p(z) + log p(x | z)."""
        return self.log_prior(z) + self.log_likelihood(x, z)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x), shape (B,)."""
        return torch.distributions.MultivariateNormal(self.bias, self.marginal_cov()).log_prob(_as64(x))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(z | x): means (B, k) and the shared covariance (k, k)."""
        precision = self.weight.T @ self.weight / self.sigma2 + torch.eye(self.latent_dim, dtype=torch.float64)
        cov = torch.linalg.inv(precision)
        mean = (_as64(x) - self.bias) @ self.weight @ cov.T / self.sigma2
        return mean, cov


def linear_gaussian(d: int = 5, k: int = 2, sigma2: float = 0.3, seed: int = 1) -> LinearGaussianLatent:
    """TB1 with the book's default sizes: W and b standard normal from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return LinearGaussianLatent(
        torch.randn(d, k, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64), sigma2
    )


@dataclass
class TwoLevelLinearGaussian:
    """TB1, two levels: z2 ~ N(0, I), z1 | z2 ~ N(A z2, s1 I), x | z1 ~ N(B z1 + b, s0 I), in float64.

    Every marginal and conditional is Gaussian; `joint_mean_cov` gives the joint of (z2, z1, x).
    """

    a: torch.Tensor  # A, shape (k1, k2)
    b_weight: torch.Tensor  # B, shape (d, k1)
    bias: torch.Tensor  # b, shape (d,)
    s1: float
    s0: float

    def __post_init__(self):
        self.a, self.b_weight, self.bias = _as64(self.a), _as64(self.b_weight), _as64(self.bias)
        if self.b_weight.shape[1] != self.a.shape[0] or self.bias.shape != (self.b_weight.shape[0],):
            raise ValueError(
                f"need A (k1, k2), B (d, k1), b (d,); got {tuple(self.a.shape)}, "
                f"{tuple(self.b_weight.shape)}, {tuple(self.bias.shape)}"
            )
        if not (self.s1 > 0 and self.s0 > 0):
            raise ValueError(f"s1 and s0 must be positive variances, got {self.s1}, {self.s0}")

    @property
    def dims(self) -> tuple[int, int, int]:
        """(k2, k1, d)."""
        return self.a.shape[1], self.a.shape[0], self.b_weight.shape[0]

    def sample(self, n: int, generator: torch.Generator | None = None):
        """Ancestral samples (x, z1, z2)."""
        k2, k1, d = self.dims
        z2 = torch.randn(n, k2, generator=generator, dtype=torch.float64)
        z1 = z2 @ self.a.T + math.sqrt(self.s1) * torch.randn(n, k1, generator=generator, dtype=torch.float64)
        x = z1 @ self.b_weight.T + self.bias + math.sqrt(self.s0) * torch.randn(n, d, generator=generator, dtype=torch.float64)
        return x, z1, z2

    def joint_mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the stacked vector (z2, z1, x)."""
        k2, k1, d = self.dims
        c22 = torch.eye(k2, dtype=torch.float64)
        c12 = self.a  # Cov(z1, z2)
        c11 = self.a @ self.a.T + self.s1 * torch.eye(k1, dtype=torch.float64)
        cx2, cx1 = self.b_weight @ c12, self.b_weight @ c11
        cxx = self.b_weight @ c11 @ self.b_weight.T + self.s0 * torch.eye(d, dtype=torch.float64)
        cov = torch.cat(
            [
                torch.cat([c22, c12.T, cx2.T], dim=1),
                torch.cat([c12, c11, cx1.T], dim=1),
                torch.cat([cx2, cx1, cxx], dim=1),
            ]
        )
        mean = torch.cat([torch.zeros(k2 + k1, dtype=torch.float64), self.bias])
        return mean, cov

    def marginal_cov(self) -> torch.Tensor:
        """Cov(x) = B (A A^T + s1 I) B^T + s0 I."""
        k2, k1, _ = self.dims
        return self.joint_mean_cov()[1][k2 + k1 :, k2 + k1 :]

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x), shape (B,)."""
        return torch.distributions.MultivariateNormal(self.bias, self.marginal_cov()).log_prob(_as64(x))

    def log_joint(self, x: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """log p(z2) + log p(z1 | z2) + log p(x | z1), shape (B,)."""
        normal = torch.distributions.Normal
        return (
            normal(0.0, 1.0).log_prob(z2).sum(-1)
            + normal(z2 @ self.a.T, math.sqrt(self.s1)).log_prob(z1).sum(-1)
            + normal(z1 @ self.b_weight.T + self.bias, math.sqrt(self.s0)).log_prob(x).sum(-1)
        )

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(z2, z1 | x): means of the stacked (z2, z1), shape (B, k2 + k1), and covariance."""
        k2, k1, d = self.dims
        mean, cov = self.joint_mean_cov()
        return gaussian_condition(mean, cov, list(range(k2 + k1, k2 + k1 + d)), _as64(x))


def two_level_linear_gaussian(
    d: int = 5, k1: int = 3, k2: int = 2, s1: float = 0.5, s0: float = 0.3, seed: int = 1
) -> TwoLevelLinearGaussian:
    """TB1's two-level variant with standard-normal A, B and b drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return TwoLevelLinearGaussian(rand(k1, k2), rand(d, k1), rand(d), s1, s0)


# --------------------------------------------------------------------------------------------
# TB2: Gaussian data, TB3: Gaussian mixture
# --------------------------------------------------------------------------------------------


@dataclass
class GaussianMixture:
    """A mixture of full-covariance Gaussians in float64, with exact diffusion quantities (TB2, TB3).

    Under the variance-preserving forward process x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps,
    component k diffuses to N(sqrt(alpha_bar) mu_k, alpha_bar S_k + (1 - alpha_bar) I), so the
    diffused density, its score, the class posteriors r_k(x_t) and the denoiser
    E[x0 | x_t] = sum_k r_k (mu_k + sqrt(alpha_bar) S_k C_k^{-1} (x_t - sqrt(alpha_bar) mu_k)) are exact.
    A single component (K = 1) is TB2's Gaussian data.

    `alpha_bar` is a float or a tensor of shape (B,), one noise level per point.
    """

    means: torch.Tensor  # (K, d)
    covs: torch.Tensor  # (K, d, d)
    weights: torch.Tensor  # (K,)

    def __post_init__(self):
        self.means, self.covs, self.weights = _as64(self.means), _as64(self.covs), _as64(self.weights)
        k, d = self.means.shape
        if self.covs.shape != (k, d, d) or self.weights.shape != (k,):
            raise ValueError(
                f"for means (K, d) = ({k}, {d}) need covs (K, d, d) and weights (K,), "
                f"got {tuple(self.covs.shape)} and {tuple(self.weights.shape)}"
            )
        if (self.weights <= 0).any() or abs(self.weights.sum().item() - 1) > 1e-9:
            raise ValueError(f"weights must be positive and sum to 1, got {self.weights.tolist()}")
        _check_cov(self.covs, "covs")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def _diffused_params(self, alpha_bar) -> tuple[torch.Tensor, torch.Tensor]:
        """Means (B or 1, K, d) and covariances (B or 1, K, d, d) of the diffused components."""
        ab = _check_alpha_bar(alpha_bar).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        eye = torch.eye(self.dim, dtype=torch.float64)
        means = ab[..., 0].sqrt() * self.means  # (B, K, d)
        covs = ab * self.covs + (1 - ab) * eye  # (B, K, d, d)
        return means, covs

    def _check_points(self, x: torch.Tensor) -> torch.Tensor:
        x = _as64(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"points must have shape (B, {self.dim}), got {tuple(x.shape)}")
        return x

    def _component_log_probs(self, x: torch.Tensor, alpha_bar, logits: torch.Tensor | None = None) -> torch.Tensor:
        """log w_k + log N(x; diffused component k), shape (B, K); `logits` (K,) or (B, K) replace the weights by
        softmax(logits) (chapter 10's null-text world: the "null embedding" is the unconditional weights' logits)."""
        means, covs = self._diffused_params(alpha_bar)
        comp = torch.distributions.MultivariateNormal(means, covs)
        if logits is None:
            log_w = self.weights.log()
        else:
            if logits.shape[-1] != self.num_components or logits.ndim not in (1, 2):
                k = self.num_components
                raise ValueError(f"logits must have shape (K,) or (B, K) with K = {k}, got {tuple(logits.shape)}")
            log_w = torch.log_softmax(_as64(logits), dim=-1)
        return comp.log_prob(x[:, None, :]) + log_w

    def log_prob(self, x: torch.Tensor, alpha_bar=1.0) -> torch.Tensor:
        """log q_t(x) of the mixture diffused to alpha_bar (alpha_bar = 1: the data), shape (B,)."""
        return torch.logsumexp(self._component_log_probs(self._check_points(x), alpha_bar), dim=1)

    def class_posterior(self, x: torch.Tensor, alpha_bar=1.0, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Responsibilities p(k | x_t), shape (B, K) (under weights softmax(`logits`) if given)."""
        return torch.softmax(self._component_log_probs(self._check_points(x), alpha_bar, logits), dim=1)

    def score(self, x: torch.Tensor, alpha_bar=1.0) -> torch.Tensor:
        """Exact score grad_x log q_t(x) = sum_k r_k(x) C_k^{-1} (m_k - x), shape (B, d)."""
        x = self._check_points(x)
        means, covs = self._diffused_params(alpha_bar)
        resp = self.class_posterior(x, alpha_bar)  # (B, K)
        comp_scores = torch.linalg.solve(covs, (means - x[:, None, :])[..., None])[..., 0]  # (B, K, d)
        return (resp[..., None] * comp_scores).sum(1)

    def posterior_mean(self, x: torch.Tensor, alpha_bar, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Exact denoiser E[x0 | x_t = x] by Gaussian conditioning in each component, shape (B, d)."""
        x = self._check_points(x)
        ab = _check_alpha_bar(alpha_bar).reshape(-1, 1, 1)
        means, covs = self._diffused_params(alpha_bar)
        resp = self.class_posterior(x, alpha_bar, logits)
        gain = torch.linalg.solve(covs, (x[:, None, :] - means)[..., None])[..., 0]  # C_k^{-1}(x - m_k)
        comp_mean = self.means + ab.sqrt() * (self.covs @ gain[..., None])[..., 0]  # (B, K, d)
        return (resp[..., None] * comp_mean).sum(1)

    def eps_star(self, x: torch.Tensor, alpha_bar, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The optimal noise prediction E[eps | x_t] = (x_t - sqrt(alpha_bar) E[x0 | x_t]) / sqrt(1 - alpha_bar)
        (of the mixture with weights softmax(`logits`), if given)."""
        ab = _check_alpha_bar(alpha_bar).reshape(-1, 1)
        if torch.any(ab >= 1):
            raise ValueError("eps_star needs alpha_bar < 1 (there is no noise at alpha_bar = 1)")
        return (self._check_points(x) - ab.sqrt() * self.posterior_mean(x, alpha_bar, logits)) / (1 - ab).sqrt()

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples of the data (alpha_bar = 1) and their component labels, shapes (n, d) and (n,)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[labels]  # (n, d, d)
        noise = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        return self.means[labels] + (chol @ noise)[..., 0], labels

    def component(self, k: int) -> GaussianMixture:
        """The class-conditional distribution of component k, as a one-component mixture."""
        if not 0 <= k < self.num_components:
            raise ValueError(f"component index must be in 0..{self.num_components - 1}, got {k}")
        return GaussianMixture(self.means[k : k + 1], self.covs[k : k + 1], torch.ones(1, dtype=torch.float64))


def gaussian_data(mean=0.5, std=0.3) -> GaussianMixture:
    """TB2 in one dimension: x0 ~ N(mean, std^2) (defaults m0 = 0.5, s0 = 0.3)."""
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    return GaussianMixture(torch.tensor([[float(mean)]]), torch.tensor([[[float(std) ** 2]]]), torch.ones(1))


def mixture_2d() -> GaussianMixture:
    """TB3: three 2-D Gaussians with means (2, 0), (-1, 1.7), (-1, -1.7), equal weights."""
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    covs = torch.stack([torch.diag(torch.tensor([0.3, 0.1])), torch.diag(torch.tensor([0.1, 0.3])), 0.2 * torch.eye(2)])
    return GaussianMixture(means, covs, torch.full((3,), 1 / 3, dtype=torch.float64))
