"""Chapter 05 on the digits: a DDPM model, its losses (L_simple, L_vlb), its bound, samples and their scores.

The mathematics lives in `ddpm` (forward process, posterior, ancestral step) and `ddim`; this module
puts them to work on the 8x8 digits: `DigitsDDPM` (a conv denoiser with a fixed schedule),
`training_loss`, `vlb_terms` (the bound of Ho et al. 2020, Eq. 5) and `generate` (ancestral or DDIM).
The recipe of the shipped DDPMs and the scores of their samples (`sample_quality`, Frechet distance
with memorisation) are in `dlearn.studies.diffusion`.
"""

from __future__ import annotations

import torch
from torch import nn

from dlearn import datasets, ddim
from dlearn.checks import integer_in
from dlearn.datasets import AUGMENT_LABELS
from dlearn.ddpm import PREDICTION_TYPES, predict_x0_eps, q_sample, sample, velocity
from dlearn.distributions import append_dims, levels_to_unit, log_discretized_gaussian, unit_to_levels
from dlearn.elbo import BoundTerms
from dlearn.nets import ConvDenoiser
from dlearn.schedules import alpha_bar_from_betas, make_betas
from dlearn.vdm import prior_matching_kl, x0_loss_weight

LOSS_WEIGHTINGS = ("simple", "vlb")


class DigitsDDPM(nn.Module):
    """A DDPM for the 8x8 digits: `nets.ConvDenoiser` plus a fixed schedule and a prediction type.

    The schedule is a buffer (saved with the weights, never trained: the forward process has no
    parameters). `forward(x_t, t)` is the network's output, read as eps, x0 or v by
    `output_type`; `eps_x0(x_t, t)` turns it into both.

    "levels" is chapter 04's parameterisation in discrete time: the net gives 17 logits per pixel, the
    exact log-likelihood log N(x_t; sqrt(alpha_bar) v_k, 1 - alpha_bar) of each grey level v_k is added,
    and the output is the posterior mean over levels, an x0 prediction (`output_type` "x0") that snaps
    onto the right level when the noise is small.

    Args:
        prediction_type: "eps", "x0", "v" or "levels".
        schedule: "linear" (1e-4 -> 0.02) or "cosine", with `num_steps` steps.
        channels, dropout: the denoiser's widths at 8x8 and 4x4, and its dropout.
        augment: the denoiser also takes the 4 labels of `datasets.augment_digits` (`forward`'s `aug`;
            all zeros, the untransformed digits, when none are given, as in every sampler).
        num_classes: a class-conditional model of p(x | label): the denoiser takes a digit label 0..9
            (`forward`'s `labels`, required). `generate` then samples the marginal p(x) with labels in
            the train split's proportions (`datasets.stratified_labels`) unless given labels.
    """

    def __init__(self, prediction_type: str = "eps", schedule: str = "linear", num_steps: int = 1000,
                 channels=(32, 64), dropout: float = 0.1, augment: bool = False,
                 num_classes: int | None = None):  # fmt: skip
        super().__init__()
        if prediction_type not in (*PREDICTION_TYPES, "levels"):
            raise ValueError(f"prediction_type must be one of {(*PREDICTION_TYPES, 'levels')}, got {prediction_type!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be None or an integer >= 2, got {num_classes!r}")
        self.prediction_type, self.schedule, self.num_classes = prediction_type, schedule, num_classes
        self.output_type = "x0" if prediction_type == "levels" else prediction_type
        out_ch = 17 if prediction_type == "levels" else 1
        self.net = ConvDenoiser(in_ch=1, out_ch=out_ch, channels=tuple(channels), emb_dim=128, dropout=dropout,
                                cond_dim=len(AUGMENT_LABELS) if augment else None, cond_optional=True,
                                num_classes=num_classes)  # fmt: skip
        self.register_buffer("alpha_bar", alpha_bar_from_betas(make_betas(schedule, num_steps)))

    @property
    def num_steps(self) -> int:
        return len(self.alpha_bar)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, aug: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        out = self.net(x_t, t.float(), labels=labels, cond=aug)
        if self.prediction_type != "levels":
            return out
        a = append_dims(self.alpha_bar[t], x_t.ndim + 1)  # (B, 1, 1, 1, 1)
        v = torch.linspace(-1, 1, 17, device=x_t.device, dtype=x_t.dtype).reshape(1, 17, 1, 1, 1)
        log_lik = -((x_t.unsqueeze(1) - a.sqrt() * v) ** 2) / (2 * (1 - a))  # (B, 17, 1, 8, 8)
        probs = torch.softmax(out.unsqueeze(2) + log_lik, dim=1)
        return (probs * v).sum(1)

    def eps_x0(self, x_t: torch.Tensor, t: torch.Tensor):
        """(x0_hat, eps_hat) at integer steps t (B,)."""
        return predict_x0_eps(x_t, self(x_t, t), self.alpha_bar[t], self.output_type)


def training_loss(model: DigitsDDPM, x0: torch.Tensor, generator: torch.Generator | None = None,
                  weighting: str = "simple", aug: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """One Monte Carlo estimate of the training loss on a batch of images in [-1, 1] (Algorithm 1).

    - "simple": |target - output|^2 averaged over pixels, target = eps, x0 or v (Ho et al. 2020, Eq. 14
      for eps); t ~ U{0..T-1}.
    - "vlb": the variational bound itself, T * E_t[L_t] per image in nats: the KL terms w_eps(t) |eps - eps_hat|^2
      for t >= 1 (Luo eq. 130) and the discretised decoder -log p(x_0 | x_1) at t = 0. Unbiased, but its
      weights put most of the loss on small t (w_eps falls 60-fold from the first steps to t = 300).

    `aug`: the labels of augmented images (`datasets.augment_digits`), passed to the denoiser.
    `labels`: the digits' classes, for a class-conditional model (`DigitsDDPM(num_classes=...)`).
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    b, dev = x0.shape[0], x0.device
    t = torch.randint(0, model.num_steps, (b,), generator=generator).to(dev)
    eps = torch.randn(x0.shape, generator=generator).to(dev)
    a = model.alpha_bar[t]
    x_t = q_sample(x0, a, eps)
    out = model(x_t, t, aug, labels)
    if weighting == "simple":
        target = {"eps": eps, "x0": x0, "v": velocity(x0, eps, a)}[model.output_type]
        return ((out - target) ** 2).mean()
    terms = _vlb_terms_at(model, x0, t, x_t, eps, out)
    return model.num_steps * terms.mean() / x0[0].numel()


def _decoder_logvar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """log sigma_1^2 of the decoder p(x_0 | x_1): DDPM's clipped fixed_small variance, beta-tilde at the second step."""
    return torch.log((1 - alpha_bar[0]) / (1 - alpha_bar[1]) * (1 - alpha_bar[1] / alpha_bar[0]))


def _vlb_terms_at(model, x0, t, x_t, eps, out) -> torch.Tensor:
    """L_t per image (nats) at integer steps t: KL terms for t >= 1, the decoder term -log p(x_0 | x_1) at t = 0."""
    a_t = model.alpha_bar[t]
    x0_hat, _ = predict_x0_eps(x_t, out, a_t, model.output_type)
    terms = torch.zeros(x0.shape[0], dtype=x0_hat.dtype, device=x0.device)
    first, rest = t == 0, t > 0  # each term only where it applies: the other one can be infinite there
    if rest.any():
        sq = ((x0_hat[rest] - x0[rest]) ** 2).reshape(int(rest.sum()), -1).sum(1)
        terms = terms.index_put((rest,), x0_loss_weight(a_t[rest], model.alpha_bar[t[rest] - 1]) * sq)
    if first.any():
        nll0 = -log_discretized_gaussian(unit_to_levels(x0[first]), x0_hat[first], _decoder_logvar(model.alpha_bar))
        terms = terms.index_put((first,), nll0)
    return terms


@torch.no_grad()
def vlb_terms(model: DigitsDDPM, x_levels: torch.Tensor, generator: torch.Generator | None = None,
              stride: int = 1, exact_below: int = 100, batch_size: int = 1024,
              labels: torch.Tensor | None = None) -> BoundTerms:  # fmt: skip
    """The variational bound L = L_T + sum_{t>1} L_{t-1} + L_0 per image, in nats (Ho et al. 2020, Eq. 5);
    every term is a cost.

    Every step's KL is computed with one noise draw per image; with `stride` > 1, every step below
    `exact_below` is still visited (they carry most of the bound) and above it only every stride-th step
    from a random offset, its term scaled by `stride`: an unbiased stratified estimate. The decoder
    term L_0 is always computed.

    Args:
        x_levels: the images as grey levels 0..16, shape (B, 1, 8, 8).
        labels: the images' classes, shape (B,), for a class-conditional model only: then it is the bound
            on -log p(x | label).

    Returns:
        `BoundTerms`, each of shape (B,), float64: prior L_T = KL(q(x_T | x_0) || N(0, I)), latent the
        denoising sum_{t>1} L_{t-1} (the KL sum), reconstruction L_0 = -log p(x_0 | x_1) (the decoder's NLL),
        neg_elbo = prior + latent + reconstruction.
    """
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    dev = model.alpha_bar.device
    x0 = levels_to_unit(x_levels).to(dev)
    n, T = x0.shape[0], model.num_steps
    labels = _check_labels(model, labels, n)
    low = min(max(exact_below, 1), T)
    offset = int(torch.randint(0, stride, (1,), generator=generator)) if stride > 1 else 0
    steps = torch.cat([torch.arange(1, low), torch.arange(low + offset, T, stride)])
    weight = {s: (1 if s < low else stride) for s in steps.tolist()}
    diffusion = torch.zeros(n, dtype=torch.float64, device=dev)
    recon = torch.zeros(n, dtype=torch.float64, device=dev)
    for t_val in [0] + steps.tolist():
        for i in range(0, n, batch_size):
            xb = x0[i : i + batch_size]
            t = torch.full((xb.shape[0],), t_val, dtype=torch.long, device=dev)
            eps = torch.randn(xb.shape, generator=generator).to(dev)
            x_t = q_sample(xb, model.alpha_bar[t], eps)
            lab = None if labels is None else labels[i : i + batch_size]
            term = _vlb_terms_at(model, xb, t, x_t, eps, model(x_t, t, labels=lab)).double()
            if t_val == 0:
                recon[i : i + batch_size] = term
            else:
                diffusion[i : i + batch_size] += weight[t_val] * term
    prior = prior_matching_kl(x0.double(), model.alpha_bar[-1].double())
    return BoundTerms(reconstruction=recon, prior=prior, latent=diffusion, neg_elbo=prior + diffusion + recon)


def _check_labels(model: DigitsDDPM, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The labels moved to the model's device, after checking they fit a class-conditional model."""
    num_classes = model.num_classes
    if labels is None:
        if num_classes is not None:
            raise ValueError(f"this DDPM is class-conditional ({num_classes} classes): pass labels of shape ({n},)")
        return None
    if num_classes is None:
        raise ValueError("labels given, but this DDPM is unconditional (build it with num_classes)")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an int64 tensor of shape ({n},), got {got}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {labels.min().item()}..{labels.max().item()}")
    return labels.to(model.alpha_bar.device)


def generate(model: DigitsDDPM, n: int, sampler: str = "ddim", steps: int = 50, seed: int = 0,
             progress: bool | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """n samples in [-1, 1], shape (n, 1, 8, 8): "ancestral" (every step of the chain, or `steps`
    evenly strided) or "ddim" (eta = 0, `steps` steps, leading spacing).

    A class-conditional model samples p(x | labels); without `labels` it samples the marginal p(x) with
    labels in the train split's proportions, shuffled by `seed` (`datasets.stratified_labels`).
    """
    integer_in("steps", steps, 1, model.num_steps)  # 0 steps would return the starting noise
    g = torch.Generator().manual_seed(seed)
    dev = model.alpha_bar.device
    x_T = torch.randn((n, 1, 8, 8), generator=g).to(dev)
    if labels is None and model.num_classes is not None:
        labels = datasets.stratified_labels(n, "train", g)
    labels = _check_labels(model, labels, n)
    model_fn = model if labels is None else (lambda x, t: model(x, t, labels=labels))
    was_training = model.training
    model.eval()
    try:
        if sampler == "ancestral":
            timesteps = None if steps == model.num_steps else torch.linspace(model.num_steps - 1, 0, steps).round().long()
            return sample(model_fn, x_T, model.alpha_bar, timesteps, model.output_type, generator=g, progress=progress)
        if sampler == "ddim":
            return ddim.sample(model_fn, x_T, model.alpha_bar, steps, prediction_type=model.output_type, clip=True,
                               progress=progress)  # fmt: skip
        raise ValueError(f"sampler must be 'ancestral' or 'ddim', got {sampler!r}")
    finally:
        model.train(was_training)


def build_ddpm(prediction_type: str = "eps", schedule: str = "linear", channels=(32, 64), dropout: float = 0.1,
               augment: bool = False, num_classes: int | None = None) -> DigitsDDPM:  # fmt: skip
    """The zoo's constructor (T = 1000)."""
    return DigitsDDPM(prediction_type, schedule, 1000, channels, dropout, augment, num_classes)
