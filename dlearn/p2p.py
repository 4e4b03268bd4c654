"""Chapter 11: Prompt-to-Prompt editing (Hertz et al. 2022, arXiv 2208.01626) on a diffusers Stable Diffusion pipeline.

An image's layout is decided early, in the cross-attention maps that tie each pixel to each prompt token (paper,
Sec. 3.1). Prompt-to-Prompt generates the source prompt and the edited (target) prompt together from the same noise
and, for the first steps, lets the target use the source's maps M_t instead of its own M*_t (Sec. 3.2 and its Algorithm
1: the target's step uses Edit(M_t, M*_t, t)). What the target's tokens *say* changes; where things *are* does not.
Three edits (Sec. 3.2):

- word swap ("replace"): the target's cross-attention maps are the source's for steps t < tau (`cross_replace`),
  its self-attention maps too for a shorter window (`self_replace`; the reference code's addition);
- refinement ("refine"): added words keep their own maps, every other target token takes the map of the source
  token it is aligned with (a global alignment of the two token sequences);
- re-weighting ("reweight"): the maps of chosen tokens are multiplied by a constant c (Sec. 3.2, "attention
  re-weighting"), on top of word swap (identity mapping) or of a refinement.

We follow the authors' reference code (github.com/google/prompt-to-prompt, `AttentionReplace`, `AttentionRefine`,
`AttentionReweight`, `seq_aligner`, `ptp_utils.get_time_words_attention_alpha`) in every detail we implement: the
control acts on the conditional half of the classifier-free-guidance batch only; a cross-attention step i is replaced
when int(a*(N+1)) <= i < int(b*(N+1)) for a window (a, b) (a single fraction f means (0, f)), a self-attention step
when int(a*N) <= i < int(b*N); self-attention maps are replaced only in layers with at most 32**2 query pixels (SD's
64x64 layers are left alone); re-weighted and refined maps are not renormalised. Not implemented: local blending,
per-word replacement windows, and word swaps between words of different token lengths.

The control is installed through diffusers' attention processors (`unet.set_attn_processor`): each `Attention`
module gets a `P2PAttnProcessor`, diffusers' plain `AttnProcessor` with one line added, the controller's hook on the
attention probabilities. The pipeline's own `__call__` runs the sampling, with per-step null embeddings of a
null-text inversion (chapter 10, `sd.PipelineWorld`) fed by a step-end callback, so a real image can be edited.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass

import torch

from dlearn import sd
from dlearn.checks import finite_number, integer_in, string_list
from dlearn.inversion import Inversion, check_timesteps

MODES = ("replace", "refine", "reweight")
SELF_MAX_PIXELS = 32**2  # null_text_w_ptp.ipynb replaces self-attention only in layers with at most 32 x 32 queries


# --------------------------------------------------------------------------------------------
# Tokens: lengths, word positions, the refinement alignment (the reference's seq_aligner)
# --------------------------------------------------------------------------------------------


def token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids with the start and end tokens, without padding (what `seq_aligner` aligns)."""
    return list(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def word_positions(tokenizer, prompt: str, word: str | int) -> list[int]:
    """The token positions (1 = first after the start token) of a word of `prompt`, given as a string (every
    occurrence) or as its index among the space-separated words; BPE tokenises each word on its own."""
    words, pos, out = prompt.split(" "), 1, []
    if isinstance(word, int) and not 0 <= word < len(words):
        raise ValueError(f"word index {word} is outside the prompt {prompt!r} ({len(words)} words)")
    for k, w in enumerate(words):
        n = len(tokenizer(w, add_special_tokens=False).input_ids)
        if word == k or word == w:
            out += list(range(pos, pos + n))
        pos += n
    if not out:
        raise ValueError(f"expected a word of the prompt {prompt!r} (a word or its index), got {word!r}")
    return out


def align(source: list[int], target: list[int]) -> tuple[list[int], list[bool]]:
    """Global alignment of two token sequences (Needleman-Wunsch with match 1, mismatch -1, gap 0, and the reference's
    tie-breaking: left, then up, then diagonal). For each target token: the source position it is aligned with (-1 for
    an added token) and whether it has one."""
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    trace[0] = [4] + [1] * m
    for i in range(1, n + 1):
        trace[i][0] = 2
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(left, up, diag)
            trace[i][j] = 1 if score[i][j] == left else 2 if score[i][j] == up else 3
    i, j, mapper = n, m, []
    while (i > 0 or j > 0) and trace[i][j] != 4:
        move = trace[i][j]
        if move == 3:
            i, j = i - 1, j - 1
            mapper.append(i)
        elif move == 1:
            j -= 1
            mapper.append(-1)
        else:
            i -= 1
    mapper.reverse()
    return mapper, [k >= 0 for k in mapper]


def refinement_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's `get_refinement_mapper` for one pair: index (L,) into the source's tokens and alphas (L,)
    (1 where the target token takes the source's map, 0 for an added token), L = the tokenizer's maximum length;
    positions after the target's end token map to themselves."""
    length = tokenizer.model_max_length
    tgt = token_ids(tokenizer, target)
    mapper, has = align(token_ids(tokenizer, source), tgt)
    index = torch.arange(length)
    index[: len(mapper)] = torch.tensor(mapper).clamp(min=0)  # an added token's index is unused (alpha 0)
    alphas = torch.ones(length)
    alphas[: len(has)] = torch.tensor(has, dtype=torch.float32)
    return index, alphas


def replace_window(fraction, steps: int, rows: int, name: str) -> tuple[int, int]:
    """The steps [start, end) of a replacement window given as a fraction f (= (0, f)) or a pair (a, b) in [0, 1]:
    start = int(a * rows), end = int(b * rows) (rows = N + 1 for cross-attention, N for self-attention, as in the
    reference code)."""
    pair = (0.0, fraction) if isinstance(fraction, numbers.Real) and not isinstance(fraction, bool) else fraction
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name} should be a fraction in [0, 1] or a pair (start, end) of fractions, got {fraction!r}")
    for v in pair:
        finite_number(name, v)
    if not 0 <= pair[0] <= pair[1] <= 1:
        raise ValueError(f"{name} should be a fraction in [0, 1] or a pair 0 <= start <= end <= 1, got {fraction!r}")
    return int(pair[0] * rows), int(pair[1] * rows)


# --------------------------------------------------------------------------------------------
# Controllers: the hook on the attention probabilities
# --------------------------------------------------------------------------------------------


class AttentionStore:
    """A controller that changes nothing and, when asked, records the attention probabilities the UNet uses (after
    any edit) of the conditional half of the batch: `maps["cross"][(step, layer)]` of shape (B, heads, pixels, tokens),
    `maps["self"][(step, layer)]` of shape (B, heads, pixels, pixels); layer = the processor's name in the UNet."""

    def __init__(self, n_prompts: int, record_cross: bool = True, record_self: bool = False):
        self.n_prompts, self.record_cross, self.record_self = n_prompts, record_cross, record_self
        self.num_layers = 0  # set by `controlled`: one call per attention layer makes one step
        self.reset()

    def reset(self) -> None:
        self.step, self.layer = 0, 0
        self.maps = {"cross": {}, "self": {}}

    def edit(self, probs: torch.Tensor, is_cross: bool) -> torch.Tensor:
        """The conditional half's probabilities (B, heads, queries, keys), edited (here: unchanged)."""
        return probs

    def __call__(self, probs: torch.Tensor, is_cross: bool, name: str, heads: int) -> torch.Tensor:
        """Probabilities (batch * heads, queries, keys) as diffusers' `Attention.get_attention_scores` returns them."""
        batch = probs.shape[0] // heads
        if batch not in (self.n_prompts, 2 * self.n_prompts):
            raise ValueError(f"expected a batch of {self.n_prompts} prompts (x2 with guidance), got {batch}")
        start = (batch - self.n_prompts) * heads  # with guidance the batch is [unconditional, conditional]
        cond = probs[start:].reshape(self.n_prompts, heads, *probs.shape[1:])
        cond = self.edit(cond, is_cross)
        probs = torch.cat([probs[:start], cond.reshape(-1, *probs.shape[1:])])
        if (self.record_cross and is_cross) or (self.record_self and not is_cross):
            self.maps["cross" if is_cross else "self"][(self.step, name)] = cond.detach().clone()
        self.layer += 1
        if self.layer == self.num_layers:
            self.step, self.layer = self.step + 1, 0
        return probs


class P2PController(AttentionStore):
    """Prompt-to-Prompt's controller for a (source, target) pair, the reference's `AttentionControlEdit` subclasses:
    row 0 of the conditional batch is the source, row 1 the target, whose maps are edited inside the windows."""

    def __init__(self, tokenizer, source: str, target: str, steps: int, *, cross_replace=0.8, self_replace=0.4,
                 mode: str = "replace", reweight: dict | None = None, self_max_pixels: int = SELF_MAX_PIXELS,
                 record_cross: bool = False, record_self: bool = False):  # fmt: skip
        super().__init__(2, record_cross, record_self)
        string_list("prompts", [source, target])
        integer_in("steps", steps, 1, 10**6)
        if mode not in MODES:
            raise ValueError(f"mode should be one of {MODES}, got {mode!r}")
        self.cross_window = replace_window(cross_replace, steps, steps + 1, "cross_replace")
        self.self_window = replace_window(self_replace, steps, steps, "self_replace")
        self.mode, self.self_max_pixels = mode, self_max_pixels
        src, tgt = token_ids(tokenizer, source), token_ids(tokenizer, target)
        if mode in ("replace", "reweight") and len(src) != len(tgt):
            raise ValueError(f"mode {mode!r} needs prompts of equal token length: {source!r} has {len(src)} tokens "
                             f"{src}, {target!r} has {len(tgt)} {tgt}; use mode='refine' for added words")  # fmt: skip
        length = tokenizer.model_max_length
        self.index, self.alphas = (torch.arange(length), torch.ones(length))
        if mode == "refine":
            self.index, self.alphas = refinement_mapper(tokenizer, source, target)
        self.equalizer = None
        if mode == "reweight" and not reweight:
            raise ValueError("mode 'reweight' needs reweight={word (or token position): c, ...}, got none")
        if reweight is not None:
            if not isinstance(reweight, dict):
                raise TypeError(f"reweight should be a dict {{word of the target prompt: c}}, got {type(reweight).__name__}")
            self.equalizer = torch.ones(length)
            for word, c in reweight.items():
                finite_number(f"reweight[{word!r}]", c)
                self.equalizer[word_positions(tokenizer, target, word)] = float(c)

    def in_window(self, window: tuple[int, int]) -> bool:
        return window[0] <= self.step < window[1]

    def edit(self, probs: torch.Tensor, is_cross: bool) -> torch.Tensor:
        if is_cross and self.in_window(self.cross_window):
            base, own = probs[0], probs[1]
            new = base[..., self.index.to(probs.device)]  # identity for word swap and re-weighting
            if self.mode == "refine":  # AttentionRefine: added tokens keep the target's own maps
                a = self.alphas.to(probs)
                new = new * a + own * (1 - a)
            if self.equalizer is not None:  # AttentionReweight: scale the chosen tokens' maps by c, no renormalising
                new = new * self.equalizer.to(probs)
            return torch.stack([base, new])
        if not is_cross and self.in_window(self.self_window) and probs.shape[-2] <= self.self_max_pixels:
            return torch.stack([probs[0], probs[0]])
        return probs


class P2PAttnProcessor:
    """diffusers' `AttnProcessor` (explicit softmax attention, as `Attention.get_attention_scores` computes it) with
    the controller's hook between the softmax and the product with the values."""

    def __init__(self, controller: AttentionStore, name: str):
        self.controller, self.name = controller, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        attention_probs = self.controller(attention_probs, is_cross, self.name, attn.heads)  # the one added line
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def controlled(pipe, controller: AttentionStore):
    """Inside the block every attention layer of `pipe.unet` runs through `controller`; the UNet's own processors are
    put back afterwards, also when the block raises."""
    saved = dict(pipe.unet.attn_processors)
    controller.num_layers = len(saved)
    controller.reset()
    try:
        pipe.unet.set_attn_processor({name: P2PAttnProcessor(controller, name) for name in saved})
        yield controller
    finally:
        pipe.unet.set_attn_processor(saved)


# --------------------------------------------------------------------------------------------
# Running the pipeline: plain, capturing maps, editing
# --------------------------------------------------------------------------------------------


def _check_run(pipe, latents, steps, guidance_scale, nulls) -> None:
    integer_in("steps", steps, 1, 10**6)
    finite_number("guidance_scale", guidance_scale)
    if guidance_scale < 1 or (nulls is not None and guidance_scale == 1):
        raise ValueError(f"expected guidance_scale > 1 with per-step nulls (>= 1 without): the pipeline runs no classifier-free "
                         f"guidance at guidance_scale <= 1, so no null embedding is used; got {guidance_scale}")  # fmt: skip
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[:2] != (1, pipe.unet.config.in_channels):
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"expected starting latents of shape (1, {pipe.unet.config.in_channels}, h, w), got {got}")
    if nulls is not None:
        if not isinstance(nulls, (list, tuple)) or len(nulls) != steps:
            raise ValueError(f"expected one null embedding per step ({steps}), got {nulls if nulls is None else len(nulls)}")
        if any(n.ndim != 3 or n.shape[0] != 1 for n in nulls):
            raise ValueError(f"expected null embeddings of shape (1, L, dim), got {[tuple(n.shape) for n in nulls][:2]}...")


@torch.no_grad()
def run(pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance_scale: float, nulls=None,
        controller: AttentionStore | None = None) -> torch.Tensor:  # fmt: skip
    """All `prompts` from the same starting latents (1, C, h, w) through the pipeline's own `__call__` (DDIM, eta 0),
    under `controller` if given; `nulls` (one (1, L, dim) null embedding per step, e.g. a null-text inversion's) are
    fed by a step-end callback as `sd.pipeline_reconstruct` does, shared by every prompt. Final latents (B, C, h, w)."""
    string_list("prompts", prompts)
    _check_run(pipe, latents, steps, guidance_scale, nulls)
    dt, b = pipe.unet.dtype, len(prompts)
    cond = sd.encode_prompts(pipe, prompts).to(dt)
    kwargs = {}
    if nulls is not None:  # fed as sd.pipeline_reconstruct feeds them (guidance_scale > 1 is checked above)
        kwargs = sd.null_feed([n.to(pipe.device, dt).expand(b, -1, -1) for n in nulls], cond, guidance_scale)
    start = latents.to(pipe.device, dt).expand(b, -1, -1, -1)
    h, w = (s * pipe.vae_scale_factor for s in latents.shape[-2:])
    with controlled(pipe, controller) if controller is not None else contextlib.nullcontext():
        out = pipe(prompt_embeds=cond, latents=start, num_inference_steps=steps, guidance_scale=guidance_scale,
                   height=h, width=w, eta=0.0, output_type="latent", **kwargs)  # fmt: skip
    return out.images.float()


def capture(pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance_scale: float, nulls=None,
            record_self: bool = False) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """A plain run that records the attention maps it uses: (final latents, `AttentionStore.maps`)."""
    store = AttentionStore(len(prompts), record_cross=True, record_self=record_self)
    return run(pipe, prompts, latents, steps, guidance_scale, nulls, store), store.maps


@dataclass
class EditResult:
    """Final latents of the source (reconstruction) and of the edit, each (1, C, h, w), and the recorded maps."""

    source: torch.Tensor
    target: torch.Tensor
    maps: dict | None = None


def edit(pipe, source_prompt: str, target_prompt: str, latents: torch.Tensor, *, steps: int, guidance_scale: float,
         cross_replace=0.8, self_replace=0.4, mode: str = "replace", reweight: dict | None = None, nulls=None,
         record: bool = False, record_self: bool = False) -> EditResult:  # fmt: skip
    """Prompt-to-Prompt: source and target prompts generated together from `latents`, the target's attention maps
    edited by a `P2PController` (mode "replace", "refine" or "reweight"; `reweight` = {word of the target: c} also on
    top of the other two, as the reference's `make_controller` does). With `nulls` from a null-text inversion of a real
    image and `latents` its z_T, the source row reconstructs the image and the target row is its edit (Mokady et al.
    2023). The UNet's attention processors are restored afterwards, also on error."""
    ctrl = P2PController(pipe.tokenizer, source_prompt, target_prompt, steps, cross_replace=cross_replace,
                         self_replace=self_replace, mode=mode, reweight=reweight, record_cross=record,
                         record_self=record_self)  # fmt: skip
    out = run(pipe, [source_prompt, target_prompt], latents, steps, guidance_scale, nulls, ctrl)
    return EditResult(out[:1], out[1:], ctrl.maps if record or record_self else None)


def edit_inversion(pipe, inv: Inversion, source_prompt: str, target_prompt: str, **options) -> EditResult:
    """`edit` of a real image inverted by `inversion.null_text_optimisation` on an `sd.PipelineWorld(pipe,
    [source_prompt])`: its z_T, steps, guidance scale and per-step nulls (the plain null embedding if not optimised)."""
    if inv.pivots[0].shape[0] != 1:
        raise ValueError(f"expected the inversion of one image, got {inv.pivots[0].shape[0]}: use inversion.subset")
    check_timesteps(inv.timesteps, sd.PipelineWorld(pipe, [source_prompt]).timesteps(inv.steps))
    return edit(pipe, source_prompt, target_prompt, inv.pivots[-1], steps=inv.steps, guidance_scale=inv.guidance_scale,
                nulls=inv.nulls, **options)  # fmt: skip


def mean_cross_map(maps: dict, row: int, pixels: int | None = None) -> torch.Tensor:
    """The cross-attention maps of prompt `row` averaged over steps, layers and heads (the reference's
    `aggregate_attention`), for layers with `pixels` queries (default: the most common), as (side, side, tokens)."""
    items = [m[row] for m in maps["cross"].values()]
    if not items:
        raise ValueError("no cross-attention maps recorded: pass record=True (edit) or use capture")
    sizes = [m.shape[-2] for m in items]
    pixels = max(set(sizes), key=sizes.count) if pixels is None else pixels
    chosen = [m.mean(0) for m in items if m.shape[-2] == pixels]
    if not chosen:
        raise ValueError(f"no layer has {pixels} query pixels; recorded sizes: {sorted(set(sizes))}")
    side = int(round(pixels**0.5))
    return torch.stack(chosen).mean(0).reshape(side, side, -1)
