"""Chapter 04 (groundwork): the discrete-time variational bound's terms as closed forms.

For the variance-preserving chain with 1 - beta_t = alpha_bar_t / alpha_bar_{t-1} (Luo 2022, Sec. 2.4-2.5, who
writes it alpha_t; here alpha_t is the signal scale sqrt(alpha_bar_t) of the continuous-time VDM):

    sigma_q^2(t) = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)                            (Luo eq. 85)
    KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) = w_x0(t) |x0_hat - x0|^2              (Luo eq. 99)
        w_x0(t)  = alpha_bar_{t-1} beta_t^2 / (2 sigma_q^2(t) (1 - alpha_bar_t)^2)
                 = (SNR(t-1) - SNR(t)) / 2                                                     (Luo eq. 110)
        w_eps(t) = beta_t^2 / (2 sigma_q^2(t) (1 - alpha_bar_t) (1 - beta_t))                  (Luo eq. 130)

All functions take alpha_bar_t and alpha_bar_{t-1} explicitly (t >= 2, so alpha_bar_{t-1} < 1).
"""

from __future__ import annotations

import torch
from torch import nn

from dlearn.datasets import AUGMENT_LABELS
from dlearn.distributions import append_dims, levels_to_unit, log_categorical_pixels
from dlearn.elbo import BoundTerms
from dlearn.nets import ConvDenoiser
from dlearn.schedules import LinearLogSNR, MonotoneLogSNR


def posterior_variance(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """sigma_q^2(t) of q(x_{t-1} | x_t, x0): the reverse variance fixed by the schedule alone."""
    one_minus_beta = alpha_bar_t / alpha_bar_prev
    return (1 - one_minus_beta) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)


def x0_loss_weight(alpha_bar_t, alpha_bar_prev):
    """w_x0(t) of Luo eq. 99, from the Gaussian KL with equal variances."""
    one_minus_beta = alpha_bar_t / alpha_bar_prev
    sigma2_q = posterior_variance(alpha_bar_t, alpha_bar_prev)
    return alpha_bar_prev * (1 - one_minus_beta) ** 2 / (2 * sigma2_q * (1 - alpha_bar_t) ** 2)


def snr_loss_weight(alpha_bar_t, alpha_bar_prev):
    """(SNR(t-1) - SNR(t)) / 2 (Luo eq. 110): positive exactly when the SNR decreases."""
    snr = lambda a: a / (1 - a)  # noqa: E731
    return 0.5 * (snr(alpha_bar_prev) - snr(alpha_bar_t))


def eps_loss_weight(alpha_bar_t, alpha_bar_prev):
    """w_eps(t) of Luo eq. 130: the same KL written with the noise prediction."""
    one_minus_beta = alpha_bar_t / alpha_bar_prev
    return (1 - one_minus_beta) ** 2 / (2 * posterior_variance(alpha_bar_t, alpha_bar_prev) * (1 - alpha_bar_t) * one_minus_beta)


def kl_equal_variance(mean_q: torch.Tensor, mean_p: torch.Tensor, var) -> torch.Tensor:
    """KL(N(mean_q, var I) || N(mean_p, var I)) = |mean_q - mean_p|^2 / (2 var), per example (B,) (Luo eq. 92)."""
    var = torch.as_tensor(var, dtype=mean_q.dtype)
    var = append_dims(var, mean_q.ndim)  # a scalar or one variance per example
    return ((mean_q - mean_p) ** 2 / (2 * var)).reshape(mean_q.shape[0], -1).sum(1)


def prior_matching_kl(x0: torch.Tensor, alpha_bar_last) -> torch.Tensor:
    """KL(q(x_T | x0) || N(0, I)) = 1/2 [alpha_bar |x0|^2 + d (1 - alpha_bar) - d - d log(1 - alpha_bar)], per example."""
    a = torch.as_tensor(alpha_bar_last, dtype=x0.dtype)
    sq = (x0**2).reshape(x0.shape[0], -1).sum(1)
    d = x0[0].numel()
    return 0.5 * (a * sq + d * (1 - a) - d - d * torch.log1p(-a))


class GaussianDiffusion1D:
    """TB2: one-dimensional Gaussian data x0 ~ N(m0, s0^2) under a variance-preserving chain, with the
    Bayes-optimal reverse model, so that every form of the bound can be computed and compared.

    The model: p(x_T) = N(0, 1); for t >= 2, p_theta(x_{t-1} | x_t) = N(mu_q(x_t, E[x0 | x_t]), sigma_q^2(t));
    the decoder p_theta(x0 | x1) = N(E[x0 | x1], Var[x0 | x1]). All maps are linear in x_t, so the model's
    marginal p_theta(x0) is Gaussian and exact. Float64 throughout; `alpha_bar[t]` is the book's step t
    (alpha_bar[0] = 1).
    """

    def __init__(self, betas: torch.Tensor, m0: float = 0.5, s0: float = 0.3):
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.num_steps = len(betas)
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
        self.one_minus_beta = torch.cat([torch.ones(1, dtype=torch.float64), 1 - betas])  # [t] = 1 - beta_t
        self.m0, self.s0 = float(m0), float(s0)

    # --- exact conditionals -----------------------------------------------------------------
    def posterior_x0(self, t: int, x_t: torch.Tensor):
        """E[x0 | x_t] and Var[x0 | x_t] under the data distribution (Gaussian conditioning)."""
        a = self.alpha_bar[t]
        c = a * self.s0**2 + 1 - a
        mean = self.m0 + self.s0**2 * a.sqrt() / c * (x_t - a.sqrt() * self.m0)
        return mean, self.s0**2 * (1 - a) / c

    def q_posterior_mean(self, t: int, x_t: torch.Tensor, x0) -> torch.Tensor:
        """mu_q(x_t, x0) of q(x_{t-1} | x_t, x0) (Luo eq. 84)."""
        a_t, a_p, al = self.alpha_bar[t], self.alpha_bar[t - 1], self.one_minus_beta[t]
        return (al.sqrt() * (1 - a_p) * x_t + a_p.sqrt() * (1 - al) * x0) / (1 - a_t)

    def q_posterior_var(self, t: int) -> torch.Tensor:
        a_t, a_p, al = self.alpha_bar[t], self.alpha_bar[t - 1], self.one_minus_beta[t]
        return (1 - al) * (1 - a_p) / (1 - a_t)

    def model_step(self, t: int, x_t: torch.Tensor):
        """Mean and variance of p_theta(x_{t-1} | x_t) (t = 1: the decoder p_theta(x0 | x1))."""
        x0_hat, x0_var = self.posterior_x0(t, x_t)
        if t == 1:
            return x0_hat, x0_var
        return self.q_posterior_mean(t, x_t, x0_hat), self.q_posterior_var(t)

    # --- sampling -----------------------------------------------------------------------------
    def forward_trajectories(self, x0: float, n: int, generator=None) -> torch.Tensor:
        """n forward chains from x0: shape (n, T + 1), column t holding x_t."""
        xs = [torch.full((n,), float(x0), dtype=torch.float64)]
        for t in range(1, self.num_steps + 1):
            noise = torch.randn(n, generator=generator, dtype=torch.float64)
            xs.append(self.one_minus_beta[t].sqrt() * xs[-1] + (1 - self.one_minus_beta[t]).sqrt() * noise)
        return torch.stack(xs, 1)

    # --- the forms of the bound ------------------------------------------------------------
    @staticmethod
    def _log_normal(x, mean, var):
        return -0.5 * (torch.log(2 * torch.pi * torch.as_tensor(var)) + (x - mean) ** 2 / var)

    def q_step(self, t: int, x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t)."""
        return self.one_minus_beta[t].sqrt() * x_prev, 1 - self.one_minus_beta[t]

    def trajectory_log_ratio(self, traj: torch.Tensor) -> torch.Tensor:
        """log p(x_{0:T}) - log q(x_{1:T} | x0) per trajectory: the bound's direct estimator, shape (n,)."""
        total = self._log_normal(traj[:, -1], 0.0, 1.0)
        for t in range(1, self.num_steps + 1):
            mean, var = self.model_step(t, traj[:, t])
            total = total + self._log_normal(traj[:, t - 1], mean, var)
            total = total - self._log_normal(traj[:, t], *self.q_step(t, traj[:, t - 1]))
        return total

    def consistency_terms(self, traj: torch.Tensor) -> torch.Tensor:
        """The valid consistency form (Luo ~eq. 44), regrouped per step, shape (n, T + 1):
        column 0: log p(x0 | x1); column t in 1..T-1: log p_theta(x_t | x_{t+1}) - log q(x_t | x_{t-1});
        column T: log p(x_T) - log q(x_T | x_{T-1}). Their sum is `trajectory_log_ratio`."""
        cols = [self._log_normal(traj[:, 0], *self.model_step(1, traj[:, 1]))]
        for t in range(1, self.num_steps):
            mean, var = self.model_step(t + 1, traj[:, t + 1])
            q = self._log_normal(traj[:, t], *self.q_step(t, traj[:, t - 1]))
            cols.append(self._log_normal(traj[:, t], mean, var) - q)
        t = self.num_steps
        cols.append(
            self._log_normal(traj[:, t], 0.0, 1.0)
            - self._log_normal(traj[:, t], *self.q_step(t, traj[:, t - 1]))
        )
        return torch.stack(cols, 1)

    @staticmethod
    def _kl(mean_q, var_q, mean_p, var_p):
        return 0.5 * (torch.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1)

    def eq45_terms(self, traj: torch.Tensor) -> torch.Tensor:
        """Luo's eq. 45 rewrite, term by term, shape (n, T + 1): the log-ratios of `consistency_terms`
        replaced by -KL(q(x_t | x_{t-1}) || p_theta(x_t | x_{t+1})) at the sampled x_{t-1}, x_{t+1}.
        NOT an identity: x_t given both neighbours is not distributed as q(x_t | x_{t-1})."""
        cols = [self._log_normal(traj[:, 0], *self.model_step(1, traj[:, 1]))]
        for t in range(1, self.num_steps):
            mean_p, var_p = self.model_step(t + 1, traj[:, t + 1])
            cols.append(-self._kl(*self.q_step(t, traj[:, t - 1]), mean_p, var_p))
        t = self.num_steps
        cols.append(-self._kl(*self.q_step(t, traj[:, t - 1]), torch.zeros(()), torch.ones(())))
        return torch.stack(cols, 1)

    def denoising_terms(self, traj: torch.Tensor) -> torch.Tensor:
        """The denoising-matching form (Luo eq. 58), shape (n, T + 1): column 0 the reconstruction
        log p(x0 | x1); column t in 2..T the analytic -KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)) at the
        sampled x_t; column 1 is 0; the prior term -KL(q(x_T | x0) || N(0, 1)) is added to column T."""
        x0 = traj[:, 0]
        cols = [self._log_normal(x0, *self.model_step(1, traj[:, 1])), torch.zeros_like(x0)]
        for t in range(2, self.num_steps + 1):
            mean_p, var = self.model_step(t, traj[:, t])
            cols.append(-((self.q_posterior_mean(t, traj[:, t], x0) - mean_p) ** 2) / (2 * var))
        a = self.alpha_bar[-1]
        cols[-1] = cols[-1] - self._kl(a.sqrt() * x0, 1 - a, torch.zeros(()), torch.ones(()))
        return torch.stack(cols, 1)

    def exact_log_marginal(self, x0) -> torch.Tensor:
        """log p_theta(x0) of the model, exactly: its linear-Gaussian chain propagated from x_T ~ N(0, 1)."""
        mean, var = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        for t in range(self.num_steps, 0, -1):
            # p_theta(x_{t-1} | x_t) = N(g x_t + h, v) with g, h read off the linear mean
            m0_, _ = self.model_step(t, torch.zeros((), dtype=torch.float64))
            m1_, v = self.model_step(t, torch.ones((), dtype=torch.float64))
            g, h = m1_ - m0_, m0_
            mean, var = g * mean + h, g**2 * var + v
        return self._log_normal(torch.as_tensor(x0, dtype=torch.float64), mean, var)

    def expected_bound_terms(self, x0: float) -> dict[str, torch.Tensor]:
        """The bound's terms for one x0, exactly (no sampling), vectorised over the steps:

            "reconstruction"  E_q log p_theta(x0 | x1)                                        scalar
            "denoising"       -E_q KL(q(x_{t-1} | x_t, x0) || p_theta(x_{t-1} | x_t)), t = 2..T    shape (T - 1,)
            "prior"           -KL(q(x_T | x0) || N(0, 1))                                        scalar

        Each KL is w_x0(t) E[(x0 - E[x0 | x_t])^2] (Luo eq. 99). E[x0 | x_t] = m0 + k (x_t - sqrt(a) m0) with
        k = s0^2 sqrt(a) / (a s0^2 + 1 - a) is linear in x_t ~ N(sqrt(a) x0, 1 - a), so
        E[(x0 - E[x0 | x_t])^2] = (1 - k sqrt(a))^2 (x0 - m0)^2 + k^2 (1 - a). The terms sum to `expected_bound`.
        """
        x0 = torch.as_tensor(x0, dtype=torch.float64)
        a = self.alpha_bar[1:]  # steps 1..T
        k = self.s0**2 * a.sqrt() / (a * self.s0**2 + 1 - a)
        mse = (1 - k * a.sqrt()) ** 2 * (x0 - self.m0) ** 2 + k**2 * (1 - a)  # (T,)
        var1 = self.posterior_x0(1, torch.zeros((), dtype=torch.float64))[1]  # the decoder's variance
        zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        return {
            "reconstruction": -0.5 * (torch.log(2 * torch.pi * var1) + mse[0] / var1),
            "denoising": -x0_loss_weight(self.alpha_bar[2:], self.alpha_bar[1:-1]) * mse[1:],
            "prior": -self._kl(a[-1].sqrt() * x0, 1 - a[-1], zero, one),
        }

    def expected_bound(self, x0: float) -> torch.Tensor:
        """The bound E_q[log p(x_{0:T}) / q(x_{1:T} | x0)] for one x0, exactly: the sum of `expected_bound_terms`."""
        terms = self.expected_bound_terms(x0)
        return terms["reconstruction"] + terms["denoising"].sum() + terms["prior"]


def true_reverse_step(mixture, alpha_bar_t: float, alpha_bar_prev: float, x_t: torch.Tensor):
    """The true reverse step q(x_{t-1} | x_t) of mixture data (TB3), exactly (D9):

        q(x_{t-1} | x_t) = sum_k p(k | x_t) N(x_{t-1}; m_k, C_k),

    each component's (x_{t-1}, x_t) being jointly Gaussian. Conditioning on x0 instead gives one
    Gaussian; without it the step is a mixture, and only for small steps close to a Gaussian.

    Args:
        mixture: a `toys.GaussianMixture`.
        x_t: one point, shape (1, d).

    Returns:
        weights (K,), means (K, d), covariances (K, d, d).
    """
    eye = torch.eye(mixture.dim, dtype=torch.float64)
    one_minus_beta = alpha_bar_t / alpha_bar_prev
    weights = mixture.class_posterior(x_t, alpha_bar_t)[0]
    means, covs = [], []
    for mu, sigma in zip(mixture.means, mixture.covs, strict=True):
        m_p, c_pp = alpha_bar_prev**0.5 * mu, alpha_bar_prev * sigma + (1 - alpha_bar_prev) * eye
        m_t, c_tt = alpha_bar_t**0.5 * mu, alpha_bar_t * sigma + (1 - alpha_bar_t) * eye
        c_pt = one_minus_beta**0.5 * c_pp  # Cov(x_{t-1}, x_t)
        gain = torch.linalg.solve(c_tt, c_pt.T).T
        means.append(m_p + (x_t[0] - m_t) @ gain.T)
        covs.append(c_pp - gain @ c_pt.T)
    return weights, torch.stack(means), torch.stack(covs)


# --------------------------------------------------------------------------------------------
# A continuous-time VDM on the digits (Kingma et al. 2021), with a 17-level denoiser
# --------------------------------------------------------------------------------------------


def level_values(device=None, dtype=torch.float32) -> torch.Tensor:
    """The 17 grey levels in [-1, 1] units, shape (17,)."""
    return torch.linspace(-1, 1, 17, device=device, dtype=dtype)


def level_log_likelihoods(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    """log N(z; alpha v_k, sigma^2) up to a constant, for each level v_k: shape (B, 17, ...) for z of shape (B, ...).

    alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda) (variance preserving).

    Args:
        z: noisy images, shape (B, ...).
        logsnr: lambda of each image, shape (B,).
    """
    lam = logsnr.reshape(-1, *([1] * (z.ndim - 1)))
    alpha, var = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam)
    v = level_values(z.device, z.dtype).reshape(1, -1, *([1] * (z.ndim - 1)))
    return -((z.unsqueeze(1) - alpha.unsqueeze(1) * v) ** 2) / (2 * var.unsqueeze(1))


class VDM(nn.Module):
    """A variational diffusion model for 17-level images in continuous time.

    The denoiser outputs logits over the 17 levels of every pixel; adding the exact log-likelihood of z_t
    under each level and normalising gives a posterior over levels whose mean is x0_hat. At small noise
    the likelihood term dominates and x0_hat snaps onto the right level, which plain eps-prediction
    cannot learn as easily (notebooks/04b_vdm_study.ipynb compares the two).
    The decoder p(x | z_0) is the same likelihood, normalised over levels.

    Args:
        net: (z_t (B, 1, 8, 8), logsnr (B,)) -> logits (B, 17, 8, 8); e.g. the one `build_vdm` makes.
            With parameterisation "eps" the net outputs the noise instead, shape (B, 1, 8, 8).
        schedule: t (B,) -> lambda(t) (B,), the log-SNR for t in [0, 1] (`schedules.LinearLogSNR` or `schedules.MonotoneLogSNR`).
        parameterisation: "levels" (above) or "eps": x0_hat = (z_t - sigma eps_hat) / alpha, the plain
            noise prediction of DDPM, kept for the comparison of chapter 04.
    """

    def __init__(self, net: nn.Module, schedule: nn.Module, parameterisation: str = "levels"):
        super().__init__()
        if parameterisation not in ("levels", "eps"):
            raise ValueError(f"parameterisation must be 'levels' or 'eps', got {parameterisation!r}")
        self.net, self.schedule, self.parameterisation = net, schedule, parameterisation

    def x0_hat(self, z_t: torch.Tensor, logsnr: torch.Tensor, aug: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z_t] under the model, shape (B, 1, 8, 8).

        Args:
            z_t: noisy images, shape (B, 1, 8, 8).
            logsnr: their log-SNR lambda, shape (B,).
            aug: augmentation labels (B, 4) for a denoiser trained with them (None: none).
        """
        out = self.net(z_t, logsnr) if aug is None else self.net(z_t, logsnr, aug)
        if self.parameterisation == "eps":
            lam = append_dims(logsnr, z_t.ndim)
            return (z_t - torch.sigmoid(-lam).sqrt() * out) / torch.sigmoid(lam).sqrt()
        logits = out + level_log_likelihoods(z_t, logsnr)[:, :, 0]  # (B, 17, 8, 8)
        probs = torch.softmax(logits, dim=1)
        return (probs * level_values(z_t.device, z_t.dtype).reshape(1, -1, 1, 1)).sum(1, keepdim=True)

    def neg_elbo_terms(self, x_levels: torch.Tensor, generator=None, t: torch.Tensor | None = None,
                       aug: torch.Tensor | None = None) -> BoundTerms:  # fmt: skip
        """One-sample estimate of the three terms of -ELBO per image, in nats (Kingma et al. 2021, Eqs. 8, 17):

        reconstruction -log p(x | z_0),  prior KL(q(z_1 | x) || N(0, I)),
        diffusion 1/2 E_t[-lambda'(t) exp(lambda(t)) |x - x0_hat(z_t, t)|^2]  (t ~ U(0, 1), one draw),

        the last being Eq. 17 written in lambda (-lambda' > 0: the SNR falls), z_t = alpha_t x + sigma_t eps with
        alpha_t^2 = sigmoid(lambda(t)), sigma_t^2 = sigmoid(-lambda(t)).

        Args:
            x_levels: images as grey levels 0..16, shape (B, 1, 8, 8).
            generator: for the draws of t and of the noise.
            t: the times in [0, 1], shape (B,); None draws them (antithetic low-discrepancy grid).
            aug: the labels (B, 4) of augmented training images (`datasets.augment_digits`); None, as for
                every reported bound, means the untransformed data (all-zero labels where the denoiser
                takes them).

        Returns:
            `dlearn.elbo.BoundTerms`, each of shape (B,): reconstruction, prior, latent (the diffusion
            term), neg_elbo = reconstruction + prior + latent.
        """
        x = levels_to_unit(x_levels).to(next(self.net.parameters()).device)
        b, dev = x.shape[0], x.device
        ends = self.schedule(torch.tensor([0.0, 1.0], device=dev))  # logsnr_max, logsnr_min
        # reconstruction at t = 0
        eps0 = torch.randn(x.shape, generator=generator).to(dev)
        lam0 = ends[0].expand(b)
        z0 = append_dims(torch.sigmoid(lam0).sqrt(), x.ndim) * x + append_dims(torch.sigmoid(-lam0).sqrt(), x.ndim) * eps0
        recon = -log_categorical_pixels(x_levels.to(dev), level_log_likelihoods(z0, lam0))
        # prior at t = 1
        a1, s1 = torch.sigmoid(ends[1]), torch.sigmoid(-ends[1])
        prior = 0.5 * ((a1 * x**2 + s1 - 1 - torch.log(s1)).reshape(b, -1).sum(1))
        # diffusion: one t per image, with the antithetic low-discrepancy trick of VDM if t is not given
        if t is None:
            u = torch.rand((), generator=generator).to(dev)
            t = (u + torch.arange(b, device=dev) / b) % 1.0
        t = t.detach().requires_grad_(True)
        logsnr = self.schedule(t)
        (dlogsnr,) = torch.autograd.grad(logsnr.sum(), t, create_graph=True)
        eps = torch.randn(x.shape, generator=generator).to(dev)
        lam = append_dims(logsnr, x.ndim)
        z_t = torch.sigmoid(lam).sqrt() * x + torch.sigmoid(-lam).sqrt() * eps
        err = ((x - self.x0_hat(z_t, logsnr, aug)) ** 2).reshape(b, -1).sum(1)
        diffusion = 0.5 * (-dlogsnr) * torch.exp(logsnr) * err
        return BoundTerms(reconstruction=recon, prior=prior, latent=diffusion, neg_elbo=recon + prior + diffusion)


class _LevelDenoiser(nn.Module):
    """`nets.ConvDenoiser` with 17 output channels (or `out_ch`), conditioned on the log-SNR and, with
    `augment`, on the 4 labels of `datasets.augment_digits` (all zeros when none are given)."""

    def __init__(self, channels=(32, 64), emb_scale: float = 50.0, out_ch: int = 17, augment: bool = False):
        super().__init__()
        self.net = ConvDenoiser(in_ch=1, out_ch=out_ch, channels=channels, emb_dim=128, emb_scale=emb_scale,
                                cond_dim=len(AUGMENT_LABELS) if augment else None, cond_optional=True)  # fmt: skip

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, aug: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, out_ch, 8, 8) for z (B, 1, 8, 8) at log-SNR `logsnr` (B,), given labels `aug` (B, 4) or none."""
        return self.net(z, -logsnr, cond=aug)  # its embedding takes -logsnr: the shipped weights were trained so


def build_vdm(learned: bool = True, logsnr_max: float = 10.0, logsnr_min: float = -6.0, channels=(32, 64),
              parameterisation: str = "levels", augment: bool = False) -> VDM:  # fmt: skip
    """The digits VDM: a 17-level conv denoiser (or a plain eps one) and a learned (`schedules.MonotoneLogSNR`) or
    fixed linear schedule from log-SNR `logsnr_max` at t = 0 to `logsnr_min` at t = 1; with `augment`, a
    denoiser that also takes augmentation labels."""
    schedule = MonotoneLogSNR(logsnr_max, logsnr_min, hidden=64) if learned else LinearLogSNR(logsnr_max, logsnr_min)
    net = _LevelDenoiser(tuple(channels), out_ch=17 if parameterisation == "levels" else 1, augment=augment)
    return VDM(net, schedule, parameterisation)
