"""How the book measures samples: a digits classifier, a Frechet distance on its features, IoU of masks.

The classifier plays three parts: its accuracy on the prompted class is the prompt-fidelity score
(a "CLIP-T" analogue), its penultimate features feed the Frechet distance (an "FID" analogue), and
cosine similarity of those features is the subject-fidelity score (a "DINO / CLIP-I" analogue).
It is trained by `dlearn.studies.classifier.train_classifier` and shipped as "digits_classifier"
(`shipped_classifier()` loads it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dlearn import shipped
from dlearn.checks import finite_tensor, values_in
from dlearn.distributions import check_levels

FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """A small CNN for 8x8 digits in [-1, 1]: two conv stages, a 64-d feature layer, 10 logits.

    It takes float images of any float dtype (cast to its weights' dtype, float32 for the shipped one) with
    values in [-1, 1] (`datasets.digits(form="unit")`, `distributions.levels_to_unit` of grey levels); NaN
    pixels or values outside [-1, 1] (e.g. grey levels 0..16 as floats) are a ValueError.
    """

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, dropout: float = 0.3):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(8 * w, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, 10))

    @staticmethod
    def _check(x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1:] != (1, 8, 8) or not x.is_floating_point():
            raise ValueError(f"expected float images of shape (B, 1, 8, 8) in [-1, 1], got {x.dtype} {tuple(x.shape)}")
        values_in("the classifier's images", x, -1.0, 1.0, hint="grey levels 0..16 go through distributions.levels_to_unit")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape (B, 64): the space of the Frechet distance."""
        self._check(x)
        return self.body(x.to(self.body[0].weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, shape (B, 10)."""
        return self.head(self.features(x))


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in each direction, filling with background (-1)."""
    b = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(b)])


@torch.no_grad()
def predict(model: DigitClassifier, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class probabilities, shape (B, 10), in eval mode."""
    model.eval()
    return torch.cat([F.softmax(model(x[i : i + batch_size]), -1) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features(model: DigitClassifier, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features in float64, shape (B, 64), in eval mode."""
    model.eval()
    return torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).double()


def accuracy(probs_or_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose argmax equals the label."""
    if probs_or_logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{probs_or_logits.shape[0]} predictions for {labels.shape[0]} labels")
    return (probs_or_logits.argmax(-1) == labels).double().mean().item()


def shipped_classifier(device: str | torch.device = "cpu") -> DigitClassifier:
    """The book's shipped digits classifier ("digits_classifier"), in eval mode with gradients off."""
    return shipped.load(DigitClassifier(), "digits_classifier", device)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, the FID formula).

        FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})

    The matrix square roots come from symmetric eigendecompositions, so the result is real.

    Args:
        feats_a, feats_b: features of shape (N_a, D) and (N_b, D), N >= 2.
    """
    for name, f in (("feats_a", feats_a), ("feats_b", feats_b)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {tuple(f.shape)}")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature sizes differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    finite_tensor("feats_a", feats_a)
    finite_tensor("feats_b", feats_b)
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    return frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(0.5 * (m + m.T))
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu_a, cov_a) and N(mu_b, cov_b).

    Args:
        mu_a, mu_b: means, shape (D,); cov_a, cov_b: covariances, shape (D, D).
    """
    dim = mu_a.shape[-1] if mu_a.ndim == 1 else -1
    for name, m, c in (("a", mu_a, cov_a), ("b", mu_b, cov_b)):
        if m.shape != (dim,) or c.shape != (dim, dim):
            raise ValueError(
                f"mu_{name} must have shape (D,) and cov_{name} (D, D) with D = {dim}, got {tuple(m.shape)} and {tuple(c.shape)}"
            )
        finite_tensor(f"mu_{name}", m)
        finite_tensor(f"cov_{name}", c)
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    value = ((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross
    return float(value.clamp(min=0))


def energy_distance(a: torch.Tensor, b: torch.Tensor, max_points: int = 2000, generator=None) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between two samples (Szekely & Rizzo 2013).

    Zero exactly when the distributions agree; uses at most `max_points` random rows of each.

    Args:
        a, b: samples of shape (N_a, D) and (N_b, D).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected samples (N, D) of one dimension, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) > max_points:
        a = a[torch.randperm(len(a), generator=generator)[:max_points]]
    if len(b) > max_points:
        b = b[torch.randperm(len(b), generator=generator)[:max_points]]
    a, b = a.double(), b.double()
    ab = torch.cdist(a, b).mean()
    aa = torch.cdist(a, a).sum() / (len(a) * (len(a) - 1))
    bb = torch.cdist(b, b).sum() / (len(b) * (len(b) - 1))
    return float(2 * ab - aa - bb)


def nearest_distances(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Euclidean distance from each image of `x` to its nearest image in `reference`, shape (N,)."""
    if x.ndim < 2 or reference.ndim < 2 or x.shape[1:] != reference.shape[1:]:
        raise ValueError(f"x and reference must be batches of one image shape, got {tuple(x.shape)} and {tuple(reference.shape)}")
    return torch.cdist(x.reshape(len(x), -1).double(), reference.reshape(len(reference), -1).double()).min(1).values


def memorisation(samples: torch.Tensor, train: torch.Tensor, test: torch.Tensor, quantile: float = 0.05) -> float:
    """The share of samples closer to their nearest training image than the test digits' `quantile`.

    The threshold is the `quantile` (5th percentile) of the test digits' nearest-training distances, so
    fresh digits from the data distribution score about `quantile`; a model that copies its training set
    scores near 1. Report it next to every Frechet distance: copying scores the FD floor.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    threshold = torch.quantile(nearest_distances(test, train), quantile)
    return float((nearest_distances(samples, train) < threshold).double().mean())


def digit_mask(levels: torch.Tensor, threshold: int = 8) -> torch.Tensor:
    """TB5's control mask: pixels whose grey level exceeds `threshold` (of 0..16), as bool."""
    return check_levels(levels, "levels") > threshold


def iou(mask_a: torch.Tensor, mask_b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of boolean masks, one value per example, shape (B,).

    Two empty masks agree perfectly: their IoU is defined as 1.

    Args:
        mask_a, mask_b: boolean tensors of one shape (B, ...); threshold images first, e.g. `x > 0`.
    """
    if mask_a.dtype != torch.bool or mask_b.dtype != torch.bool:
        raise TypeError(f"iou expects boolean masks (threshold first, e.g. x > 0), got {mask_a.dtype} and {mask_b.dtype}")
    if mask_a.shape != mask_b.shape:
        raise ValueError(f"masks must have one shape, got {tuple(mask_a.shape)} and {tuple(mask_b.shape)}")
    inter = (mask_a & mask_b).reshape(mask_a.shape[0], -1).sum(1).double()
    union = (mask_a | mask_b).reshape(mask_a.shape[0], -1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std with n - 1, over sqrt(n)) of per-image (or per-seed) values."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if len(v) < 2:
        raise ValueError(f"a standard error needs at least 2 values, got {len(v)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("values must be finite")
    return v.mean().item(), (v.std() / math.sqrt(len(v))).item()


def paired_rank(a, b) -> tuple[float, float, str]:
    """The paired difference a - b over the same images: (mean, SE, verdict), the verdict "lower" or "higher" only
    when |mean| > 2 SE, else "within noise"."""
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same images: got {len(a)} and {len(b)}")
    m, se = mean_se(a - b)
    return m, se, ("lower" if m < 0 else "higher") if abs(m) > 2 * se else "within noise"
