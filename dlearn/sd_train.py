"""Chapter 11, training on the pipeline: chapter 08's ControlNet and chapter 09's DreamBooth objectives on a diffusers
Stable Diffusion pipeline's UNet and text encoder.

- `controlnet_for` and `controlnet_loss` are chapter 08's ControlNet and loss on the pipeline's UNet;
- `dreambooth_loss` is chapter 09's prior-preservation loss on the pipeline's UNet and text encoder;
- `class_images` samples the autogenous class prior from the frozen pipeline.
"""

from __future__ import annotations

import torch

from dlearn.dreambooth import check_prior_weight
from dlearn.sd import check_images, encode_images, encode_prompts

# --------------------------------------------------------------------------------------------
# ControlNet (chapter 08) and DreamBooth (chapter 09) training steps on the pipeline
# --------------------------------------------------------------------------------------------


def controlnet_for(pipe, conditioning_channels: int = 3):
    """Chapter 08's ControlNet for the pipeline's UNet: `ControlNetModel.from_unet` (the trainable copy, zero
    convolutions), with a condition encoder that maps an image-sized condition to the latent grid (it downsamples
    by the VAE factor: widths (16, 32, 96, 256) for SD's 8, (16, 32) for the tiny pipeline's 2)."""
    from diffusers import ControlNetModel

    levels = int(round(torch.log2(torch.tensor(float(pipe.vae_scale_factor))).item())) + 1
    widths = (16, 32, 96, 256)[:levels]
    return ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=widths,
                                     conditioning_channels=conditioning_channels)  # fmt: skip


def _noisy(pipe, latents, generator):
    sched = pipe.scheduler
    t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    eps = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    return sched.add_noise(latents, eps, t), t, eps


def _drop_prompts(prompts: list[str], p_uncond: float, generator: torch.Generator) -> list[str]:
    keep = torch.rand(len(prompts), generator=generator) >= p_uncond
    return [p if k else "" for p, k in zip(prompts, keep.tolist(), strict=True)]


def controlnet_loss(pipe, controlnet, images: torch.Tensor, prompts: list[str], controls: torch.Tensor,
                    generator: torch.Generator, p_uncond: float = 0.5) -> torch.Tensor:  # fmt: skip
    """Chapter 08's objective (paper eq. 5) on the pipeline: eps-loss of the locked UNet with the ControlNet's
    residuals, half of the prompts replaced by the empty one. Only the ControlNet should require gradients."""
    check_images(pipe, images)
    if controls.shape[0] != images.shape[0] or controls.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"expected one image-sized control per image {tuple(images.shape)}, got {tuple(controls.shape)}")
    latents = encode_images(pipe, images)
    z_t, t, eps = _noisy(pipe, latents, generator)
    with torch.no_grad():
        text = encode_prompts(pipe, _drop_prompts(prompts, p_uncond, generator))
    down, mid = controlnet(z_t, t, encoder_hidden_states=text, controlnet_cond=controls.to(z_t.device, z_t.dtype),
                           return_dict=False)  # fmt: skip
    pred = pipe.unet(z_t, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid).sample  # fmt: skip
    return ((pred - eps) ** 2).mean()


def dreambooth_loss(pipe, instance_images: torch.Tensor, instance_prompt: str, class_images: torch.Tensor | None,
                    class_prompt: str, generator: torch.Generator, prior_weight: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Chapter 09's loss (paper eq. 2) on the pipeline: eps-loss on the instance images with "a [V] [class]" plus
    `prior_weight` x the eps-loss on class images (samples of the frozen pipeline for "a [class]"). Gradients reach
    the UNet and the text encoder (whichever require them)."""
    from transformers import BatchEncoding

    prior_weight = check_prior_weight(prior_weight)  # NaN would silently switch prior preservation off

    def one(images, prompt):
        latents = encode_images(pipe, images)
        z_t, t, eps = _noisy(pipe, latents, generator)
        tok: BatchEncoding = pipe.tokenizer([prompt] * len(images), padding="max_length",
                                            max_length=pipe.tokenizer.model_max_length, return_tensors="pt")  # fmt: skip
        text = pipe.text_encoder(tok.input_ids.to(pipe.device))[0]
        return ((pipe.unet(z_t, t, encoder_hidden_states=text).sample - eps) ** 2).mean()

    loss = one(instance_images, instance_prompt)
    if class_images is not None and prior_weight > 0:
        loss = loss + prior_weight * one(class_images, class_prompt)
    return loss


@torch.no_grad()
def class_images(pipe, class_prompt: str, n: int, steps: int = 20, height: int | None = None, seed: int = 0) -> torch.Tensor:
    """The autogenous class prior: `n` images in [-1, 1] sampled from the (frozen) pipeline for `class_prompt`."""
    g = torch.Generator().manual_seed(seed)
    out = pipe([class_prompt] * n, num_inference_steps=steps, height=height, width=height, generator=g, output_type="pt")
    return out.images.to(pipe.device) * 2 - 1


def accelerated_training_step(loss_fn, model: torch.nn.Module, optimizer, accelerator=None):
    """One optimiser step through `accelerate` (multi-GPU when launched with `accelerate launch`; one process here):
    `accelerator.backward` in place of `loss.backward`. Returns the loss as a float."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available()) if accelerator is None else accelerator
    model, optimizer = accelerator.prepare(model, optimizer)
    optimizer.zero_grad()
    loss = loss_fn()
    accelerator.backward(loss)
    optimizer.step()
    return float(loss.detach())
