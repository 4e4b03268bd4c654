"""Chapter 08: ControlNet (Zhang, Rao and Agrawala 2023), written by hand for the book's tiny text-to-image model.

A ControlNet adds a spatial condition (here: the mask of a digit) to a pretrained, *locked* denoiser:

    y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)          (paper eqs. 2-3)

- `F(.; Theta)` is the locked base (`TextToImage`), never updated;
- `F(.; Theta_c)` is a trainable copy of its encoder half: input convolution, down blocks, middle block;
- `Z` are 1x1 convolutions whose weight and bias start at 0 ("zero convolutions"): one on every skip
  connection of the U-Net and one on the middle block, so at initialisation y_c = y bit for bit;
- the condition c passes through a small encoder (`ConditionEncoder`, last layer zero too) to the size of
  the first feature map, and is added to the copy's input features.

The module names follow diffusers' `ControlNetModel` (`controlnet_cond_embedding`, `controlnet_down_blocks`,
`controlnet_mid_block`), so `to_diffusers` loads a trained `ControlNet` into diffusers' class unchanged and the
Stable Diffusion pipelines (chapter 11) run it. Recipes, evaluation and ablations: `dlearn.studies.controlnet`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from dlearn import ddim, guidance
from dlearn.checks import finite_number, string_list, values_in
from dlearn.metrics import digit_mask
from dlearn.text2image import TextToImage, noised, tiny_unet, tokenize, training_prompts

# --------------------------------------------------------------------------------------------
# The condition: a digit's mask
# --------------------------------------------------------------------------------------------

MASK_THRESHOLD = 8  # TB5: a pixel belongs to the digit when its grey level exceeds 8 (of 0..16)


def control_mask(levels: torch.Tensor) -> torch.Tensor:
    """The control image for digits given as grey levels (B, 8, 8) or (B, 64): a float mask (B, 1, 8, 8) in {0, 1}."""
    return digit_mask(levels.reshape(-1, 8, 8), MASK_THRESHOLD).float().unsqueeze(1)


def top_half(masks: torch.Tensor) -> torch.Tensor:
    """The mask restricted to rows 0-3 (chapter 08's second control, C16)."""
    out = masks.clone()
    out[..., 4:, :] = 0
    return out


def bottom_half(masks: torch.Tensor) -> torch.Tensor:
    """The mask restricted to rows 4-7."""
    out = masks.clone()
    out[..., :4, :] = 0
    return out


def coarse_layout(masks: torch.Tensor, block: int = 2) -> torch.Tensor:
    """The mask max-pooled over `block` x `block` cells, blown back up (a 4x4 "where is ink" map for `block=2`): the
    ControlNet must decide where inside each cell the strokes go (chapter 08's control that must be interpreted)."""
    if masks.dim() != 4 or masks.shape[-1] % block or masks.shape[-2] % block:
        raise ValueError(f"expected masks (B, C, H, W) with H and W divisible by {block}, got {tuple(masks.shape)}")
    pooled = nn.functional.max_pool2d(masks, block)
    return pooled.repeat_interleave(block, -2).repeat_interleave(block, -1)


CONTROLS = {"mask": lambda m: m, "top": top_half, "bottom": bottom_half, "coarse": coarse_layout}


# --------------------------------------------------------------------------------------------
# The ControlNet: zero convolutions, the condition encoder, the trainable copy; its training objective
# --------------------------------------------------------------------------------------------


def zero_conv(channels: int, init: str = "zero", generator: torch.Generator | None = None) -> nn.Conv2d:
    """A 1x1 convolution with weight and bias 0 (`init="zero"`), or with He-normal weights and zero bias
    (`init="gaussian"`, the paper's ablation, C17)."""
    conv = nn.Conv2d(channels, channels, 1)
    _init_conv(conv, init, generator)
    return conv


def _init_conv(conv: nn.Conv2d, init: str, generator: torch.Generator | None = None) -> None:
    if init not in ("zero", "gaussian"):
        raise ValueError(f"init must be 'zero' or 'gaussian', got {init!r}")
    with torch.no_grad():
        if init == "zero":
            conv.weight.zero_()
        else:
            fan_in = conv.weight[0].numel()
            conv.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
        conv.bias.zero_()


class ConditionEncoder(nn.Module):
    """The official code's hint encoder: 3x3 convolutions with SiLU, a stride-2 one between channel widths,
    and a last convolution (zero-initialised) to the base's first feature width.

    Layout and names as diffusers' `ControlNetConditioningEmbedding`: `conv_in`, `blocks`, `conv_out`.
    With `channels=(16,)` (the toy) there is no downsampling: an 8x8 mask for an 8x8 image; with Stable
    Diffusion's `(16, 32, 96, 256)` it maps a 512x512 image to the 64x64 latent grid (C8).
    """

    def __init__(self, out_channels: int, channels=(16,), conditioning_channels: int = 1, init: str = "zero"):
        super().__init__()
        self.channels, self.conditioning_channels = tuple(channels), conditioning_channels
        self.conv_in = nn.Conv2d(conditioning_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)
        _init_conv(self.conv_out, init)

    @property
    def factor(self) -> int:
        """How much smaller the output grid is than the condition image."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.conv_in(c))
        for block in self.blocks:
            h = nn.functional.silu(block(h))
        return self.conv_out(h)


@dataclass
class Residuals:
    """What a ControlNet adds to the locked U-Net: one tensor per skip connection, and one for the middle block."""

    down: list[torch.Tensor]
    mid: torch.Tensor

    def __add__(self, other: Residuals) -> Residuals:  # several ControlNets: add the residuals (C16)
        if len(self.down) != len(other.down):
            raise ValueError(f"residuals of different U-Nets: {len(self.down)} and {len(other.down)} skips")
        return Residuals([a + b for a, b in zip(self.down, other.down, strict=True)], self.mid + other.mid)

    def scaled(self, scale: float | list[float]) -> Residuals:
        """Every residual times `scale`, or block i times `scale[i]` (the last entry is the middle block's)."""
        n = len(self.down) + 1
        weights = [float(scale)] * n if isinstance(scale, (int, float)) else [float(s) for s in scale]
        if len(weights) != n:
            raise ValueError(f"expected {n} block weights ({n - 1} skips and the middle block), got {len(weights)}")
        return Residuals([w * r for w, r in zip(weights[:-1], self.down, strict=True)], weights[-1] * self.mid)


def skip_shapes(unet, size: int = 8) -> list[tuple[int, int, int]]:
    """(channels, height, width) of every skip connection of a diffusers U-Net, in order, then the middle block's."""
    shapes = [(unet.config.block_out_channels[0], size, size)]
    for i, block in enumerate(unet.down_blocks):
        c = unet.config.block_out_channels[i]
        shapes += [(c, size, size)] * len(block.resnets)
        if block.downsamplers is not None:
            size //= 2
            shapes.append((c, size, size))
    shapes.append((unet.config.block_out_channels[-1], size, size))
    return shapes


class ControlNet(nn.Module):
    """A ControlNet for the tiny `TextToImage` U-Net (`forward` -> `Residuals`).

    Args:
        variant: "full" (a trainable copy of conv_in, the down blocks and the middle block) or "lite" (the
            paper's ablation C18: one 3x3 convolution per injection instead of the copy; it sees neither
            the time step nor the prompt).
        init: "zero" (zero convolutions) or "gaussian" (the ablation C17: He-normal 1x1 convolutions and a
            He-normal last layer in the condition encoder).
        hint_channels: the condition encoder's widths (`ConditionEncoder`).
        seed: seeds the Gaussian initialisation (and the lite convolutions).
        control: the condition it is meant for ("mask", or the "top"/"bottom" half of it); a label only.

    Use `ControlNet.from_unet(base.unet)` to start from a trained base, as the method prescribes.
    """

    def __init__(self, variant: str = "full", init: str = "zero", channels=(32, 64), cross_attention_dim: int = 32,
                 hint_channels=(16,), conditioning_channels: int = 1, size: int = 8, seed: int = 0,
                 control: str = "mask"):  # fmt: skip
        super().__init__()
        if variant not in ("full", "lite"):
            raise ValueError(f"variant must be 'full' or 'lite', got {variant!r}")
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {sorted(CONTROLS)}, got {control!r}")
        self.variant, self.init, self.size, self.control = variant, init, size, control
        self.channels, self.cross_attention_dim = tuple(channels), cross_attention_dim
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = tiny_unet(cross_attention_dim, channels)
        self.shapes = skip_shapes(unet, size)
        self.conv_in = unet.conv_in
        with torch.random.fork_rng(devices=[]):  # every part is seeded: the recipe reruns exactly
            torch.manual_seed(seed)
            self.controlnet_cond_embedding = ConditionEncoder(channels[0], hint_channels, conditioning_channels)
        if init == "gaussian":
            _init_conv(self.controlnet_cond_embedding.conv_out, init, g)
        if variant == "full":
            self.time_proj, self.time_embedding = unet.time_proj, unet.time_embedding
            self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        else:
            self.lite_blocks = nn.ModuleList()
            c_prev, s_prev = self.shapes[0][0], size
            for c, s, _ in self.shapes[1:]:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed + len(self.lite_blocks) + 1)
                    self.lite_blocks.append(nn.Conv2d(c_prev, c, 3, padding=1, stride=s_prev // s))
                c_prev, s_prev = c, s
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(c, init, g) for c, _, _ in self.shapes[:-1]])
        self.controlnet_mid_block = zero_conv(self.shapes[-1][0], init, g)

    @classmethod
    def from_unet(cls, unet, variant: str = "full", init: str = "zero", hint_channels=(16,), seed: int = 0,
                  control: str = "mask") -> ControlNet:  # fmt: skip
        """A ControlNet whose copy starts as the base's encoder half, weight for weight (C4)."""
        cn = cls(variant, init, tuple(unet.config.block_out_channels), unet.config.cross_attention_dim, hint_channels,
                 unet.config.in_channels, unet.config.sample_size, seed, control)  # fmt: skip
        parts = ["conv_in"] + (["time_embedding", "down_blocks", "mid_block"] if variant == "full" else [])
        for name in parts:
            getattr(cn, name).load_state_dict(copy.deepcopy(getattr(unet, name).state_dict()))
        return cn

    def check_control(self, x_t: torch.Tensor, control: torch.Tensor) -> None:
        """Clear errors for a control that does not fit the image (diffusers would broadcast a collapsed one)."""
        if not isinstance(control, torch.Tensor):
            raise TypeError(f"the control must be a tensor (B, C, H, W), got {type(control).__name__}")
        f = self.controlnet_cond_embedding.factor
        want = (x_t.shape[0], self.controlnet_cond_embedding.conditioning_channels, x_t.shape[-2] * f, x_t.shape[-1] * f)
        if tuple(control.shape) != want:
            raise ValueError(
                f"expected a control of shape {want} (batch, channels, and {f}x the image's {tuple(x_t.shape[-2:])}), "
                f"got {tuple(control.shape)}"
            )
        if not control.is_floating_point():
            raise TypeError(f"the control must be a float tensor (a mask in {{0, 1}}), got {control.dtype}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor, control: torch.Tensor,
                scale: float | list[float] = 1.0) -> Residuals:  # fmt: skip
        """Residuals for the locked U-Net.

        Args:
            x_t: noisy images (B, 1, 8, 8); t: time steps (B,); text: the base's prompt embeddings (B, L, dim);
            control: masks (B, 1, 8, 8); scale: the conditioning scale (one number, or one per block).
        """
        self.check_control(x_t, control)
        h = self.conv_in(x_t) + self.controlnet_cond_embedding(control)  # x + Z(c; Theta_z1)
        skips = [h]
        if self.variant == "full":
            emb = self.time_embedding(self.time_proj(t.expand(x_t.shape[0])).to(x_t.dtype))
            for block in self.down_blocks:
                if getattr(block, "has_cross_attention", False):
                    h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
                else:
                    h, res = block(hidden_states=h, temb=emb)
                skips += list(res)
            h = self.mid_block(h, emb, encoder_hidden_states=text)
        else:
            for conv in self.lite_blocks:
                h = nn.functional.silu(conv(h))
                skips.append(h)
            skips = skips[:-1]  # the last lite feature plays the middle block
        got = [tuple(s.shape[1:]) for s in skips] + [tuple(h.shape[1:])]
        if got != self.shapes:
            raise RuntimeError(f"internal shape mismatch: features {got}, expected {self.shapes}")
        out = Residuals([z(s) for z, s in zip(self.controlnet_down_blocks, skips, strict=True)], self.controlnet_mid_block(h))
        return out if scale == 1.0 else out.scaled(scale)


def controlled_eps(base: TextToImage, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor,
                   residuals: Residuals | None = None, text: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The locked base's noise prediction with ControlNet residuals added to its skips and middle block."""
    text = base.text(ids) if text is None else text
    if residuals is None:
        return base.unet(x_t, t, encoder_hidden_states=text).sample
    return base.unet(x_t, t, encoder_hidden_states=text, down_block_additional_residuals=tuple(residuals.down),
                     mid_block_additional_residual=residuals.mid).sample  # fmt: skip


class ControlledModel(nn.Module):
    """Base + ControlNets as one denoiser eps(x_t, t, ids, controls): the base stays locked (no gradients).

    `controlnets` and `controls` pair up; their residuals are added (C16)."""

    def __init__(self, base: TextToImage, *controlnets: ControlNet):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.controlnets = nn.ModuleList(controlnets)

    def forward(self, x_t, t, ids, controls, scale: float | list[float] = 1.0):
        controls = controls if isinstance(controls, (list, tuple)) else [controls]
        if len(controls) != len(self.controlnets):
            raise ValueError(f"one control per ControlNet: got {len(controls)} for {len(self.controlnets)}")
        text = self.base.text(ids)
        res = None
        for cn, c in zip(self.controlnets, controls, strict=True):
            r = cn(x_t, t, text, c, scale)
            res = r if res is None else res + r
        return controlled_eps(self.base, x_t, t, ids, res, text)


def controlnet_loss(base: TextToImage, cn: ControlNet | None, batch, gen: torch.Generator, p_uncond: float = 0.5):
    """The eps-loss of the controlled model (paper eq. 5), with prompts dropped with probability `p_uncond` (C10);
    `cn=None` gives the locked base's loss on the same batch and noise."""
    x0, labels, bits, control = batch
    ids = tokenize(training_prompts(labels, bits, gen, p_uncond=p_uncond)).to(x0.device)
    x_t, t, eps = noised(x0, base.alpha_bar, gen)
    text = base.text(ids)
    residuals = None if cn is None else cn(x_t, t, text, control)
    return ((controlled_eps(base, x_t, t, ids, residuals, text) - eps) ** 2).mean()


def to_diffusers(cn: ControlNet):
    """The same network as diffusers' `ControlNetModel` (weights copied; `from_unet` of the same U-Net config)."""
    from diffusers import ControlNetModel

    if cn.variant != "full":
        raise ValueError("only the full ControlNet has a diffusers counterpart (the lite one is the paper's ablation)")
    unet = tiny_unet(cn.cross_attention_dim, cn.channels)
    enc = cn.controlnet_cond_embedding
    ref = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=enc.channels,
                                    conditioning_channels=enc.conditioning_channels)  # fmt: skip
    ref.load_state_dict(cn.state_dict())
    return ref.eval()


# --------------------------------------------------------------------------------------------
# Sampling with control, and classifier-free guidance placement (C13-C15)
# --------------------------------------------------------------------------------------------

PLACEMENTS = ("both", "cond")


def guided_eps(base: TextToImage, controlnets: list[ControlNet], controls: list[torch.Tensor], x_t: torch.Tensor,
               t: torch.Tensor, cond_text: torch.Tensor, null_text: torch.Tensor, guidance_scale: float,
               placement: str = "both", scale: float | list[float] = 1.0) -> torch.Tensor:  # fmt: skip
    """eps_prd = eps_u + w (eps_c - eps_u), with the ControlNets' residuals in both branches ("both", C13) or in
    the conditional branch only ("cond", C14; with per-block weights in `scale`, C15)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")

    def residuals(text):
        res = None
        for cn, c in zip(controlnets, controls, strict=True):
            r = cn(x_t, t, text, c, scale)
            res = r if res is None else res + r
        return res

    e_c = controlled_eps(base, x_t, t, None, residuals(cond_text), cond_text)
    if guidance_scale == 1.0:
        return e_c
    e_u = controlled_eps(base, x_t, t, None, residuals(null_text) if placement == "both" else None, null_text)
    return guidance.cfg(e_u, e_c, guidance_scale)


def paper_block_weights(sizes: list[int], full: int = 64) -> list[float]:
    """The paper's CFG-resolution weighting (C15): block i's residual times full / h_i (h_i its height)."""
    return [full / h for h in sizes]


def guess_mode_weights(n: int = 13) -> list[float]:
    """The released code's guess-mode scales: block i of n times 0.825^(n - 1 - i) (0.0994 ... 1 for n = 13).
    diffusers writes them as `torch.logspace(-1, 0, n)`: 0.825 is 10^(-1/12) = 0.8254 rounded (within 0.6%)."""
    return [0.825 ** (n - 1 - i) for i in range(n)]


def toy_block_weights(cn: ControlNet, kind: str) -> list[float]:
    """The two C15 weightings for the toy ControlNet's blocks (skips, then the middle block): "paper" (8 / h_i,
    the toy's image size in place of SD's 64-latent) or "code" (`guess_mode_weights` for its block count)."""
    if kind == "paper":
        return paper_block_weights([h for _, h, _ in cn.shapes], full=cn.size)
    if kind == "code":
        return guess_mode_weights(len(cn.shapes))
    raise ValueError(f"kind must be 'paper' or 'code', got {kind!r}")


@torch.no_grad()
def generate(base: TextToImage, controlnets: ControlNet | list[ControlNet] | None, controls, prompts: list[str],
             guidance_scale: float = 1.0, steps: int = 20, seed: int = 0, placement: str = "both",
             scale: float | list[float] = 1.0, clamp: bool = True) -> torch.Tensor:  # fmt: skip
    """Images (B, 1, 8, 8) in [-1, 1] by DDIM (eta 0) with ControlNet(s) and classifier-free guidance
    eps = eps_u + w (eps_c - eps_u).

    Args:
        controlnets, controls: one ControlNet and its masks (B, 1, 8, 8) in [0, 1], or lists of both (residuals
            add); `None` samples the base alone. Grey levels are a ValueError: `control_mask` turns them into masks.
        prompts: a non-empty list of strings, one per image.
        placement: see `guided_eps`.
        scale: the conditioning scale, or one weight per block (skips, then the middle block; C15).
        clamp: clamp to [-1, 1] at the end (False: the raw DDIM output, to measure saturation).
    """
    cns = [] if controlnets is None else list(controlnets) if isinstance(controlnets, (list, tuple)) else [controlnets]
    cs = [] if controls is None else list(controls) if isinstance(controls, (list, tuple)) else [controls]
    string_list("prompts", prompts)
    finite_number("guidance_scale", guidance_scale)
    if len(cs) != len(cns):
        raise ValueError(f"one control per ControlNet: got {len(cs)} controls for {len(cns)} ControlNets")
    for c in cs:
        if c.shape[0] != len(prompts):
            raise ValueError(f"one prompt per control: got {len(prompts)} prompts for {c.shape[0]} controls")
        values_in("the control", c, 0.0, 1.0, tol=0.0, hint="a mask; control_mask(levels) makes one from grey levels")
    dev = base.alpha_bar.device
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((len(prompts), 1, 8, 8), generator=g).to(dev)
    cond_text = base.text(tokenize(prompts).to(dev))
    null_text = base.text(tokenize([""]).to(dev)).expand(len(prompts), -1, -1)
    cs = [c.to(dev) for c in cs]

    def eps(x, t):
        return guided_eps(base, cns, cs, x, t, cond_text, null_text, guidance_scale, placement, scale)

    modes = [(m, m.training) for m in [base, *cns]]
    for m, _ in modes:
        m.eval()
    try:
        x = ddim.sample(eps, x_T, base.alpha_bar, steps, clip=False, progress=False)
    finally:
        for m, was in modes:
            m.train(was)
    return x.clamp(-1, 1) if clamp else x
