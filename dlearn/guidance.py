"""Chapter 07: guidance. Classifier guidance as Bayes' rule on scores, classifier-free guidance in its three
equivalent forms, and the fidelity-diversity trade-off, first on the exact mixture (TB3).

    grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t)                       (Bayes; grad log p(y) = 0)
    classifier guidance:   grad log p(x_t) + s grad log p(y | x_t)
    classifier-free:       eps_uc + w (eps_c - eps_uc)  =  (1 + w') eps_c - w' eps_uc,  w' = w - 1
                           =  -sqrt(1 - a) [w grad log p(x_t | y) + (1 - w) grad log p(x_t)]

(Dhariwal & Nichol 2021; Ho & Salimans 2022; Luo 2022, Sec. "Guidance".) s is Dhariwal & Nichol's classifier
(gradient) scale, `scale` in code, and w the CFG scale: s = 1 and w = 1 give the conditional model, w = 0 the
unconditional one.
"""

from __future__ import annotations

import torch

from dlearn import ddim
from dlearn.checks import finite_number
from dlearn.distributions import append_dims
from dlearn.nets import MLP, sinusoidal_embedding
from dlearn.toys import GaussianMixture


def class_log_posterior_grad(mixture: GaussianMixture, x: torch.Tensor, alpha_bar, y: int) -> torch.Tensor:
    """grad_x log p(y | x_t) for the mixture's component y (the exact "noisy classifier"), by autograd."""
    if not 0 <= y < mixture.num_components:
        raise ValueError(f"class must be in 0..{mixture.num_components - 1}, got {y}")
    with torch.enable_grad():
        xg = x.detach().double().requires_grad_(True)
        logp = torch.log(mixture.class_posterior(xg, alpha_bar)[:, y])
        (grad,) = torch.autograd.grad(logp.sum(), xg)
    return grad


def classifier_guided_score(mixture: GaussianMixture, x: torch.Tensor, alpha_bar, y: int, scale: float = 1.0) -> torch.Tensor:
    """grad log p(x_t) + s grad log p(y | x_t), s = `scale` (Dhariwal & Nichol 2021, Algorithms 1-2): s = 1 is the
    exact class-conditional score."""
    return mixture.score(x, alpha_bar) + scale * class_log_posterior_grad(mixture, x, alpha_bar, y)


def cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance, the book's one combination of the two predictions (every chapter calls it):

        eps_uc + w (eps_c - eps_uc)

    as diffusers' pipelines, ControlNet and the null-text reference code write it, so their numbers are ours
    to the bit. w = 1 returns eps_c and w = 0 returns eps_uc exactly (the sum above rounds at both). w must be a
    finite number (a NaN scale is a ValueError, not NaN images).
    """
    finite_number("the guidance scale w", w)
    if eps_uncond.shape != eps_cond.shape:
        raise ValueError(f"the two predictions must have one shape, got {tuple(eps_uncond.shape)} and {tuple(eps_cond.shape)}")
    if w == 1:
        return eps_cond
    if w == 0:
        return eps_uncond
    return eps_uncond + w * (eps_cond - eps_uncond)


def cfg_ho_salimans(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w_prime: float) -> torch.Tensor:
    """The same in Ho & Salimans' parameterisation: (1 + w') eps_c - w' eps_uc, with w' = w - 1."""
    return (1 + w_prime) * eps_cond - w_prime * eps_uncond


def cfg_score(score_uncond: torch.Tensor, score_cond: torch.Tensor, w: float) -> torch.Tensor:
    """The same in score form: w grad log p(x_t | y) + (1 - w) grad log p(x_t)."""
    return w * score_cond + (1 - w) * score_uncond


def exact_eps(mixture: GaussianMixture, y: int | None):
    """The exact noise predictor of the mixture (y None) or of its component y, as (x, alpha_bar) -> eps."""
    target = mixture if y is None else mixture.component(y)
    return lambda x, a: target.eps_star(x, a)


def guided_ddim(mixture: GaussianMixture, y: int, w: float, x_T: torch.Tensor, alpha_bar: torch.Tensor, steps: int = 100):
    """DDIM (eta 0) with classifier-free guidance built from the exact conditional and unconditional eps."""
    eps_c, eps_u = exact_eps(mixture, y), exact_eps(mixture, None)
    return ddim.sample(lambda x, t: cfg(eps_u(x, alpha_bar[t]), eps_c(x, alpha_bar[t]), w), x_T, alpha_bar, steps, progress=False)


# --------------------------------------------------------------------------------------------
# One network for both branches: condition dropout
# --------------------------------------------------------------------------------------------


class ClassConditionalMLP(torch.nn.Module):
    """eps(x_t, t, y) for 2-D data with K classes; label K is "no class" (the unconditional branch)."""

    def __init__(self, alpha_bar: torch.Tensor, num_classes: int, dim: int = 2, hidden=(128, 128, 128), emb_dim: int = 32):
        super().__init__()
        self.num_classes, self.emb_dim = num_classes, emb_dim
        self.register_buffer("alpha_bar", alpha_bar.float())
        self.label = torch.nn.Embedding(num_classes + 1, emb_dim)
        self.mlp = MLP(dim + emb_dim, tuple(hidden), dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y.min() < 0 or y.max() > self.num_classes:
            raise ValueError(f"labels must be in 0..{self.num_classes} ({self.num_classes} = unconditional)")
        h = sinusoidal_embedding(t.float(), self.emb_dim) + self.label(y)
        return self.mlp(torch.cat([x_t.float(), h], 1)).to(x_t.dtype)


def train_class_conditional_mlp(mixture: GaussianMixture, alpha_bar: torch.Tensor, p_uncond: float, steps: int = 3000,
                                batch_size: int = 512, lr: float = 2e-3, seed: int = 0) -> ClassConditionalMLP:  # fmt: skip
    """The eps-loss with the label replaced by "no class" with probability p_uncond (Ho & Salimans 2022)."""
    if not 0 <= p_uncond <= 1:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ClassConditionalMLP(alpha_bar, mixture.num_components, mixture.dim)
    opt = torch.optim.AdamW(net.parameters(), lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x0, y = mixture.sample(batch_size, g)
        drop = torch.rand(batch_size, generator=g) < p_uncond
        y = torch.where(drop, torch.full_like(y, mixture.num_components), y)
        t = torch.randint(0, len(alpha_bar), (batch_size,), generator=g)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        a = append_dims(alpha_bar[t].double(), x0.ndim)
        loss = ((net((a.sqrt() * x0 + (1 - a).sqrt() * eps).float(), t, y) - eps.float()) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def branch_errors(net: ClassConditionalMLP, mixture: GaussianMixture, steps=(100, 300, 600), n: int = 3000, seed: int = 0):
    """Mean squared error of the conditional branch (true labels) and of the unconditional branch against the
    exact eps of the component and of the mixture, on samples of x_t at the given steps."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond = [], []
    for t in steps:
        a = net.alpha_bar[t].double()
        x0, y = mixture.sample(n, g)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        tt = torch.full((n,), t)
        exact_c = torch.zeros_like(x_t)
        for k in range(mixture.num_components):
            sel = y == k
            exact_c[sel] = mixture.component(k).eps_star(x_t[sel], a)
        cond.append(((net(x_t, tt, y).double() - exact_c) ** 2).sum(1).mean())
        none = torch.full_like(y, mixture.num_components)
        uncond.append(((net(x_t, tt, none).double() - mixture.eps_star(x_t, a)) ** 2).sum(1).mean())
    return torch.stack(cond).mean().item(), torch.stack(uncond).mean().item()
