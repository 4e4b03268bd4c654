"""The book's data: scikit-learn's digits on one fixed split (TB4).

- Digits (TB4): 1797 images of 8x8 pixels with 17 grey levels, split exactly as
  jmtomczak/intro_dgm does (not shuffled; train [:1000], val [1000:1350], test [1350:]).

The toy worlds with exact densities (TB1-TB3) are in `dlearn.toys`.
"""

from __future__ import annotations

import functools

import torch

from dlearn.distributions import NUM_LEVELS, levels_to_unit

SPLITS = {"train": slice(0, 1000), "val": slice(1000, 1350), "test": slice(1350, None)}
"""intro_dgm's split of `load_digits()` (not shuffled): 1000 / 350 / 447 images."""

FORMS = ("levels", "unit")


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.int64).reshape(-1, 1, 8, 8)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    if images.min() < 0 or images.max() > NUM_LEVELS - 1:  # guards against a changed data file
        raise ValueError(f"load_digits() returned levels outside 0..{NUM_LEVELS - 1}")
    return images, labels


def digits(split: str = "train", form: str = "levels") -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of one split of the book's likelihood protocol.

    Args:
        split: "train" (1000 images), "val" (350) or "test" (447); "all" gives all 1797 in order.
        form: "levels" for int64 grey levels 0..16, "unit" for float32 values k / 8 - 1 in [-1, 1].

    Returns:
        images of shape (N, 1, 8, 8) and labels 0..9 of shape (N,). Fresh tensors: callers may modify them.
    """
    if split != "all" and split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)} or 'all', got {split!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    images, labels = _all_digits()
    idx = slice(None) if split == "all" else SPLITS[split]
    images, labels = images[idx].clone(), labels[idx].clone()
    return (levels_to_unit(images) if form == "unit" else images), labels


def stratified_labels(n: int, split: str = "train", generator: torch.Generator | None = None) -> torch.Tensor:
    """n class labels in the proportions of a split's labels, shuffled: stratified, not drawn one by one.

    Class k gets floor(n p_k) labels and the n - sum floor(n p_k) left over go to the classes with the
    largest remainders n p_k - floor(n p_k) (ties to the lower class). With n = 1000 and the train
    split the counts are exactly the train split's. Used to sample a class-conditional model's
    marginal p(x) = sum_k p_k p(x | k) without the multinomial noise in the class counts.

    Returns:
        int64 labels of shape (n,).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _, labels = digits(split)
    share = torch.bincount(labels, minlength=10).double() * n / labels.numel()
    counts = share.floor().long()
    order = torch.argsort(-(share - counts), stable=True)
    counts[order[: n - int(counts.sum())]] += 1
    out = torch.repeat_interleave(torch.arange(10), counts)
    return out[torch.randperm(n, generator=generator)]


AUGMENT_LABELS = ("dx", "dy", "flip", "transpose")
"""What each column of `augment_digits`'s labels says: the shift right and down (-1, 0 or 1 pixel), and
whether the image was mirrored left-right and transposed (0 or 1); all zeros = the image as it was."""


def augment_digits(x: torch.Tensor, p: float, generator: torch.Generator | None = None,
                   background: float | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Non-leaky augmentation of 8x8 images: transform a share `p` of them and say how, so a model can be told.

    Each image is, with probability p, mirrored left-right (probability 1/2), then transposed (1/2),
    then shifted by dx, dy in {-1, 0, 1} pixels (uniform), the uncovered row and column filled with the
    background. A model trained on the result *with the labels as an input* learns the transformed
    digits as other, labelled distributions; asked with all-zero labels it models the data itself, so
    the augmentations do not leak into its samples or its likelihood (Karras et al. 2022, "Elucidating
    the design space of diffusion-based generative models", Sec. 5, after Karras et al. 2020's
    StyleGAN2-ADA). On 1000 training digits this is a regulariser: it fights over-fitting.

    Args:
        x: images of shape (B, 1, 8, 8): grey levels (int64) or unit values (float).
        p: the share of images transformed, in [0, 1].
        generator: for reproducible draws.
        background: the fill for uncovered pixels; default 0 for levels, -1 for float images.

    Returns:
        the images (same dtype) and their labels, float32 of shape (B, 4), columns `AUGMENT_LABELS`.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1:] != (1, 8, 8):
        raise ValueError(f"expected images of shape (B, 1, 8, 8), got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    fill = background if background is not None else (-1.0 if x.is_floating_point() else 0)
    b, dev = x.shape[0], x.device
    on = torch.rand(b, generator=generator) < p
    dx = torch.randint(-1, 2, (b,), generator=generator) * on
    dy = torch.randint(-1, 2, (b,), generator=generator) * on
    flip = (torch.rand(b, generator=generator) < 0.5) & on
    transpose = (torch.rand(b, generator=generator) < 0.5) & on
    out = torch.where(flip.to(dev).reshape(-1, 1, 1, 1), x.flip(-1), x)
    out = torch.where(transpose.to(dev).reshape(-1, 1, 1, 1), out.transpose(-1, -2), out)
    padded = torch.nn.functional.pad(out, (1, 1, 1, 1), value=fill)  # (B, 1, 10, 10)
    rows = (1 - dy).to(dev).reshape(-1, 1, 1) + torch.arange(8, device=dev).reshape(1, 8, 1)  # out[i, j] = padded[i - dy, j - dx]
    cols = (1 - dx).to(dev).reshape(-1, 1, 1) + torch.arange(8, device=dev).reshape(1, 1, 8)
    out = padded[torch.arange(b, device=dev).reshape(-1, 1, 1), 0, rows, cols].unsqueeze(1)
    labels = torch.stack([dx, dy, flip, transpose], dim=1).float().to(dev)
    return out, labels
