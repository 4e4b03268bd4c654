"""Chapter 11: the book's ControlNet, DreamBooth and null-text code on a diffusers Stable Diffusion pipeline.

Thin adapters, not a second implementation:

- `load_pipeline` loads a reader's own weights from a local folder (argument, or the `DLEARN_SD_PATH` environment
  variable), never from the network, with a clear error naming what is missing;
- `tiny_pipeline` builds a randomly initialised pipeline with Stable Diffusion's anatomy in code (a tokenizer with an
  in-code vocabulary, a tiny CLIP text model, VAE and UNet, a DDIM scheduler): what CI runs the chapter on;
- `PipelineWorld` gives chapter 10's `inversion` functions the pipeline's UNet, text encoder and scheduler, so
  `inversion.ddim_invert` and `inversion.null_text_optimisation` run unchanged on latents; `pipeline_reconstruct`
  feeds the per-step null embeddings through the pipeline's own loop.

Training on the pipeline (ControlNet, DreamBooth, accelerate) is in `dlearn.sd_train`; Prompt-to-Prompt attention
control in `dlearn.p2p`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from dlearn.inversion import check_timesteps

ENV_VAR = "DLEARN_SD_PATH"
REQUIRED = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
TINY_WORDS = ("a", "photo", "of", "sks", "dog", "digit", "zero", "one", "two", "three", "seven", "eight", "thick", "thin")


def quiet() -> None:
    """Silence the libraries' import-time messages and progress bars (not warnings of real problems): transformers'
    and diffusers' loggers to errors only, their progress bars off. Call before building or loading pipelines."""
    import diffusers
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------
# Building (tiny, in code) and loading (a reader's folder, offline)
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's byte-level BPE uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_tokenizer(words=TINY_WORDS, model_max_length: int = 77):
    """A CLIP tokenizer built offline from an in-code vocabulary: byte-level BPE whose merges make each of `words`
    one token (a word without its merges would split into several byte tokens); unknown words fall back to bytes."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b, *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=model_max_length)


def tiny_pipeline(seed: int = 0):
    """A randomly initialised `StableDiffusionPipeline` with SD's anatomy at toy size (VAE factor 2, 64x64 images,
    32x32x4 latents), a DDIM scheduler configured like SD's (scaled-linear betas, steps_offset 1, final alpha-bar =
    alpha_bar[0]). Random weights: it denoises nothing, but every code path of the chapter runs on it."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
            max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=32))  # fmt: skip
        vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            sample_size=64)  # fmt: skip
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_path(path: str | os.PathLike | None = None) -> Path:
    """The pipeline folder: `path`, else the `DLEARN_SD_PATH` environment variable; a clear error otherwise."""
    if path is None:
        path = os.environ.get(ENV_VAR)
        if not path:
            raise FileNotFoundError(
                f"no Stable Diffusion folder given: pass a path or set {ENV_VAR} to a local diffusers folder "
                f"(with {', '.join(REQUIRED)}); dlearn never downloads weights"
            )
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a directory: expected a diffusers pipeline folder saved with save_pretrained")
    missing = [name for name in REQUIRED if not (p / name).exists()]
    if missing:
        raise FileNotFoundError(f"{p} is not a complete diffusers Stable Diffusion folder: missing {missing}")
    return p


def load_pipeline(path: str | os.PathLike | None = None, controlnet=None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, *, torch_dtype: torch.dtype | None = None,
                  variant: str | None = None):  # fmt: skip
    """A `StableDiffusionPipeline` (or `StableDiffusionControlNetPipeline` when `controlnet` is a `ControlNetModel`
    or a local ControlNet folder) from a local folder only (`local_files_only=True`: never a download), with a DDIM
    scheduler made from the folder's scheduler config, the progress bar off, on `device` (default: cuda if present).

    `torch_dtype` (or its alias `dtype`) and `variant` go to diffusers' `from_pretrained`: a folder holding only
    half-precision weights (`*.fp16.safetensors`) loads with `variant="fp16", torch_dtype=torch.float16`. Null-text
    inversion on such a pipeline still optimises the null embedding in float32 (see `PipelineWorld`)."""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    for name, value in (("dtype", dtype), ("torch_dtype", torch_dtype)):
        if value is not None and not isinstance(value, torch.dtype):
            raise TypeError(f"{name} must be a torch.dtype such as torch.float16, got {type(value).__name__} {value!r}")
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype and torch_dtype name the same thing: expected one or equal values, got {dtype}, {torch_dtype}")
    if variant is not None and (not isinstance(variant, str) or not variant):
        raise TypeError(f"variant must be a non-empty str such as 'fp16', got {type(variant).__name__} {variant!r}")
    p = resolve_path(path)
    weights = [f.name for f in (p / "unet").glob("diffusion_pytorch_model*") if f.suffix in (".safetensors", ".bin")]
    variants = sorted({n.split(".")[1].split("-")[0] for n in weights if n.count(".") == 2})
    if variant is None and variants and all(n.count(".") == 2 for n in weights):
        raise FileNotFoundError(f"{p / 'unet'} holds only the {variants} weight variant(s), no default weights: "
                                f"expected load_pipeline(..., variant={variants[0]!r}, torch_dtype=torch.float16), "
                                "got variant=None")  # fmt: skip
    torch_dtype = torch_dtype if torch_dtype is not None else dtype
    kwargs = {"local_files_only": True, **({"dtype": torch_dtype} if torch_dtype is not None else {}),  # diffusers 0.42 name
              **({"variant": variant} if variant is not None else {})}  # fmt: skip
    if controlnet is not None:
        if isinstance(controlnet, (str, os.PathLike)):
            cn_path = Path(controlnet).expanduser()
            if not (cn_path / "config.json").exists():
                raise FileNotFoundError(f"{cn_path} is not a ControlNet folder saved with save_pretrained (no config.json)")
            controlnet = ControlNetModel.from_pretrained(cn_path, **kwargs)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(p, controlnet=controlnet, safety_checker=None,
                                                                 requires_safety_checker=False, **kwargs)  # fmt: skip
    else:
        pipe = StableDiffusionPipeline.from_pretrained(p, safety_checker=None, requires_safety_checker=False, **kwargs)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    # diffusers before 0.40 reads `torch_dtype`, not `dtype`: cast explicitly so the dtype asked for is the one you get
    return pipe.to(device) if torch_dtype is None else pipe.to(device, torch_dtype)


# --------------------------------------------------------------------------------------------
# Images <-> latents, prompts -> embeddings
# --------------------------------------------------------------------------------------------


def check_images(pipe, images: torch.Tensor) -> None:
    """Images must be (B, 3, H, W) in [-1, 1] with H, W multiples of the VAE factor."""
    f = pipe.vae_scale_factor
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] % f or images.shape[-2] % f:
        raise ValueError(f"expected images (B, 3, H, W) in [-1, 1] with H, W multiples of {f}, got {tuple(images.shape)}")


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Latents z0 = mean of the VAE posterior x scaling factor (as the null-text reference code does), float32."""
    check_images(pipe, images)
    vae = pipe.vae
    return (vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor).float()


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float32) from latents."""
    vae = pipe.vae
    return vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample.clamp(-1, 1).float()


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """A reader's photo as `encode_images` expects it: opened with PIL, converted to RGB, centre-cropped to a square
    (side = the shorter side), resized to `size` x `size` (bicubic); a (1, 3, size, size) float32 tensor in [-1, 1]."""
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int (the pipeline's image side, e.g. 512), got {type(size).__name__} {size!r}")
    if size <= 0:
        raise ValueError(f"size must be a positive int (the pipeline's image side, e.g. 512), got {size}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"expected an image file (PNG, JPEG, ...), got {p}, which is not a file")
    with Image.open(p) as im:
        im = im.convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return (x.permute(2, 0, 1).float() / 127.5 - 1).unsqueeze(0)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder outputs (B, 77, dim), exactly as the pipeline computes `prompt_embeds`."""
    cond, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
    return cond


# --------------------------------------------------------------------------------------------
# Null-text inversion on the pipeline (chapter 10's code through a World)
# --------------------------------------------------------------------------------------------


class PipelineWorld:
    """Chapter 10's `World` for a pipeline: eps from the pipeline's UNet, alpha-bar and timesteps from its (DDIM)
    scheduler, embeddings from its text encoder. `inversion.ddim_invert`, `reconstruct` and
    `null_text_optimisation` then run on latents unchanged.

    Only the null embedding is optimised: each `eps` call runs the UNet with its parameters' `requires_grad`
    switched off and restores the reader's flags afterwards, so a backward pass fills no parameter `.grad` and
    leaves the model's state as it was. Embeddings, latents and predictions are float32 whatever the UNet's dtype
    (a float16 pipeline computes in float16 inside the UNet; Adam's updates of the null stay in float32)."""

    def __init__(self, pipe, prompts: list[str]):
        from diffusers import DDIMScheduler

        if not isinstance(pipe.scheduler, DDIMScheduler):
            raise TypeError(f"null-text inversion needs a DDIMScheduler; the pipeline has {type(pipe.scheduler).__name__}: "
                            "set pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)")  # fmt: skip
        self.pipe, self.prompts = pipe, list(prompts)
        self.alpha_bar = pipe.scheduler.alphas_cumprod.to(pipe.device, torch.float32)
        self.final_alpha_bar = float(pipe.scheduler.final_alpha_cumprod)
        self.num_train = pipe.scheduler.config.num_train_timesteps
        self.kind = prediction_type(pipe)
        self._cond = encode_prompts(pipe, self.prompts).float()
        self._null = encode_prompts(pipe, [""]).float()

    def timesteps(self, steps: int) -> list[int]:
        """The pipeline scheduler's own timesteps for `steps` steps (with its offset)."""
        self.pipe.scheduler.set_timesteps(steps)
        return [int(t) for t in self.pipe.scheduler.timesteps]

    def null_init(self, n: int) -> torch.Tensor:
        return self._null.expand(n, -1, -1).clone()

    def cond_init(self, n: int) -> torch.Tensor:
        return self._cond[:n].clone()

    def eps(self, x: torch.Tensor, t: int, embedding: torch.Tensor) -> torch.Tensor:
        """The noise prediction at `x`, time `t`: the UNet's output, converted to eps where the UNet predicts v."""
        unet = self.pipe.unet
        with frozen(unet):
            out = unet(x.to(unet.dtype), t, encoder_hidden_states=embedding.to(unet.dtype)).sample.float()
        return as_eps(out, x.float(), self.alpha_bar[t], self.kind)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def prediction_type(pipe) -> str:
    """What the pipeline's UNet predicts, read from its scheduler's config: "epsilon" (SD 1.x, SD 2.x-base) or
    "v_prediction" (SD 2.x at 768 px); anything else (e.g. "sample") raises, naming the two supported."""
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"expected a scheduler with prediction_type in {PREDICTION_TYPES}, got {kind!r}")
    return kind


def as_eps(out: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor | float, kind: str) -> torch.Tensor:
    """The noise eps implied by a UNet output. With x_t = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps -
    sqrt(1 - a) x0 (Salimans & Ho, 2022), eps = sqrt(a) v + sqrt(1 - a) x_t; an eps-prediction passes unchanged."""
    if kind == "epsilon":
        return out
    if kind != "v_prediction":
        raise ValueError(f"expected kind in {PREDICTION_TYPES}, got {kind!r}")
    a = torch.as_tensor(alpha_bar_t, dtype=out.dtype, device=out.device)
    return a.sqrt() * out + (1 - a).sqrt() * x_t


def training_target(pipe, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet's output is regressed on: eps for an eps-prediction pipeline, v = sqrt(a) eps - sqrt(1 - a) x0
    for a v-prediction one (the scheduler's own `get_velocity`), as diffusers' training examples do."""
    if prediction_type(pipe) == "epsilon":
        return eps
    return pipe.scheduler.get_velocity(latents, eps, t)


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """Parameters of `modules` do not require gradients inside the block; each one's own flag is restored after."""
    params = [q for m in modules for q in m.parameters()]
    flags = [q.requires_grad for q in params]
    try:
        for q in params:
            q.requires_grad_(False)
        yield
    finally:
        for q, f in zip(params, flags, strict=True):
            q.requires_grad_(f)


@torch.no_grad()
def pipeline_reconstruct(pipe, world: PipelineWorld, inv, guidance_scale: float) -> torch.Tensor:
    """Sample back through the pipeline's own `__call__`, feeding the per-step null embeddings with a step-end
    callback. Inside the loop the pipeline keeps `prompt_embeds = cat([null, cond])` (negative first); the callback
    after step i replaces it with step i+1's null. Returns the final latents."""
    check_timesteps(inv.timesteps, world.timesteps(inv.steps))
    if guidance_scale < 1:  # diffusers' pipeline skips guidance below 1 (eps_c alone), the book's loop extrapolates
        raise ValueError(f"expected guidance_scale >= 1 (the pipeline's guidance is off below 1), got {guidance_scale}")
    nulls = inv.nulls if inv.nulls is not None else [world.null_init(len(inv.pivots[0]))] * inv.steps
    cond = world.cond_init(len(inv.pivots[0]))

    dt = pipe.unet.dtype  # the world keeps float32; the pipeline's loop runs in the UNet's dtype
    nulls, cond = [n.to(dt) for n in nulls], cond.to(dt)

    out = pipe(prompt_embeds=cond, latents=inv.pivots[-1].to(dt), num_inference_steps=inv.steps,
               guidance_scale=guidance_scale, output_type="latent", **null_feed(nulls, cond, guidance_scale))  # fmt: skip
    return out.images.float()


def null_feed(nulls: list[torch.Tensor], cond: torch.Tensor, guidance_scale: float) -> dict:
    """The keyword arguments that make the pipeline's `__call__` use a null embedding per step: step 0's as
    `negative_prompt_embeds`, and a step-end callback that after step i sets `prompt_embeds = cat([null_{i+1}, cond])`
    (the pipeline's own concatenation, negative first). At w = 1 the pipeline runs the prompt alone: no null is used."""

    def step_end(p, i, t, kwargs):
        if i + 1 < len(nulls) and guidance_scale > 1:
            kwargs["prompt_embeds"] = torch.cat([nulls[i + 1], cond])
        return kwargs

    return {"negative_prompt_embeds": nulls[0], "callback_on_step_end": step_end,
            "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}  # fmt: skip
