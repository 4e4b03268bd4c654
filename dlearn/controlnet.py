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
Stable Diffusion pipelines (chapter 11) run it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from dlearn.text2image import DIGIT_WORDS, TextToImage, noised, tiny_unet, tokenize

# --------------------------------------------------------------------------------------------
# The condition: a digit's mask, and how well a generated digit follows it
# --------------------------------------------------------------------------------------------

MASK_THRESHOLD = 8  # TB5: a pixel belongs to the digit when its grey level exceeds 8 (of 0..16)


def control_mask(levels: torch.Tensor) -> torch.Tensor:
    """The control image for digits given as grey levels (B, 8, 8) or (B, 64): a float mask (B, 1, 8, 8) in {0, 1}."""
    from dlearn.metrics import digit_mask

    return digit_mask(levels.reshape(-1, 8, 8), MASK_THRESHOLD).float().unsqueeze(1)


def condition_fidelity(images: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
    """IoU (per image, shape (B,)) of generated images in [-1, 1] with their control masks: the toy's
    analogue of the paper's ADE20K segmentation IoU. The image is thresholded like the control (level > 8)."""
    from dlearn.distributions import unit_to_levels
    from dlearn.metrics import iou

    if images.shape[0] != controls.shape[0]:
        raise ValueError(f"one control per image: got {controls.shape[0]} controls for {images.shape[0]} images")
    got = control_mask(unit_to_levels(images.detach().cpu().reshape(-1, 64)))
    return iou(got.bool(), controls.detach().cpu().reshape(got.shape).bool())


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


# --------------------------------------------------------------------------------------------
# Zero convolutions and the condition encoder
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


def encoder_output_size(size: int, layers: list[tuple[int, int, int]]) -> int:
    """Spatial size after convolutions given as (kernel, stride, padding): floor((n + 2p - k) / s) + 1 each."""
    for k, s, p in layers:
        if size + 2 * p < k:
            raise ValueError(f"a {k}x{k} kernel does not fit a {size}x{size} input with padding {p}")
        size = (size + 2 * p - k) // s + 1
    return size


PAPER_HINT_ENCODER = [(4, 2, 1)] * 4  # the paper's text: "four convolution layers with 4x4 kernels and 2x2 strides"
CODE_HINT_ENCODER = [(3, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1), (3, 2, 1), (3, 1, 1)]
"""The released code's `input_hint_block`: eight 3x3 convolutions, three of them with stride 2 (16, 16, 32, 32,
96, 96, 256 channels, then the zero convolution to the model's 320)."""


# --------------------------------------------------------------------------------------------
# The ControlNet
# --------------------------------------------------------------------------------------------


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
    return e_u + guidance_scale * (e_c - e_u)


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
        controlnets, controls: one ControlNet and its masks (B, 1, 8, 8), or lists of both (residuals add);
            `None` samples the base alone.
        placement: see `guided_eps`.
        scale: the conditioning scale, or one weight per block (skips, then the middle block; C15).
        clamp: clamp to [-1, 1] at the end (False: the raw DDIM output, to measure saturation).
    """
    from dlearn import ddim

    cns = [] if controlnets is None else list(controlnets) if isinstance(controlnets, (list, tuple)) else [controlnets]
    cs = [] if controls is None else list(controls) if isinstance(controls, (list, tuple)) else [controls]
    if len(cs) != len(cns):
        raise ValueError(f"one control per ControlNet: got {len(cs)} controls for {len(cns)} ControlNets")
    for c in cs:
        if c.shape[0] != len(prompts):
            raise ValueError(f"one prompt per control: got {len(prompts)} prompts for {c.shape[0]} controls")
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


# --------------------------------------------------------------------------------------------
# Training (the base stays locked; only the ControlNet learns)
# --------------------------------------------------------------------------------------------

CONTROLS = {"mask": lambda m: m, "top": top_half, "bottom": bottom_half}


def training_data(control: str = "mask", n_train: int | None = None, seed: int = 0):
    """(images in [-1, 1], labels, attribute bits, controls) of the training split, or a random `n_train` of it."""
    from dlearn import datasets
    from dlearn.distributions import levels_to_unit
    from dlearn.text2image import attribute_bits

    if control not in CONTROLS:
        raise ValueError(f"control must be one of {sorted(CONTROLS)}, got {control!r}")
    x, y = datasets.digits("train")
    if n_train is not None:
        if not 1 <= n_train <= len(x):
            raise ValueError(f"n_train must be in 1..{len(x)}, got {n_train}")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_train]
        x, y = x[idx], y[idx]
    return levels_to_unit(x), y, attribute_bits(x, y), CONTROLS[control](control_mask(x))


def evaluation_set(n: int = 100, control: str = "mask"):
    """A fixed set for condition fidelity: the first `n` validation digits, their masks, classes and captions."""
    from dlearn import datasets
    from dlearn.text2image import caption

    x, y = datasets.digits("val")
    x, y = x[:n], y[:n]
    return CONTROLS[control](control_mask(x)), y, caption(x, y)


def controlnet_loss(base: TextToImage, cn: ControlNet | None, batch, gen: torch.Generator, p_uncond: float = 0.5):
    """The eps-loss of the controlled model (paper eq. 5), with prompts dropped with probability `p_uncond` (C10);
    `cn=None` gives the locked base's loss on the same batch and noise."""
    from dlearn.text2image import training_prompts

    x0, labels, bits, control = batch
    ids = tokenize(training_prompts(labels, bits, gen, p_uncond=p_uncond)).to(x0.device)
    x_t, t, eps = noised(x0, base.alpha_bar, gen)
    text = base.text(ids)
    residuals = None if cn is None else cn(x_t, t, text, control)
    return ((controlled_eps(base, x_t, t, ids, residuals, text) - eps) ** 2).mean()


PROMPT_SETTINGS = ("none", "insufficient", "conflicting", "perfect")


def prompts_for(setting: str, labels: torch.Tensor, captions: list[str]) -> list[str]:
    """The paper's four prompt settings (C19) for the toy: "none" (empty), "insufficient" (the caption without the
    digit word, e.g. "a thick"), "conflicting" (another digit: class + 5 mod 10), "perfect" (the full caption)."""
    if setting == "none":
        return [""] * len(labels)
    if setting == "perfect":
        return list(captions)
    if setting == "insufficient":
        return [" ".join(w for w in c.split() if w not in DIGIT_WORDS) for c in captions]
    if setting == "conflicting":
        return [f"a {DIGIT_WORDS[(int(c) + 5) % 10]}" for c in labels]
    raise ValueError(f"setting must be one of {PROMPT_SETTINGS}, got {setting!r}")


def conflicting_classes(labels: torch.Tensor) -> torch.Tensor:
    """The class named by the "conflicting" prompt."""
    return (labels + 5) % 10


def evaluate(base: TextToImage, cn, n: int = 100, control: str = "mask", steps: int = 20, guidance_scale: float = 1.0,
             settings=PROMPT_SETTINGS, classifier=None) -> dict[str, float]:  # fmt: skip
    """Condition fidelity (mean IoU), class accuracy (of the mask's class; for "conflicting" also of the prompt's
    class) and FD to the test split, for each prompt setting on the fixed evaluation set (C19)."""
    from dlearn import datasets, metrics, zoo
    from dlearn.distributions import levels_to_unit, unit_to_levels

    clf = zoo.load("digits_classifier") if classifier is None else classifier
    masks, labels, captions = evaluation_set(n, control)
    test_feats = metrics.features(clf, datasets.digits("test", form="unit")[0])
    out = {}
    for s in settings:
        imgs = generate(base, cn, masks if cn is not None else None, prompts_for(s, labels, captions), guidance_scale,
                        steps, seed=2)  # fmt: skip
        x = levels_to_unit(unit_to_levels(imgs))
        pred = metrics.predict(clf, x)
        out[f"iou_{s}"] = condition_fidelity(imgs, masks).mean().item()
        out[f"class_accuracy_{s}"] = metrics.accuracy(pred, labels)
        if s == "conflicting":
            out["prompt_class_accuracy_conflicting"] = metrics.accuracy(pred, conflicting_classes(labels))
        out[f"fd_{s}"] = metrics.frechet_distance(metrics.features(clf, x), test_feats)
    return out


def train_controlnet(seed: int = 0, max_steps: int = 1500, variant: str = "full", init: str = "zero",
                     control: str = "mask", p_uncond: float = 0.5, n_train: int | None = None, lr: float = 1e-3,
                     batch_size: int = 64, eval_every: int = 25, base: TextToImage | None = None,
                     progress: bool | None = None):  # fmt: skip
    """The zoo's recipe: a ControlNet on the shipped `text2image` base (locked), AdamW at constant `lr`, no EMA
    (so the learning curve is the raw one). At step 0 and every `eval_every` steps it logs the condition fidelity
    (mean IoU) of 100 validation masks with no prompt (DDIM-10, w = 1), and keeps the best.

    Returns:
        the ControlNet (eval mode) and the `TrainResult`; every history record also holds the IoU with the perfect
        prompt ("iou_prompt") and the class accuracy of the no-prompt and perfect-prompt samples.
    """
    from dlearn import metrics, zoo
    from dlearn.distributions import levels_to_unit, unit_to_levels
    from dlearn.train import TrainConfig, fit

    base = zoo.load("text2image") if base is None else base.requires_grad_(False).eval()
    cn = ControlNet.from_unet(base.unet, variant=variant, init=init, seed=seed, control=control)
    data = training_data(control, n_train, seed)
    masks, labels, captions = evaluation_set(100, control)
    clf = zoo.load("digits_classifier")
    extra = []

    def acc(imgs):
        return metrics.accuracy(metrics.predict(clf, levels_to_unit(unit_to_levels(imgs))), labels)

    def val_fn(m):
        none = generate(base, m, masks, [""] * len(masks), steps=10, seed=1)
        perfect = generate(base, m, masks, captions, steps=10, seed=1)
        extra.append({"iou_prompt": condition_fidelity(perfect, masks).mean().item(),
                      "class_accuracy_none": acc(none), "class_accuracy_prompt": acc(perfect)})  # fmt: skip
        return condition_fidelity(none, masks).mean().item()

    with torch.no_grad():  # step 0: the loss and fidelity of the untrained ControlNet on the base
        step0 = {"step": 0, "val": val_fn(cn.eval())}
        g = torch.Generator().manual_seed(seed)
        batch = tuple(d[torch.randint(len(data[0]), (256,), generator=g)] for d in data)
        step0["loss"] = controlnet_loss(base, cn, batch, torch.Generator().manual_seed(seed), p_uncond).item()
        step0["base_loss"] = controlnet_loss(base, None, batch, torch.Generator().manual_seed(seed), p_uncond).item()
    cfg = TrainConfig(max_steps=max_steps, batch_size=batch_size, lr=lr, eval_every=eval_every, seed=seed,
                      higher_is_better=True, progress=progress)  # fmt: skip
    result = fit(cn, lambda m, b, g: controlnet_loss(base, m, b, g, p_uncond), data, cfg, val_fn=val_fn)
    result.history.insert(0, step0)
    for record, more in zip(result.history, extra, strict=True):
        record.update(more)
    return cn.eval(), result


def transition(steps: list[int], values: list[float], tail: int = 5) -> dict[str, float]:
    """Where a learning curve rises (C11): from its first value to the mean of its last `tail` values, the first
    steps at which it crosses 10%, 50% and 90% of the way, and the 10-90% width.

    A "sudden convergence" is a rise whose width is small against the step where it happens."""
    if len(steps) != len(values) or len(values) < tail + 1:
        raise ValueError(f"need matching steps and values, more than {tail}; got {len(steps)} and {len(values)}")
    start, end = values[0], sum(values[-tail:]) / tail
    if end <= start:
        raise ValueError(f"the curve does not rise: first value {start:.4g}, final level {end:.4g}")

    def crossing(frac):
        level = start + frac * (end - start)
        return next(s for s, v in zip(steps, values, strict=True) if v >= level)

    out = {"start": start, "end": end, "step_10": crossing(0.1), "step_50": crossing(0.5), "step_90": crossing(0.9)}
    out["width_10_90"] = out["step_90"] - out["step_10"]
    return out


def protocol_metrics(cn: ControlNet) -> dict[str, float]:
    """What the zoo records for a shipped ControlNet: `evaluate` on its control at w = 1 (DDIM-20), and the base's
    IoU on the same masks with the perfect prompt (no control)."""
    from dlearn import zoo

    base = zoo.load("text2image")
    out = evaluate(base, cn, control=cn.control)
    out["base_iou_perfect"] = evaluate(base, None, control=cn.control, settings=("perfect",))["iou_perfect"]
    return out


def quick_metrics(cn: ControlNet) -> dict[str, float]:
    """The "none" and "perfect" rows of `protocol_metrics` (the test suite re-measures these)."""
    from dlearn import zoo

    return evaluate(zoo.load("text2image"), cn, control=cn.control, settings=("none", "perfect"))


# --------------------------------------------------------------------------------------------
# The alternative ControlNet avoids (C2): fine-tune the whole base with the mask as a second input channel
# --------------------------------------------------------------------------------------------


class MaskChannelModel(nn.Module):
    """A copy of the base whose U-Net takes the mask as a second input channel (its new input weights start at 0,
    so at initialisation it equals the base); every parameter is trainable."""

    def __init__(self, base: TextToImage):
        super().__init__()
        self.model = copy.deepcopy(base).requires_grad_(True)
        old = self.model.unet.conv_in
        new = nn.Conv2d(2, old.out_channels, old.kernel_size, padding=old.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :1] = old.weight
            new.bias.copy_(old.bias)
        self.model.unet.conv_in = new
        self.alpha_bar = self.model.alpha_bar

    def forward(self, x_t, t, ids, control):
        return self.model(torch.cat([x_t, control], 1), t, ids)


def _mask_channel_loss(model: MaskChannelModel, batch, gen: torch.Generator, p_uncond: float) -> torch.Tensor:
    """`controlnet_loss` for the whole-model alternative: the same prompts, noise and time steps, mask as input."""
    from dlearn.text2image import training_prompts

    x0, labels, bits, control = batch
    ids = tokenize(training_prompts(labels, bits, gen, p_uncond=p_uncond)).to(x0.device)
    x_t, t, eps = noised(x0, model.alpha_bar, gen)
    return ((model(x_t, t, ids, control) - eps) ** 2).mean()


@torch.no_grad()
def fixed_loss(loss_fn, data, seed: int = 0, repeats: int = 4) -> float:
    """The loss on every pair of `data`, `repeats` times, with noise and time steps fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    return sum(loss_fn(data, g).item() for _ in range(repeats)) / repeats


def finetune_with_mask_channel(seed: int = 0, n_pairs: int = 200, max_steps: int = 1500, lr: float = 1e-3,
                               eval_every: int = 250, base: TextToImage | None = None, progress: bool | None = None):  # fmt: skip
    """C2: train *every* parameter of a copy of the base (text encoder and U-Net, mask as an extra input channel) on
    `n_pairs` training pairs. Logs the loss on those pairs and on as many held-out pairs (validation split), and the
    FD to the test split of prompt-only samples (mask channel all 0: the base's own task).

    Returns:
        the fine-tuned `MaskChannelModel` and the history (list of dicts).
    """
    from dlearn import datasets, metrics, zoo
    from dlearn.distributions import levels_to_unit, unit_to_levels
    from dlearn.text2image import attribute_bits, evaluation_prompts
    from dlearn.train import TrainConfig, fit

    base = zoo.load("text2image") if base is None else base
    train = training_data("mask", n_pairs, seed)
    xv, yv = datasets.digits("val")
    held = (levels_to_unit(xv[:n_pairs]), yv[:n_pairs], attribute_bits(xv[:n_pairs], yv[:n_pairs]),
            control_mask(xv[:n_pairs]))  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskChannelModel(base)
    clf = zoo.load("digits_classifier")
    test_feats = metrics.features(clf, datasets.digits("test", form="unit")[0])
    prompts, _, _ = evaluation_prompts(per_prompt=3)
    history = []

    def prompt_only_fd(m):
        wrapped = _ZeroMask(m)
        from dlearn.text2image import generate as t2i_generate

        imgs = t2i_generate(wrapped, prompts, 1.0, steps=20, seed=3)
        return metrics.frechet_distance(metrics.features(clf, levels_to_unit(unit_to_levels(imgs))), test_feats)

    def val_fn(m):
        loss = lambda d, g: _mask_channel_loss(m, d, g, 0.5)  # noqa: E731
        history.append({"train_pairs_loss": fixed_loss(loss, train), "held_out_loss": fixed_loss(loss, held),
                        "prompt_only_fd": prompt_only_fd(m)})  # fmt: skip
        return history[-1]["held_out_loss"]

    model.eval()
    start = {"step": 0, **{}}
    val_fn(model)
    start.update(history.pop())
    cfg = TrainConfig(max_steps=max_steps, batch_size=64, lr=lr, eval_every=eval_every, seed=seed, progress=progress)
    result = fit(model, lambda m, b, g: _mask_channel_loss(m, b, g, 0.5), train, cfg, val_fn=val_fn)
    records = [start] + [{"step": r["step"], **h} for r, h in zip(result.history, history, strict=True)]
    return model, records


class _ZeroMask(nn.Module):
    """A `MaskChannelModel` seen as a prompt-only model (mask channel all 0), for `text2image.generate`."""

    def __init__(self, m: MaskChannelModel):
        super().__init__()
        self.m, self.alpha_bar = m, m.alpha_bar

    def forward(self, x_t, t, ids):
        return self.m(x_t, t, ids, torch.zeros_like(x_t))


# --------------------------------------------------------------------------------------------
# Cost of a training step (C12): ControlNet vs fine-tuning the whole base
# --------------------------------------------------------------------------------------------

COST_KINDS = ("controlnet", "finetune")


def training_step(kind: str, base: TextToImage, batch_size: int = 64, seed: int = 0):
    """(trainable module, a function running one forward + backward of its training loss) for `kind`:
    "controlnet" (locked base + ControlNet) or "finetune" (every weight of the base, mask as an input channel)."""
    if kind not in COST_KINDS:
        raise ValueError(f"kind must be one of {COST_KINDS}, got {kind!r}")
    data = training_data("mask", batch_size, seed)
    if kind == "controlnet":
        module = ControlNet.from_unet(base.unet)
        loss = lambda g: controlnet_loss(base, module, data, g)  # noqa: E731
    else:
        module = MaskChannelModel(base)
        loss = lambda g: _mask_channel_loss(module, data, g, 0.5)  # noqa: E731

    def step():
        module.zero_grad(set_to_none=True)
        loss(torch.Generator().manual_seed(seed)).backward()

    return module, step


def training_memory(kind: str, base: TextToImage, batch_size: int = 64) -> dict[str, int]:
    """Bytes a training step needs beyond the weights themselves: gradients and AdamW's two moments of every
    trainable parameter, and the activations autograd saves for the backward pass (counted with
    `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters excluded). A count, not a
    measurement of the allocator, so it is exact and the same on every machine."""
    module, step = training_step(kind, base, batch_size)
    params = {p.untyped_storage().data_ptr() for p in [*module.parameters(), *base.parameters()]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    out = {"trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
           "grad_and_adam_bytes": 3 * trainable, "saved_activation_bytes": sum(seen.values())}  # fmt: skip
    out["total_bytes"] = out["grad_and_adam_bytes"] + out["saved_activation_bytes"]
    return out


# --------------------------------------------------------------------------------------------
# The chapter's study: ablations and robustness, run once by a recipe and shipped as JSON
# --------------------------------------------------------------------------------------------

STUDY_PATH = "weights/controlnet_study.json"  # relative to the package
STUDY_STEPS = 600
STUDY_JOBS = {
    **{f"{v}_{i}_seed{s}": {"variant": v, "init": i, "seed": s}
       for v, i in (("full", "zero"), ("full", "gaussian"), ("lite", "zero")) for s in (0, 1, 2)},
    "p_uncond0_seed0": {"p_uncond": 0.0},
    "n50_seed0": {"n_train": 50},
    "n500_seed0": {"n_train": 500},
    "finetune_mask_channel": {},
}  # fmt: skip
"""Every run of chapter 08's study (600 steps each, evaluation every 50): the init and variant ablations over three
seeds (C17, C18), prompt dropout 0 vs the default 0.5 (C10), 50 and 500 training pairs (C20), and the whole-model
fine-tune with the mask as an input channel (C2)."""


def run_study_job(name: str, base: TextToImage | None = None, steps: int = STUDY_STEPS) -> dict:
    """One run of the study: its learning curve and its final `evaluate` table (or, for the fine-tune, its curve)."""
    import time

    from dlearn import zoo

    if name not in STUDY_JOBS:
        raise ValueError(f"no study job {name!r}; known: {sorted(STUDY_JOBS)}")
    base = zoo.load("text2image") if base is None else base
    start = time.perf_counter()
    if name == "finetune_mask_channel":
        _, history = finetune_with_mask_channel(max_steps=steps * 2, eval_every=steps // 3, base=base)
        return {"history": history, "seconds": round(time.perf_counter() - start, 1)}
    kwargs = {"seed": 0, **STUDY_JOBS[name]}
    cn, result = train_controlnet(max_steps=steps, eval_every=50, base=base, **kwargs)
    return {"config": kwargs, "history": result.history, "final": evaluate(base, cn),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def load_study(path=None) -> dict:
    """The shipped study results ({job: result}); `python -m dlearn.controlnet study` recreates them."""
    from pathlib import Path

    from dlearn import results

    return results.load_study(Path(__file__).parent / STUDY_PATH if path is None else path, "python -m dlearn.controlnet study")


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    from dlearn import results

    results.study_cli(
        argv, "python -m dlearn.controlnet", "chapter 08's study", STUDY_JOBS, run_study_job, Path(__file__).parent / STUDY_PATH
    )


if __name__ == "__main__":
    main()
