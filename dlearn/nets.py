"""Small networks the chapters share: an MLP, time / log-SNR embeddings, a conv denoiser for 8x8 images.

They are deliberately plain: the chapters are about the objectives, not the architectures.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """A multilayer perceptron: Linear -> act -> ... -> Linear.

    Args:
        in_dim: input features.
        hidden: widths of the hidden layers, e.g. (256, 256).
        out_dim: output features.
        act: activation module class (default SiLU).
        dropout: dropout probability after each hidden activation.
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], out_dim: int, act=nn.SiLU, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), act()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim) -> (B, out_dim)."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"MLP expects inputs with {self.in_dim} features, got shape {tuple(x.shape)}")
        return self.net(x)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style sinusoidal features of a scalar per example (Vaswani et al. 2017, Sec. 3.5).

        emb = [cos(v * f_0), ..., cos(v * f_{h-1}), sin(v * f_0), ..., sin(v * f_{h-1})],
        f_i = max_period^(-i / h),  h = dim / 2

    Used for integer timesteps (values 0..T-1) as in DDPM; for t in [0, 1] or a log-SNR, scale the
    values first (e.g. 1000 t) so that the fast frequencies vary across the range.

    Args:
        values: one scalar per example, shape (B,).
        dim: embedding size, even.

    Returns:
        embeddings of shape (B, dim).
    """
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    if values.ndim != 1:
        raise ValueError(f"values must have shape (B,), got {tuple(values.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class FourierFeatures(nn.Module):
    """Fixed random Fourier features of a scalar (nothing learnable), for continuous t or log-SNR inputs.

        emb = [cos(2 pi v B), sin(2 pi v B)],  B ~ N(0, scale^2) fixed at construction (a buffer)

    (Tancik et al. 2020; the time embedding of score SDE models).
    """

    def __init__(self, dim: int, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """values: (B,) -> (B, dim)."""
        if values.ndim != 1:
            raise ValueError(f"values must have shape (B,), got {tuple(values.shape)}")
        args = 2 * math.pi * values.float()[:, None] * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv3x3, plus an embedding added per channel, twice; with a skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(8, in_ch), in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.conv2 = nn.GroupNorm(min(8, out_ch), out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return self.skip(x) + h


class ConvDenoiser(nn.Module):
    """A small U-Net for 8x8 images: 8x8 -> 4x4 -> 8x8 with residual blocks and skips.

    Conditioned on one scalar per example (a timestep, t or log-SNR, embedded sinusoidally after
    multiplying by `emb_scale`) and, optionally, on a class label (`num_classes`; label
    `num_classes` is the "empty" condition used for classifier-free guidance) or any vector
    (`cond_dim`).

    Args:
        in_ch, out_ch: image channels in and out (out_ch = 17 * in_ch for per-level logits, say).
        channels: widths at 8x8 and 4x4.
        emb_dim: width of the embedding that every block receives.
        emb_scale: the scalar input is multiplied by this before the sinusoidal embedding.
        num_classes: if given, an embedding table of num_classes + 1 rows (the last: no label).
        cond_dim: if given, a linear map from a condition vector of this size.
        cond_optional: a missing `cond` reads as all zeros instead of raising (for labels whose zero
            means "nothing", like `datasets.augment_digits`'s: untransformed).
    """

    def __init__(
        self,
        in_ch: int = 1,
        out_ch: int = 1,
        channels: tuple[int, int] = (32, 64),
        emb_dim: int = 128,
        emb_scale: float = 1.0,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        dropout: float = 0.0,
        cond_optional: bool = False,
    ):
        super().__init__()
        c1, c2 = channels
        self.in_ch, self.emb_dim, self.emb_scale = in_ch, emb_dim, emb_scale
        self.num_classes, self.cond_dim, self.cond_optional = num_classes, cond_dim, cond_optional
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        self.cond_proj = nn.Linear(cond_dim, emb_dim) if cond_dim is not None else None
        self.conv_in = nn.Conv2d(in_ch, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim, dropout)
        self.downsample = nn.Conv2d(c1, c2, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.mid1, self.mid2 = ResBlock(c2, c2, emb_dim, dropout), ResBlock(c2, c2, emb_dim, dropout)
        self.upsample = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)  # 4x4 -> 8x8
        self.up1 = ResBlock(2 * c1, c1, emb_dim, dropout)
        self.conv_out = nn.Sequential(nn.GroupNorm(min(8, c1), c1), nn.SiLU(), nn.Conv2d(c1, out_ch, 3, padding=1))

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None, cond: torch.Tensor | None) -> torch.Tensor:
        """The per-example embedding every block receives, shape (B, emb_dim)."""
        emb = self.time_mlp(sinusoidal_embedding(t * self.emb_scale, self.emb_dim))
        if self.label_emb is not None:
            if labels is None:
                raise ValueError("this denoiser is class-conditional: pass labels (use num_classes for 'no label')")
            if labels.min() < 0 or labels.max() > self.num_classes:
                raise ValueError(f"labels must be in 0..{self.num_classes} ({self.num_classes} = no label)")
            emb = emb + self.label_emb(labels)
        elif labels is not None:
            raise ValueError("labels given, but this denoiser was built without num_classes")
        if self.cond_proj is not None:
            if cond is None and self.cond_optional:
                cond = torch.zeros(t.shape[0], self.cond_dim, device=t.device, dtype=emb.dtype)
            if cond is None or cond.shape != (t.shape[0], self.cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"cond must have shape ({t.shape[0]}, {self.cond_dim}), got {got}")
            emb = emb + self.cond_proj(cond)
        elif cond is not None:
            raise ValueError("cond given, but this denoiser was built without cond_dim")
        return emb

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, in_ch, 8, 8); t: (B,) -> (B, out_ch, 8, 8)."""
        if x.ndim != 4 or x.shape[1:] != (self.in_ch, 8, 8):
            raise ValueError(f"ConvDenoiser expects images of shape (B, {self.in_ch}, 8, 8), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), one value per image, got {tuple(t.shape)}")
        emb = self.embed(t, labels, cond)
        h1 = self.down1(self.conv_in(x), emb)  # (B, c1, 8, 8)
        h = self.downsample(h1)  # (B, c2, 4, 4)
        h = self.mid2(self.mid1(h, emb), emb)
        h = self.up1(torch.cat([self.upsample(h), h1], dim=1), emb)  # (B, c1, 8, 8)
        return self.conv_out(h)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
