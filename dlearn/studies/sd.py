"""Chapter 11's trained tiny Stable Diffusion: the recipe that trains it on the digits and the metrics it reaches.

The pipeline in dlearn/weights/tiny_sd (`TINY_SD`) is a diffusers `StableDiffusionPipeline` folder saved with
`save_pretrained`, loaded like any real checkpoint with `dlearn.sd.load_pipeline(TINY_SD)`. Its world:

- images: the book's digits (`dlearn.datasets`), upsampled from 8x8 to 16x16 by repeating each pixel 2x2 and
  repeated to three channels (RGB in [-1, 1]); the VAE halves the side, so latents are 8x8x4 (`digits_rgb`);
- captions: chapter 07's attribute captions ("a thick slanted large three"), one CLIP token per word
  (`dlearn.sd.tiny_tokenizer` with the whole caption vocabulary), padded to 77 tokens as in Stable Diffusion;
- components: an `AutoencoderKL` (factor 2, 4 latent channels), a `CLIPTextModel` trained from scratch *jointly*
  with the `UNet2DConditionModel` (unlike Stable Diffusion's frozen CLIP), and Stable Diffusion's DDIM scheduler
  (scaled-linear betas 0.00085..0.012, 1000 steps, steps_offset 1; Rombach et al. 2022, "High-resolution image
  synthesis with latent diffusion models").

The recipe (`train_tiny_sd`) has two stages, as latent diffusion does: (1) the VAE learns to reconstruct the
training digits with a small KL term, then is frozen; its `scaling_factor` is set to 1 / (standard deviation of
the training latents), which is how Stable Diffusion's 0.18215 was chosen; (2) the text encoder and the UNet learn
the eps-loss on the scaled latents, with random partial captions and 10% empty captions (for classifier-free
guidance). Each stage keeps the weights best on the validation split; the test split only reports.

`evaluate_tiny_sd` measures what the folder's `dlearn_metrics.json` records: the VAE's reconstruction error on the
test digits, and prompt class accuracy, attribute accuracy, Frechet distance and memorisation of samples, judged
as chapter 07 judges its samples (`dlearn.text2image.prompt_fidelity`: the book's digits classifier on the
samples brought back to 8x8 grey), at a guidance scale chosen on the validation split (`choose_guidance`).

    python -m dlearn.studies.sd train [--out DIR] [--seed N]   # trains, saves the folder, writes its metrics
    python -m dlearn.studies.sd check                          # re-measures the shipped folder's metrics
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dlearn import datasets, fileio, metrics, sd
from dlearn.distributions import levels_to_unit, unit_to_levels
from dlearn.text2image import SPECIAL, VOCAB, attribute_bits, caption, evaluation_prompts, prompt_fidelity, training_prompts
from dlearn.train import TrainConfig, fit

TINY_SD = Path(__file__).resolve().parent.parent / "weights" / "tiny_sd"
"""The shipped pipeline folder (`sd.load_pipeline(TINY_SD)` loads it)."""
METRICS_FILE = "dlearn_metrics.json"
WORDS = tuple(w for w in VOCAB if w not in SPECIAL)
"""Every word of the book's captions (and DreamBooth's spare identifiers): each becomes one CLIP token."""
SIZE = 16  # image side; the VAE halves it
GUIDANCE_SCALES = (1.0, 2.0, 4.0, 7.5)
TOLERANCES = {"vae_mse": 0.05, "class_accuracy": 0.03, "fd": 0.15}
"""`check`'s tolerances: relative for the VAE's errors and the FD, absolute for accuracies. On the CPU that trained
the folder the re-measurement is exact; these allow another machine's or library version's kernels."""


@dataclass
class Recipe:
    """The settings of `train_tiny_sd` (all recorded in the metrics file)."""

    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 400
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-3  # times the KL per latent element, beside the MSE per pixel
    text_hidden: int = 32
    text_layers: int = 3
    unet_channels: tuple[int, ...] = (32, 64)
    unet_steps: int = 3000
    unet_lr: float = 1e-3
    batch_size: int = 64
    p_uncond: float = 0.1
    ema: float = 0.995  # 0.999 would still weigh the initial weights by e^-3 after 3000 steps
    eval_every: int = 500
    val_samples: int = 150  # validation captions sampled to select the denoiser's checkpoint (w = 2, DDIM-20)
    sample_steps: int = 20
    extra: dict = field(default_factory=dict)  # free-form notes, recorded with the settings


# --------------------------------------------------------------------------------------------
# Data: the digits as 16x16 RGB images with captions
# --------------------------------------------------------------------------------------------


def to_rgb16(x: torch.Tensor) -> torch.Tensor:
    """8x8 grey digits in [-1, 1], (N, 1, 8, 8) -> (N, 3, 16, 16): each pixel repeated 2x2 and to three channels."""
    if x.ndim != 4 or x.shape[1:] != (1, 8, 8) or not x.is_floating_point():
        raise ValueError(f"expected float digits (N, 1, 8, 8) in [-1, 1], got {x.dtype} {tuple(x.shape)}")
    return x.repeat_interleave(2, -1).repeat_interleave(2, -2).expand(-1, 3, -1, -1).contiguous()


def to_digits(images: torch.Tensor) -> torch.Tensor:
    """16x16 RGB images in [-1, 1] -> 8x8 grey digits in [-1, 1], as the digits classifier takes them: the mean of
    the three channels, then the mean of each 2x2 block (the exact inverse of `to_rgb16`)."""
    if images.ndim != 4 or images.shape[1:] != (3, SIZE, SIZE):
        raise ValueError(f"expected images (N, 3, {SIZE}, {SIZE}), got {tuple(images.shape)}")
    return F.avg_pool2d(images.float().mean(1, keepdim=True), 2).clamp(-1, 1)


def digits_rgb(split: str = "train") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The digits of a split as the pipeline sees them: images (N, 3, 16, 16) in [-1, 1], labels (N,) and their full
    captions (class and the three attribute words, chapter 07's `caption`)."""
    x, y = datasets.digits(split)
    return to_rgb16(levels_to_unit(x)), y, caption(x, y)


# --------------------------------------------------------------------------------------------
# Components and pipeline
# --------------------------------------------------------------------------------------------


def scheduler_config() -> dict:
    """Stable Diffusion's scheduler settings (v1.x's scheduler_config.json, eps-prediction)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False, "prediction_type": "epsilon"}  # fmt: skip


def build_components(recipe: Recipe | None = None, seed: int = 0) -> dict:
    """Freshly initialised (seeded) components: tokenizer, text_encoder, vae, unet, scheduler (DDIM)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    r = recipe if recipe is not None else Recipe()
    tok = sd.tiny_tokenizer(words=WORDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(r.vae_channels),
                            layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SIZE)  # fmt: skip
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=r.text_hidden, intermediate_size=4 * r.text_hidden, num_attention_heads=4,
            num_hidden_layers=r.text_layers, max_position_embeddings=77, layer_norm_eps=1e-5,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            projection_dim=r.text_hidden))  # fmt: skip
        unet = UNet2DConditionModel(sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=tuple(r.unet_channels),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=r.text_hidden,
                                    attention_head_dim=8, norm_num_groups=8)  # fmt: skip
    return {"tokenizer": tok, "text_encoder": text_encoder, "vae": vae, "unet": unet,
            "scheduler": DDIMScheduler(**scheduler_config())}  # fmt: skip


def assemble(c: dict):
    """A `StableDiffusionPipeline` of components (no safety checker), progress bar off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
                                   scheduler=c["scheduler"], safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of the pipeline's three networks."""
    return {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("vae", "text_encoder", "unet")}


@torch.no_grad()
def sample(pipe, prompts: list[str], guidance_scale: float, steps: int = 20, seed: int = 0) -> torch.Tensor:
    """Images (N, 3, 16, 16) in [-1, 1] from the pipeline's own `__call__` (DDIM, eta 0, its classifier-free guidance
    with the empty prompt; guidance_scale 1 is the plain conditional model), initial latents from `seed`."""
    g = torch.Generator().manual_seed(seed)
    out = pipe(list(prompts), height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance_scale,
               generator=g, output_type="pt").images  # fmt: skip
    return out.float().cpu() * 2 - 1


# --------------------------------------------------------------------------------------------
# Training: the VAE, then text encoder + UNet on the frozen VAE's latents
# --------------------------------------------------------------------------------------------


def _vae_loss(kl_weight: float):
    def loss_fn(vae, batch, gen):
        (x,) = batch
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
        return ((vae.decode(z).sample - x) ** 2).mean() + kl_weight * kl

    return loss_fn


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Decoded posterior means, clamped to [-1, 1] (what `sd.encode_images` then `sd.decode_latents` give)."""
    vae.eval()
    out = [vae.decode(vae.encode(x[i : i + batch_size]).latent_dist.mean).sample for i in range(0, len(x), batch_size)]
    return torch.cat(out).clamp(-1, 1)


def train_vae(vae, recipe: Recipe, seed: int = 0, progress: bool | None = None):
    """Stage 1: MSE + kl_weight x KL on the training digits (posterior samples), AdamW, cosine decay; keeps the
    weights with the lowest validation reconstruction MSE. Returns `fit`'s TrainResult; `vae` ends frozen."""
    x_train, _, _ = digits_rgb("train")
    x_val, _, _ = digits_rgb("val")
    cfg = TrainConfig(max_steps=recipe.vae_steps, batch_size=recipe.batch_size, lr=recipe.vae_lr, lr_schedule="cosine",
                      eval_every=max(1, min(recipe.eval_every, recipe.vae_steps)), seed=seed, progress=progress)  # fmt: skip
    result = fit(vae, _vae_loss(recipe.vae_kl_weight), (x_train,), cfg,
                 val_fn=lambda m: ((reconstruct(m, x_val) - x_val) ** 2).mean().item())  # fmt: skip
    vae.eval().requires_grad_(False)
    return result


@torch.no_grad()
def latent_scale(vae, x: torch.Tensor, seed: int = 0) -> float:
    """1 / (standard deviation of posterior samples of the latents of `x`): SD's rule for `scaling_factor`."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(seed))
    return 1.0 / z.std().item()


class TextUNet(nn.Module):
    """The jointly trained pair: eps(z_t, t, caption ids) = unet(z_t, t, text_encoder(ids))."""

    def __init__(self, text_encoder, unet):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, encoder_hidden_states=self.text_encoder(ids)[0]).sample


def train_denoiser(c: dict, recipe: Recipe, seed: int = 0, progress: bool | None = None):
    """Stage 2: text encoder + UNet on the frozen VAE's scaled latents (posterior samples each step): eps-loss at t
    uniform over the 1000 steps, `DDPMScheduler.add_noise` with the pipeline's betas, random partial captions with
    `p_uncond` empty ones (`text2image.training_prompts`); AdamW, cosine decay, EMA; keeps the averaged weights with
    the lowest FD of `val_samples` samples of validation captions (w = 2) to the validation digits."""
    from diffusers import DDPMScheduler

    vae, tok = c["vae"], c["tokenizer"]
    x, y = datasets.digits("train")
    with torch.no_grad():
        post = vae.encode(to_rgb16(levels_to_unit(x))).latent_dist
    data = (post.mean, post.std, y, attribute_bits(x, y))
    scale = vae.config.scaling_factor
    noise = DDPMScheduler.from_config(c["scheduler"].config)
    model = TextUNet(c["text_encoder"], c["unet"])

    def ids_of(prompts):
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids

    def loss_fn(m, batch, gen):
        mean, std, labels, bits = batch
        ids = ids_of(training_prompts(labels, bits, gen, p_uncond=recipe.p_uncond))
        z0 = (mean + std * torch.randn(mean.shape, generator=gen)) * scale
        t = torch.randint(0, noise.config.num_train_timesteps, (len(z0),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        return ((m(noise.add_noise(z0, eps, t), t, ids) - eps) ** 2).mean()

    xv, yv = datasets.digits("val")
    keep = torch.randperm(len(yv), generator=torch.Generator().manual_seed(seed))[: recipe.val_samples]
    val_prompts = [p for i, p in enumerate(caption(xv, yv)) if i in set(keep.tolist())]
    clf = metrics.shipped_classifier()
    val_feats = metrics.features(clf, levels_to_unit(xv))

    def val_fn(m):
        imgs = sample(assemble(c), val_prompts, 2.0, steps=recipe.sample_steps, seed=1)
        return metrics.frechet_distance(metrics.features(clf, _quantised(to_digits(imgs))), val_feats)

    cfg = TrainConfig(max_steps=recipe.unet_steps, batch_size=recipe.batch_size, lr=recipe.unet_lr, lr_schedule="cosine",
                      ema=recipe.ema, eval_every=max(1, min(recipe.eval_every, recipe.unet_steps)), seed=seed,
                      progress=progress)  # fmt: skip
    result = fit(model, loss_fn, data, cfg, val_fn=val_fn)
    model.eval().requires_grad_(False)
    return result


def _quantised(x8: torch.Tensor) -> torch.Tensor:
    """8x8 digits rounded to the 17 grey levels, as `prompt_fidelity` judges samples."""
    return levels_to_unit(unit_to_levels(x8))


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def vae_metrics(pipe) -> dict[str, float]:
    """The VAE's reconstruction of the test digits (posterior mean, decoded, clamped; `sd.encode_images` then
    `sd.decode_latents`): MSE per pixel in [-1, 1] units at 16x16 RGB and after bringing both back to 8x8 grey
    (`to_digits`), each with its SE over images, beside the MSE of predicting the training split's mean image."""
    x, _, _ = digits_rgb("test")
    rec = sd.decode_latents(pipe, sd.encode_images(pipe, x)).cpu()
    mean_image = digits_rgb("train")[0].mean(0, keepdim=True)
    out = {}
    for name, a, b in (("vae_mse_16", rec, x), ("vae_mse_8", to_digits(rec), to_digits(x)),
                       ("mean_image_mse_16", mean_image.expand_as(x), x)):  # fmt: skip
        out[name], out[f"{name}_se"] = metrics.mean_se(((a - b) ** 2).mean((1, 2, 3)))
    return out


def _judge(images: torch.Tensor, classes: torch.Tensor, bits: torch.Tensor, clf) -> dict[str, float]:
    return prompt_fidelity(to_digits(images), classes, bits, clf)


def choose_guidance(pipe, scales=GUIDANCE_SCALES, steps: int = 20, seed: int = 1, classifier=None) -> tuple[float, dict]:
    """The guidance scale, chosen on the validation split: samples of every validation digit's caption at each scale
    (the same initial latents for every scale), judged by class accuracy and by the FD of their classifier features to
    the validation digits'. Rule: the highest class accuracy; a scale whose accuracy is not lower than the best by
    more than 2 SE of the paired per-caption difference (`metrics.paired_rank`) counts as tied, and the tie goes to
    the lowest FD.

    Returns:
        the scale and {scale: {"class_accuracy", "fd", "tied_with_best"}} on the validation split.
    """
    clf = classifier if classifier is not None else metrics.shipped_classifier()
    x, y = datasets.digits("val")
    prompts, val_feats = caption(x, y), metrics.features(clf, levels_to_unit(x))
    table, correct = {}, {}
    for w in scales:
        imgs = _quantised(to_digits(sample(pipe, prompts, w, steps, seed)))
        correct[float(w)] = (metrics.predict(clf, imgs).argmax(-1) == y).double()
        table[float(w)] = {"class_accuracy": correct[float(w)].mean().item(),
                           "fd": metrics.frechet_distance(metrics.features(clf, imgs), val_feats)}  # fmt: skip
    best = max(table, key=lambda w: table[w]["class_accuracy"])
    for w in table:
        table[w]["tied_with_best"] = w == best or metrics.paired_rank(correct[w], correct[best])[2] != "lower"
    return min((w for w in table if table[w]["tied_with_best"]), key=lambda w: table[w]["fd"]), table


def evaluate_tiny_sd(pipe, guidance_scale: float | None = None, seeds=(0, 1, 2), per_prompt: int = 6, steps: int = 20,
                     classifier=None) -> dict:  # fmt: skip
    """Everything the metrics file records about a pipeline (on CPU, float32):

    - parameter counts and the VAE's `scaling_factor`;
    - `vae_metrics` on the test digits;
    - the guidance scale (`choose_guidance` on the validation split unless given) and its validation table;
    - chapter 07's prompt fidelity (`text2image.prompt_fidelity`: class accuracy, attribute accuracy, FD to the test
      digits, memorisation) of samples of chapter 07's evaluation prompts (80 prompts x `per_prompt`; DDIM with
      `steps` steps) at that scale, once per sampling seed in `seeds`, with mean and SE over the seeds;
    - the FD floor: validation digits against test digits (the same classifier features).
    """
    clf = classifier if classifier is not None else metrics.shipped_classifier()
    out: dict = {"parameters": parameter_counts(pipe), "scaling_factor": float(pipe.vae.config.scaling_factor)}
    out.update(vae_metrics(pipe))
    if guidance_scale is None:
        guidance_scale, table = choose_guidance(pipe, steps=steps, classifier=clf)
        out["validation_guidance"] = {f"{w:g}": v for w, v in table.items()}
    out["guidance_scale"], out["sample_steps"], out["seeds"] = float(guidance_scale), steps, list(seeds)
    prompts, classes, bits = evaluation_prompts(per_prompt)
    runs = [_judge(sample(pipe, prompts, guidance_scale, steps, s), classes, bits, clf) for s in seeds]
    out["per_seed"] = runs
    for k in runs[0]:
        vals = [r[k] for r in runs]
        out[k] = sum(vals) / len(vals)
        if len(vals) > 1:
            out[f"{k}_se"] = metrics.mean_se(vals)[1]
    xv, _ = datasets.digits("val", form="unit")
    xt, _ = datasets.digits("test", form="unit")
    out["fd_floor_val_vs_test"] = metrics.frechet_distance(metrics.features(clf, xv), metrics.features(clf, xt))
    out["chance_class_accuracy"] = 0.1
    return out


# --------------------------------------------------------------------------------------------
# The recipe and the check
# --------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}  # fmt: skip


def train_tiny_sd(out_dir: str | Path = TINY_SD, seed: int = 0, recipe: Recipe | None = None, evaluate: bool = True,
                  progress: bool | None = None, seeds=(0, 1, 2)) -> dict:  # fmt: skip
    """Train the tiny pipeline by the recipe (module docstring), `save_pretrained` it into `out_dir` (safetensors) and
    write `dlearn_metrics.json` there: recipe, seed, seconds per stage, library versions and, with `evaluate`,
    `evaluate_tiny_sd`'s metrics. Seeded and deterministic on CPU with one thread. Returns what it wrote."""
    sd.quiet()
    r = recipe if recipe is not None else Recipe()
    c = build_components(r, seed)
    t0 = time.perf_counter()
    vae_result = train_vae(c["vae"], r, seed, progress)
    t1 = time.perf_counter()
    scale = latent_scale(c["vae"], digits_rgb("train")[0], seed)
    c["vae"].register_to_config(scaling_factor=scale)
    den_result = train_denoiser(c, r, seed, progress)
    t2 = time.perf_counter()
    pipe = assemble(c)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    record = {"recipe": "python -m dlearn.studies.sd train", "settings": asdict(r), "seed": seed,
              "torch_threads": torch.get_num_threads(),
              "train_seconds": {"vae": round(t1 - t0, 1), "denoiser": round(t2 - t1, 1)}, "versions": _versions(),
              "vae_best_step": vae_result.best_step, "vae_val_mse": vae_result.best_metric,
              "denoiser_best_step": den_result.best_step, "denoiser_val_fd": den_result.best_metric,
              "denoiser_history": den_result.history}  # fmt: skip
    if evaluate:
        t3 = time.perf_counter()
        record["metrics"] = evaluate_tiny_sd(pipe, seeds=seeds, steps=r.sample_steps)
        record["evaluate_seconds"] = round(time.perf_counter() - t3, 1)
    fileio.write_text(out / METRICS_FILE, json.dumps(record, indent=1) + "\n")
    return record


def read_metrics(path: str | Path = TINY_SD) -> dict:
    """The metrics file a pipeline folder ships (`train_tiny_sd` wrote it)."""
    file = Path(path) / METRICS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: expected a folder written by train_tiny_sd")
    return json.loads(file.read_text())


def compare(recorded: dict, measured: dict, seed_index: int | None = None) -> list[str]:
    """What moved beyond `TOLERANCES` between a recorded and a re-measured metrics dict (empty: nothing). With
    `seed_index`, the measured sample metrics are one seed's and are compared with that seed's record."""
    rec_samples = recorded["per_seed"][seed_index] if seed_index is not None else recorded
    got_samples = measured["per_seed"][0] if seed_index is not None else measured
    problems = []
    for key, kind, tol, a, b in (
        ("vae_mse_16", "rel", TOLERANCES["vae_mse"], recorded, measured),
        ("vae_mse_8", "rel", TOLERANCES["vae_mse"], recorded, measured),
        ("class_accuracy", "abs", TOLERANCES["class_accuracy"], rec_samples, got_samples),
        ("fd", "rel", TOLERANCES["fd"], rec_samples, got_samples),
    ):
        limit = tol * abs(a[key]) if kind == "rel" else tol
        if abs(a[key] - b[key]) > limit:
            problems.append(f"{key}: recorded {a[key]:.4g}, measured {b[key]:.4g} (tolerance {limit:.3g})")
    return problems


def check(path: str | Path = TINY_SD, quick: bool = False) -> list[str]:
    """Re-measure a shipped folder's metrics (on CPU, at its recorded guidance scale) and list what moved beyond
    `TOLERANCES`; `quick` samples only the first recorded seed."""
    sd.quiet()
    rec = read_metrics(path)["metrics"]
    pipe = sd.load_pipeline(path, device="cpu")
    seeds = rec["seeds"][:1] if quick else rec["seeds"]
    got = evaluate_tiny_sd(pipe, rec["guidance_scale"], seeds=seeds, steps=rec["sample_steps"])
    return compare(rec, got, 0 if quick else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlearn.studies.sd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the tiny pipeline and write its folder and metrics")
    tr.add_argument("--out", default=str(TINY_SD), help="folder to write (default: the shipped one)")
    tr.add_argument("--seed", type=int, default=0)
    ck = sub.add_parser("check", help="re-measure the shipped folder's metrics; fail if any moved beyond tolerance")
    ck.add_argument("--path", default=str(TINY_SD))
    ck.add_argument("--quick", action="store_true", help="one sampling seed instead of all")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "train":
        record = train_tiny_sd(args.out, seed=args.seed, progress=True)
        print(json.dumps({k: record[k] for k in ("train_seconds", "metrics") if k in record}, indent=1))
    else:
        problems = check(args.path, quick=args.quick)
        print("\n".join(problems) if problems else "all metrics within tolerance")
        if problems:
            sys.exit(1)


if __name__ == "__main__":
    main()
