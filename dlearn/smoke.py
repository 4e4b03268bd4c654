"""Chapter 11's path in one command, on any diffusers Stable Diffusion folder: what to run first on a GPU.

    python -m dlearn.smoke --path DIR [--out build/smoke] [--dtype float16] [--device cuda] [--image photo.png]
    make smoke SD_PATH=DIR

It loads the pipeline from the folder (never from the network) and runs, on one image (your `--image`, centre-cropped
and resized to the pipeline's size; by default a test digit of scikit-learn's set, scaled up):

1. the VAE round trip (the reconstruction bound of every inversion), DDIM inversion and its reconstruction without
   and with guidance, then null-text inversion (Mokady et al., 2023) and its reconstruction through the pipeline's loop;
2. a Prompt-to-Prompt word swap (Hertz et al., 2022) from the null-text inversion, beside a plain prompt swap;
3. a few ControlNet training steps (Zhang et al., 2023) on the image and its edge map, through `accelerate`;
4. a few DreamBooth steps (Ruiz et al., 2023) on the image, with one class-prior image drawn by the frozen pipeline,
   LoRA adapters of rank `--lora-rank` (default 4, kept in float32 on a half-precision pipeline; 0: a full fine-tune
   of the UNet and text encoder, float32 pipelines only), then one sample.

The training stages check that the code runs on your folder and what it costs, not what a fine-tune achieves: a few
steps on one image have no visible effect (chapter 11 measures effects on the trained tiny pipeline).

It writes `report.json` (seconds and peak memory per stage, PSNR of each reconstruction, the options, the device and
library versions) and `grid.png` (the images in stage order) to `--out`. On the book's tiny pipelines it runs in
seconds on a CPU (CI runs it); on a GPU with real weights in minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from dlearn import datasets, p2p, sd, sd_train
from dlearn import inversion as I

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_image(size: int, label: int = 7) -> torch.Tensor:
    """The first test digit `label` of scikit-learn's set as an RGB image of side `size` in [-1, 1] (nearest-neighbour
    scaling, so the digit's 8x8 cells stay sharp): what the smoke test inverts when no `--image` is given."""
    x, y = datasets.digits("test", form="unit")  # values in [-1, 1]
    i = int((y == label).nonzero()[0])
    img = x[i : i + 1]
    return torch.nn.functional.interpolate(img, size=(size, size), mode="nearest").expand(1, 3, size, size).contiguous()


def edge_map(images: torch.Tensor) -> torch.Tensor:
    """A control image for the ControlNet steps: the gradient magnitude of the grey image, in [0, 1], 3 channels."""
    grey = images.mean(1, keepdim=True)
    gx = torch.nn.functional.pad(grey[..., :, 1:] - grey[..., :, :-1], (0, 1, 0, 0))
    gy = torch.nn.functional.pad(grey[..., 1:, :] - grey[..., :-1, :], (0, 0, 0, 1))
    mag = (gx**2 + gy**2).sqrt()
    return (mag / mag.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)).expand_as(images).contiguous()


class Report:
    """Seconds and peak memory per stage, and the numbers each stage measures."""

    def __init__(self, device: torch.device):
        self.device, self.stages, self.values = device, {}, {}

    @contextmanager
    def stage(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        self.stages[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_memory_mb": round(peak / 2**20, 1),
                             "memory_kind": "CUDA allocated in the stage" if cuda else "process resident set so far"}
        print(f"  {name}: {self.stages[name]['seconds']:.2f} s", flush=True)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(I.psnr(a.float().cpu(), b.float().cpu()).mean()), 3)


def _prompts(prompt: str, edit: str, tokenizer) -> None:
    if len(p2p.token_ids(tokenizer, prompt)) != len(p2p.token_ids(tokenizer, edit)):
        raise ValueError(f"a word swap needs prompts of equal token length: --prompt {prompt!r} and --edit {edit!r} "
                         "differ (swap one word for another of the same length in tokens)")  # fmt: skip


def run(path, out="build/smoke", *, device: str | None = None, dtype: str = "float32", variant: str | None = None,
        image: str | None = None, prompt: str = "a seven", edit: str = "a one", steps: int = 20,
        guidance_scale: float = 4.0, inner_steps: int = 5, train_steps: int = 4, lora_rank: int | None = 4,
        mixed_precision: str = "no", gradient_checkpointing: bool = False, seed: int = 0) -> dict:  # fmt: skip
    """Run every stage on the pipeline folder `path` and write `report.json` and `grid.png` to `out`; returns the
    report. Defaults suit the book's tiny pipelines; for real weights pass your own `image`, `prompt` and `edit`."""
    from matplotlib.figure import Figure  # a figure without pyplot: the caller's backend (e.g. a notebook's) is left alone

    if dtype not in DTYPES:
        raise ValueError(f"expected dtype in {sorted(DTYPES)}, got {dtype!r}")
    sd.quiet()
    options = {k: v for k, v in locals().items() if k != "Figure"}
    options["path"], options["out"] = str(path), str(out)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rep = Report(dev)
    print(f"smoke test of {path} on {dev} ({dtype})", flush=True)
    with rep.stage("load"):
        pipe = sd.load_pipeline(path, device=dev, torch_dtype=DTYPES[dtype], variant=variant)
    _prompts(prompt, edit, pipe.tokenizer)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    x = (sd.load_image(image, size) if image is not None else default_image(size)).to(dev)
    shown = {"input": x}

    # 1. VAE bound, DDIM inversion, null-text inversion
    with rep.stage("vae"):
        z0 = sd.encode_images(pipe, x)
        shown["VAE round trip"] = sd.decode_latents(pipe, z0)
    world = sd.PipelineWorld(pipe, [prompt])
    with rep.stage("ddim_inversion"):
        inv = I.ddim_invert(world, z0, steps)
        rec1 = sd.decode_latents(pipe, I.reconstruct(world, inv, 1.0))
        recw = sd.decode_latents(pipe, I.reconstruct(world, inv, guidance_scale))
    shown[f"DDIM, w={guidance_scale:g}"] = recw
    with rep.stage("null_text"):
        nt = I.null_text_optimisation(world, inv, guidance_scale, inner_steps=inner_steps)
        rec_nt = sd.decode_latents(pipe, sd.pipeline_reconstruct(pipe, world, nt, guidance_scale))
    shown["null-text"] = rec_nt
    rep.values["psnr_db"] = {"vae_round_trip (bound)": _psnr(shown["VAE round trip"], x), "ddim_w1": _psnr(rec1, x),
                             f"ddim_w{guidance_scale:g}": _psnr(recw, x),
                             f"null_text_w{guidance_scale:g} (pipeline loop)": _psnr(rec_nt, x)}  # fmt: skip
    rep.values["null_text_adam_steps"] = int(nt.stats["optimiser_calls"])

    # 2. Prompt-to-Prompt word swap from the null-text inversion, beside a plain prompt swap
    with rep.stage("prompt_to_prompt"):
        res = p2p.edit_inversion(pipe, nt, prompt, edit)
        plain = p2p.run(pipe, [edit], nt.pivots[-1], steps, guidance_scale, nulls=nt.nulls)
    src, p2p_img, plain_img = (sd.decode_latents(pipe, z) for z in (res.source, res.target, plain))
    shown[f"P2P: {edit}"], shown[f"plain swap: {edit}"] = p2p_img, plain_img
    rep.values["edit_mse_to_source"] = {"prompt_to_prompt": round(float(((p2p_img - src) ** 2).mean()), 5),
                                        "plain_prompt_swap": round(float(((plain_img - src) ** 2).mean()), 5)}  # fmt: skip

    # 3. ControlNet training steps on the image and its edge map; 4. DreamBooth steps (they change the pipeline: last)
    train = {"steps": train_steps, "batch_size": 1, "mixed_precision": mixed_precision,
             "gradient_checkpointing": gradient_checkpointing, "seed": seed, "progress": False}  # fmt: skip
    control = edge_map(x)
    with rep.stage("controlnet"):
        cn = sd_train.controlnet_for(pipe).to(dev, torch.float32)  # trained in float32 whatever the pipeline's dtype
        hist = sd_train.train_controlnet(pipe, cn, x, [prompt], control, lr=1e-5, **train)
        from diffusers import StableDiffusionControlNetPipeline

        cpipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=cn.to(pipe.unet.dtype))  # sampled in its dtype
        cpipe.set_progress_bar_config(disable=True)
        controlled = cpipe(prompt, image=control, num_inference_steps=steps, guidance_scale=guidance_scale,
                           generator=torch.Generator().manual_seed(seed), output_type="pt").images * 2 - 1  # fmt: skip
    shown["control (edges)"], shown["ControlNet sample"] = control * 2 - 1, controlled
    rep.values["controlnet_losses"] = [round(v, 5) for v in hist["losses"]]
    words = prompt.split(" ")
    instance_prompt = " ".join([*words[:-1], "sks", words[-1]])
    with rep.stage("dreambooth"):
        prior = sd_train.class_images(pipe, prompt, 1, steps=steps, height=size, seed=seed)  # the autogenous class prior
        hist = sd_train.train_dreambooth(pipe, x, instance_prompt, prior, prompt, lr=1e-4 if lora_rank else 5e-6,
                                         lora_rank=lora_rank or None, train_text_encoder=not lora_rank, **train)  # fmt: skip
        g = torch.Generator().manual_seed(seed)
        sample = pipe(instance_prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
                      generator=g, output_type="pt").images * 2 - 1  # fmt: skip
    shown[f"DreamBooth: {instance_prompt}"] = sample
    rep.values["dreambooth_losses"] = [round(v, 5) for v in hist["losses"]]

    report = {"options": options, "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "size": size, "prediction_type": sd.prediction_type(pipe), "stages": rep.stages, **rep.values,
              "versions": _versions(), "python": platform.python_version()}  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    fig = Figure(figsize=(1.6 * len(shown), 2.0))
    ax = fig.subplots(1, len(shown))
    for a, (title, img) in zip(ax, shown.items(), strict=True):
        a.imshow(((img[0].float().cpu().permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
        a.set_title(title, fontsize=7)
        a.set_axis_off()
    fig.tight_layout()
    fig.savefig(out / "grid.png", dpi=120)
    print(f"wrote {out / 'report.json'} and {out / 'grid.png'}", flush=True)
    return report


def _versions() -> dict:
    import accelerate
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m dlearn.smoke", description=__doc__.split("\n\n")[0])
    ap.add_argument("--path", required=True, help="a diffusers Stable Diffusion folder (save_pretrained)")
    ap.add_argument("--out", default="build/smoke", help="where report.json and grid.png go")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--variant", default=None, help="weights variant, e.g. fp16 for *.fp16.safetensors folders")
    ap.add_argument("--image", default=None, help="your photo (centre-cropped, resized); default: a test digit")
    ap.add_argument("--prompt", default="a seven", help="the image's prompt (inversion, P2P source)")
    ap.add_argument("--edit", default="a one", help="the edited prompt: one word swapped, same token length")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=4.0)
    ap.add_argument("--inner-steps", type=int, default=5, help="null-text Adam steps per sampling step")
    ap.add_argument("--train-steps", type=int, default=4, help="ControlNet and DreamBooth steps each")
    ap.add_argument("--lora-rank", type=int, default=4,
                    help="DreamBooth LoRA rank (adapters in float32); 0: full fine-tune (float32 pipelines only)")  # fmt: skip
    ap.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    return run(a.path, a.out, device=a.device, dtype=a.dtype, variant=a.variant, image=a.image, prompt=a.prompt,
               edit=a.edit, steps=a.steps, guidance_scale=a.guidance_scale, inner_steps=a.inner_steps,
               train_steps=a.train_steps, lora_rank=a.lora_rank, mixed_precision=a.mixed_precision,
               gradient_checkpointing=a.gradient_checkpointing, seed=a.seed)  # fmt: skip


if __name__ == "__main__":
    main()
