"""Chapter 07 (groundwork): the toy text-to-image world: a word-level vocabulary, a tokenizer with clear
errors, an attribute captioner for the digits, and a tiny text encoder.

Prompts are short word sequences such as "a thick slanted three": an article, up to three attribute words
and a digit name. Attributes are measured from pixels (`attributes`), and each is split at its median
*within the digit's class* on the training split (`AttributeThresholds`), so that "thick" means thick for
a three and every attribute word is true of about half of each class: chance attribute accuracy is 50%.

The vocabulary also holds spare words that no caption uses (DreamBooth's identifiers, chapter 09) and the
beginning token "<bos>", which every sequence starts with: the empty prompt is "<bos>" followed by padding,
so attention always has one key to attend to.

The recipe of the shipped "text2image" model and the metrics recorded with it are in `dlearn.studies.text2image`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dlearn import datasets, ddim, guidance, metrics
from dlearn.checks import finite_number, string_list
from dlearn.ddpm import q_sample
from dlearn.distributions import check_levels, levels_to_unit, unit_to_levels
from dlearn.schedules import alpha_bar_from_betas, linear_betas

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ATTRIBUTE_WORDS = {"thickness": ("thin", "thick"), "slant": ("upright", "slanted"), "size": ("small", "large")}
SPARE_WORDS = ("sks", "zwx", "qpv", "jbt")
SPECIAL = ("<pad>", "<bos>")
VOCAB: tuple[str, ...] = (*SPECIAL, "a", *DIGIT_WORDS, *(w for pair in ATTRIBUTE_WORDS.values() for w in pair), *SPARE_WORDS)
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS = TOKEN_ID["<pad>"], TOKEN_ID["<bos>"]
MAX_LENGTH = 7  # <bos> + "a" + three attributes + a digit + one spare identifier


def tokenize(prompts: str | list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
    """Token ids of prompts, shape (B, max_length): "<bos>", the words, then "<pad>".

    Words are split on whitespace and lower-cased; "" is the empty prompt (unconditional).

    Raises:
        TypeError: if a prompt is not a string.
        ValueError: for a word outside `VOCAB` (the message lists the vocabulary), or a prompt with more
            than max_length - 1 words.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = []
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        words = p.lower().split()
        unknown = [w for w in words if w not in TOKEN_ID or w in SPECIAL]
        if unknown:
            known = " ".join(w for w in VOCAB if w not in SPECIAL)
            raise ValueError(f"unknown word(s) {unknown} in prompt {p!r}; the vocabulary is: {known}")
        if len(words) > max_length - 1:
            raise ValueError(
                f"prompt {p!r} has {len(words)} words; at most {max_length - 1} fit (max_length {max_length} with <bos>)"
            )
        ids = [BOS, *(TOKEN_ID[w] for w in words)]
        rows.append(ids + [PAD] * (max_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Attributes measured from pixels
# --------------------------------------------------------------------------------------------


def attributes(levels: torch.Tensor, threshold: int = 4) -> dict[str, torch.Tensor]:
    """Pixel statistics of digits (grey levels 0..16, shape (B, 1, 8, 8)), one float per image each:

    - "thickness": total ink (sum of levels / 16) divided by the number of rows the digit spans;
    - "slant": the shear of the ink, cov(x, y) / var(y) over pixels weighted by their level (positive when
      the top leans right; image rows grow downwards, so the sign is flipped);
    - "size": the radius of gyration of the ink, sqrt(var(x) + var(y)) (continuous, unlike a bounding box,
      so that a median split has few ties).
    """
    x = check_levels(levels, "levels").double()
    if x.ndim != 4 or x.shape[1:] != (1, 8, 8):
        raise ValueError(f"expected digits of shape (B, 1, 8, 8), got {tuple(x.shape)}")
    w = x[:, 0] / 16.0  # (B, 8, 8) ink weights
    mass = w.sum((1, 2)).clamp(min=1e-9)
    rows = torch.arange(8, dtype=torch.float64).reshape(1, 8, 1)
    cols = torch.arange(8, dtype=torch.float64).reshape(1, 1, 8)
    my, mx = (w * rows).sum((1, 2)) / mass, (w * cols).sum((1, 2)) / mass
    var_y = (w * (rows - my[:, None, None]) ** 2).sum((1, 2)) / mass
    var_x = (w * (cols - mx[:, None, None]) ** 2).sum((1, 2)) / mass
    cov = (w * (rows - my[:, None, None]) * (cols - mx[:, None, None])).sum((1, 2)) / mass
    any_row = (x[:, 0] > threshold).any(2)  # (B, 8): rows the digit spans
    idx = torch.arange(8)
    first = torch.where(any_row, idx, 8).min(1).values
    last = torch.where(any_row, idx, -1).max(1).values
    height = (last - first + 1).clamp(min=1).double()
    return {"thickness": mass / height, "slant": -cov / var_y.clamp(min=1e-9), "size": (var_x + var_y).sqrt()}


@dataclass(frozen=True)
class AttributeThresholds:
    """Per-class medians of each attribute: values above the median get the second word of the pair."""

    medians: dict[str, torch.Tensor]  # attribute -> (10,)

    @classmethod
    def fit(cls, levels: torch.Tensor, labels: torch.Tensor) -> AttributeThresholds:
        values = attributes(levels)
        missing = sorted(set(range(10)) - set(labels.tolist()))
        if missing:
            raise ValueError(f"every digit class needs examples to fit thresholds; missing {missing}")
        return cls({k: torch.stack([v[labels == c].median() for c in range(10)]) for k, v in values.items()})

    def words(self, levels: torch.Tensor, labels: torch.Tensor) -> dict[str, list[str]]:
        """The attribute word of each image, per attribute."""
        values = attributes(levels)
        return {k: [ATTRIBUTE_WORDS[k][int(b)] for b in (values[k] > self.medians[k][labels])] for k in ATTRIBUTE_WORDS}


def default_thresholds() -> AttributeThresholds:
    """Thresholds fitted on the training split of the digits (the book's captions use these)."""
    x, y = datasets.digits("train")
    return AttributeThresholds.fit(x, y)


def caption(levels: torch.Tensor, labels: torch.Tensor, use: tuple[str, ...] = ("thickness", "slant", "size"),
            thresholds: AttributeThresholds | None = None) -> list[str]:  # fmt: skip
    """Captions such as "a thick slanted large three" from labels and measured attributes (in `use`, in order)."""
    unknown = set(use) - set(ATTRIBUTE_WORDS)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {sorted(ATTRIBUTE_WORDS)}")
    th = thresholds if thresholds is not None else default_thresholds()
    words = th.words(levels, labels)
    return [" ".join(["a", *(words[k][i] for k in use), DIGIT_WORDS[int(c)]]) for i, c in enumerate(labels)]


def parse_prompt(prompt: str) -> tuple[int | None, dict[str, str]]:
    """The digit class and attribute words a prompt asks for, e.g. (3, {"thickness": "thick"}); (None, {}) for ""."""
    words = tokenize_words(prompt)
    digit = next((DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS), None)
    asked = {k: w for w in words for k, pair in ATTRIBUTE_WORDS.items() if w in pair}
    return digit, asked


def tokenize_words(prompt: str) -> list[str]:
    """The words of a prompt after the checks of `tokenize`."""
    tokenize(prompt)
    return prompt.lower().split()


# --------------------------------------------------------------------------------------------
# A tiny text encoder
# --------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Token embeddings plus a small transformer: (B, L) ids -> (B, L, dim) per-token embeddings.

    Padding positions are masked as keys; "<bos>" is never padding, so the empty prompt is well defined.
    """

    def __init__(
        self, dim: int = 32, layers: int = 2, heads: int = 4, max_length: int = MAX_LENGTH, vocab_size: int = len(VOCAB)
    ):  # noqa: E501
        super().__init__()
        self.dim, self.max_length = dim, max_length
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.max_length or ids.dtype != torch.long:
            got = f"{tuple(ids.shape)} {ids.dtype}"
            raise ValueError(f"expected token ids of shape (B, {self.max_length}) and dtype long, got {got}")
        if (ids[:, 0] != BOS).any():
            raise ValueError("every sequence must start with <bos> (use text2image.tokenize)")
        h = self.token(ids) + self.position
        return self.norm(self.transformer(h, src_key_padding_mask=ids == PAD))


# --------------------------------------------------------------------------------------------
# The model: a text encoder and a tiny diffusers UNet2DConditionModel that attends to it
# --------------------------------------------------------------------------------------------


def tiny_unet(cross_attention_dim: int = 32, channels=(32, 64)):
    """A diffusers `UNet2DConditionModel` for 8x8 single-channel images, cross-attention at 4x4
    (two levels, since 8x8 halves only twice; the norm groups divide every width, as diffusers requires)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=tuple(channels), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip


class TextToImage(nn.Module):
    """Prompt -> noise prediction: `TextEncoder` + `tiny_unet`, with the linear DDPM schedule as a buffer.

    `forward(x_t, t, ids)` is eps_theta(x_t, t, prompt); the empty prompt gives the unconditional branch.
    """

    def __init__(self, dim: int = 32, channels=(32, 64)):
        super().__init__()
        self.text = TextEncoder(dim)
        self.unet = tiny_unet(dim, channels)
        self.register_buffer("alpha_bar", alpha_bar_from_betas(linear_betas(1000)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[0] != x_t.shape[0]:
            raise ValueError(f"one prompt per image: got {ids.shape[0]} prompts for {x_t.shape[0]} images")
        return self.unet(x_t, t, encoder_hidden_states=self.text(ids)).sample


def attribute_bits(levels: torch.Tensor, labels: torch.Tensor, thresholds: AttributeThresholds | None = None) -> torch.Tensor:
    """0/1 per attribute (in `ATTRIBUTE_WORDS` order; 1 = the second word, e.g. "thick"), shape (B, 3)."""
    th = thresholds if thresholds is not None else default_thresholds()
    values = attributes(levels)
    return torch.stack([(values[k] > th.medians[k][labels]).long() for k in ATTRIBUTE_WORDS], 1)


def training_prompts(labels: torch.Tensor, bits: torch.Tensor, generator: torch.Generator,
                     keep: float = 0.5, p_uncond: float = 0.1) -> list[str]:  # fmt: skip
    """Random captions for training: the digit word always, each true attribute word with probability `keep`,
    and the empty prompt with probability `p_uncond` (prompt dropout, for classifier-free guidance)."""
    out = []
    u = torch.rand(len(labels), len(ATTRIBUTE_WORDS) + 1, generator=generator)
    names = list(ATTRIBUTE_WORDS)
    for i, c in enumerate(labels.tolist()):
        if u[i, -1] < p_uncond:
            out.append("")
            continue
        attrs = [ATTRIBUTE_WORDS[k][int(bits[i, j])] for j, k in enumerate(names) if u[i, j] < keep]
        out.append(" ".join(["a", *attrs, DIGIT_WORDS[c]]))
    return out


@torch.no_grad()
def generate(model: TextToImage, prompts: list[str], guidance_scale: float = 2.0, steps: int = 50, seed: int = 0,
             batch_size: int = 512) -> torch.Tensor:  # fmt: skip
    """Images in [-1, 1] for prompts, by DDIM (eta 0) with classifier-free guidance
    eps = (1 - w) eps(x, "") + w eps(x, prompt); w = 1 is the plain conditional model.

    The sampler does not clip x0_hat (diffusers' `clip_sample` clips it without recomputing eps, and with
    guidance that inconsistency compounds: chapter 07 measures what it costs in class accuracy at w = 2 and
    50 steps); the images are clamped to [-1, 1] at the end instead. This is `generate_raw(...).clamp(-1, 1)`.

    `prompts` is a non-empty list of strings, one per image (a bare string is a TypeError, not one image per letter).
    """
    return generate_raw(model, prompts, guidance_scale, steps, seed, batch_size).clamp(-1, 1)


@torch.no_grad()
def generate_raw(model: TextToImage, prompts: list[str], guidance_scale: float = 2.0, steps: int = 50, seed: int = 0,
                 batch_size: int = 512, clip: bool = False) -> torch.Tensor:  # fmt: skip
    """`generate`'s samples before the final clamp to [-1, 1]: what the sampler itself produced, so that values
    outside the data's range (chapter 07's oversaturation measure) can be counted.

    `clip=True` clips x0_hat to [-1, 1] at every step while keeping eps_hat, as diffusers' DDIM `clip_sample`
    does (chapter 07's trap); the default, False, is `generate`'s sampler.
    """
    string_list("prompts", prompts)
    finite_number("guidance_scale", guidance_scale)
    if not isinstance(clip, bool):
        raise TypeError(f"clip must be a bool, got {type(clip).__name__}")
    ids = tokenize(prompts)
    empty = tokenize([""]).expand(len(prompts), -1)
    g = torch.Generator().manual_seed(seed)
    dev = model.alpha_bar.device
    x_T = torch.randn((len(prompts), 1, 8, 8), generator=g).to(dev)
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            c, u = ids[i : i + batch_size].to(dev), empty[i : i + batch_size].to(dev)

            def eps(x, t, c=c, u=u):
                if guidance_scale == 1.0:
                    return model(x, t, c)
                both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, c]))
                return guidance.cfg(*both.chunk(2), guidance_scale)

            out.append(ddim.sample(eps, x_T[i : i + batch_size], model.alpha_bar, steps, clip=clip, progress=False))
    finally:
        model.train(was)
    return torch.cat(out)


def evaluation_prompts(per_prompt: int = 12) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Every class with every combination of the three attributes (80 prompts), each `per_prompt` times.

    Returns:
        prompts, their classes (N,), and their attribute bits (N, 3).
    """
    prompts, classes, bits = [], [], []
    for c in range(10):
        for b in range(8):
            bb = [(b >> j) & 1 for j in range(3)]
            words = [ATTRIBUTE_WORDS[k][bb[j]] for j, k in enumerate(ATTRIBUTE_WORDS)]
            prompts += [" ".join(["a", *words, DIGIT_WORDS[c]])] * per_prompt
            classes += [c] * per_prompt
            bits += [bb] * per_prompt
    return prompts, torch.tensor(classes), torch.tensor(bits)


def prompt_fidelity(images: torch.Tensor, classes: torch.Tensor, bits: torch.Tensor, classifier=None) -> dict[str, float]:
    """Class accuracy (the digits classifier agrees with the prompted class), attribute accuracy (the captioner,
    with the prompted class's thresholds, reads the prompted word; chance 0.5), FD to the test split and
    memorisation (chapter 05's measures) of generated images in [-1, 1]."""
    clf = classifier if classifier is not None else metrics.shipped_classifier()
    levels = unit_to_levels(images.detach().cpu())
    x = levels_to_unit(levels)
    got_bits = attribute_bits(levels, classes)
    train, _ = datasets.digits("train", form="unit")
    test, _ = datasets.digits("test", form="unit")
    return {
        "class_accuracy": metrics.accuracy(metrics.predict(clf, x), classes),
        "attribute_accuracy": (got_bits == bits).double().mean().item(),
        "fd": metrics.frechet_distance(metrics.features(clf, x), metrics.features(clf, test)),
        "memorisation": metrics.memorisation(x, train, test),
    }


def noised(x0: torch.Tensor, alpha_bar: torch.Tensor, gen: torch.Generator):
    """The forward process at random time steps, for the eps-losses of chapters 07-09: t ~ U{0, ..., T-1}, then
    eps ~ N(0, I), both drawn from `gen` in that order, and x_t = `ddpm.q_sample(x0, alpha_bar[t], eps)`.

    Returns:
        (x_t, t, eps).
    """
    t = torch.randint(0, len(alpha_bar), (len(x0),), generator=gen).to(x0.device)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    return q_sample(x0, alpha_bar[t], eps), t, eps
