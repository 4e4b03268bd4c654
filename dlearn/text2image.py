"""Chapter 07 (groundwork): the toy text-to-image world: a word-level vocabulary, a tokenizer with clear
errors, an attribute captioner for the digits, and a tiny text encoder.

Prompts are short word sequences such as "a thick slanted three": an article, up to three attribute words
and a digit name. Attributes are measured from pixels (`attributes`), and each is split at its median
*within the digit's class* on the training split (`AttributeThresholds`), so that "thick" means thick for
a three and every attribute word is true of about half of each class: chance attribute accuracy is 50%.

The vocabulary also holds spare words that no caption uses (DreamBooth's identifiers, chapter 09) and the
beginning token "<bos>", which every sequence starts with: the empty prompt is "<bos>" followed by padding,
so attention always has one key to attend to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dlearn.distributions import check_levels

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
    from dlearn import datasets

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
