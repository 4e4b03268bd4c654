"""Chapter 11, training on the pipeline: chapter 08's ControlNet and chapter 09's DreamBooth objectives on a diffusers
Stable Diffusion pipeline's UNet and text encoder, and the loops that train them through Hugging Face `accelerate`.

- `controlnet_for`, `controlnet_loss`: chapter 08's ControlNet and loss on the pipeline's UNet; `dreambooth_loss`:
  chapter 09's prior-preservation loss on its UNet and text encoder (`embed_prompts`: prompt encoding with gradients);
  `class_images` samples the autogenous class prior from the frozen pipeline;
- `train_controlnet` and `train_dreambooth` train them, one script for one CPU, one GPU or `accelerate launch` on
  several: the structure of diffusers' examples/controlnet/train_controlnet.py, examples/dreambooth/train_dreambooth.py
  and train_dreambooth_lora.py. The trained modules, the optimiser and the data loader are prepared once; the loss
  runs through the prepared modules (so several processes average their gradients); with gradient accumulation,
  mixed precision ("no", "fp16", "bf16"), gradient checkpointing, `save_state` checkpoints and LoRA adapters (peft).
  As in those examples, the frozen modules may be half precision; what trains is float32.

Both losses regress the UNet's output on `sd.training_target`: the noise (eps-prediction) or v (Salimans & Ho, 2022).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch.utils.data import default_collate

from dlearn.dreambooth import check_prior_weight
from dlearn.sd import check_images, encode_images, training_target

MIXED_PRECISION = ("no", "fp16", "bf16")
LORA_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the UNet's attention projections (train_dreambooth_lora.py)
LORA_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's attention projections


# ---- ControlNet (chapter 08) and DreamBooth (chapter 09) losses on the pipeline ----
def controlnet_for(pipe, conditioning_channels: int = 3):
    """Chapter 08's ControlNet for the pipeline's UNet: `ControlNetModel.from_unet` (the trainable copy, zero convolutions)
    in float32 whatever the UNet's dtype (train it so), with a condition encoder that maps an image-sized condition to
    the latent grid (it downsamples by the VAE factor: widths (16, 32, 96, 256) for SD's 8, (16, 32) for the tiny's 2)."""
    from diffusers import ControlNetModel

    widths = (16, 32, 96, 256)[: int(pipe.vae_scale_factor).bit_length()]  # log2(factor) + 1 levels
    return ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=widths,
                                     conditioning_channels=conditioning_channels)  # fmt: skip


def _per_example(generator, n: int, draw) -> torch.Tensor:
    """`draw(g, k)` gives k items. One generator draws the whole batch; a list of `n` generators, one per example,
    draws each example's item from its own, so that an example's noise does not depend on the batch it is in."""
    if isinstance(generator, torch.Generator):
        return draw(generator, n)
    if len(generator) != n:
        raise ValueError(f"expected one torch.Generator or a list of one per example ({n}), got {len(generator)}")
    return torch.cat([draw(g, 1) for g in generator])


def _noisy(pipe, latents: torch.Tensor, generator):
    """z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps with t uniform on the scheduler's training steps (then eps: per example)."""
    num_train = pipe.scheduler.config.num_train_timesteps
    t = _per_example(generator, len(latents), lambda g, k: torch.randint(0, num_train, (k,), generator=g))
    eps = _per_example(generator, len(latents), lambda g, k: torch.randn((k, *latents.shape[1:]), generator=g))
    t, eps = t.to(latents.device), eps.to(latents.device, latents.dtype)
    return pipe.scheduler.add_noise(latents, eps, t), t, eps


def _drop_prompts(prompts: list[str], p_uncond: float, generator) -> list[str]:
    keep = _per_example(generator, len(prompts), lambda g, k: torch.rand(k, generator=g)) >= p_uncond
    return [p if k else "" for p, k in zip(prompts, keep.tolist(), strict=True)]


def embed_prompts(pipe, prompts: list[str], text_encoder=None) -> torch.Tensor:
    """Text-encoder outputs (B, 77, dim) as the pipeline's `encode_prompt` computes them (tokens padded to 77, last
    hidden state), through `text_encoder` (default the pipeline's; a prepared one in training), with gradients where
    its parameters require them (`sd.encode_prompts` is the no-gradient version)."""
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")  # fmt: skip
    te = pipe.text_encoder if text_encoder is None else text_encoder
    return te(tok.input_ids.to(pipe.device))[0]


def _squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error, in float32 whatever the autocast dtype (as diffusers' examples compute it)."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)


def _dtype(module) -> torch.dtype:
    """The dtype of `module`'s first parameter (through a DDP wrapper too): with LoRA, the base weights' (peft casts)."""
    return next(module.parameters()).dtype


def controlnet_loss(pipe, controlnet, images: torch.Tensor, prompts: list[str], controls: torch.Tensor, generator,
                    p_uncond: float = 0.5, *, unet=None) -> torch.Tensor:  # fmt: skip
    """Chapter 08's objective (paper eq. 5) on the pipeline: the locked UNet (`unet`, default the pipeline's) with the
    ControlNet's residuals regressed on `sd.training_target` (eps or v), prompts replaced by the empty one with
    probability `p_uncond`. Only the ControlNet should require gradients. `generator`: one `torch.Generator` for the
    batch, or a list of one per example (what the training loop passes)."""
    check_images(pipe, images)
    if controls.shape[0] != images.shape[0] or controls.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"expected one image-sized control per image {tuple(images.shape)}, got {tuple(controls.shape)}")
    if len(prompts) != len(images):
        raise ValueError(f"expected one prompt per image ({len(images)}), got {len(prompts)}")
    unet = pipe.unet if unet is None else unet
    latents = encode_images(pipe, images)
    z_t, t, eps = _noisy(pipe, latents, generator)
    with torch.no_grad():  # the text encoder is locked too
        text = embed_prompts(pipe, _drop_prompts(prompts, p_uncond, generator))
    c, u = _dtype(controlnet), _dtype(unet)  # e.g. a float32 ControlNet on a float16 UNet: each gets its own dtype
    down, mid = controlnet(z_t.to(c), t, encoder_hidden_states=text.to(c), controlnet_cond=controls.to(z_t.device, c),
                           return_dict=False)  # fmt: skip
    pred = unet(z_t.to(u), t, encoder_hidden_states=text.to(u), down_block_additional_residuals=[d.to(u) for d in down],
                mid_block_additional_residual=mid.to(u), return_dict=False)[0]  # fmt: skip
    return _squared_error(pred, training_target(pipe, latents, eps, t)).mean()


def dreambooth_loss(pipe, instance_images: torch.Tensor, instance_prompt: str, class_images: torch.Tensor | None,
                    class_prompt: str, generator, prior_weight: float = 1.0, *, unet=None,
                    text_encoder=None) -> torch.Tensor:  # fmt: skip
    """Chapter 09's loss (paper eq. 2) on the pipeline: the squared error to `sd.training_target` (eps or v) on the instance
    images with "a [V] [class]" plus `prior_weight` x the same on class images (samples of the frozen pipeline for "a
    [class]"), both halves in one UNet call as train_dreambooth.py does. Gradients reach `unet` and `text_encoder`
    (default the pipeline's), whichever require them. `generator` as in `controlnet_loss` (one per instance-class pair)."""
    prior_weight = check_prior_weight(prior_weight)  # NaN would silently switch prior preservation off
    parts = [(instance_images, instance_prompt)]
    if class_images is not None and prior_weight > 0:
        parts.append((class_images, class_prompt))
    latents = [encode_images(pipe, x) for x, _ in parts]
    noisy = [_noisy(pipe, z0, generator) for z0 in latents]
    target = torch.cat([training_target(pipe, z0, eps, t) for z0, (_, t, eps) in zip(latents, noisy, strict=True)])
    text = embed_prompts(pipe, [p for x, p in parts for _ in range(len(x))], text_encoder)
    unet = pipe.unet if unet is None else unet
    u = _dtype(unet)  # latents and target are float32; the UNet gets its own dtype, the error is taken in float32
    pred = unet(torch.cat([z for z, _, _ in noisy]).to(u), torch.cat([t for _, t, _ in noisy]),
                encoder_hidden_states=text.to(u), return_dict=False)[0]  # fmt: skip
    err, n = _squared_error(pred, target), len(instance_images)
    return err[:n].mean() + prior_weight * err[n:].mean() if len(parts) == 2 else err.mean()


@torch.no_grad()
def class_images(pipe, class_prompt: str, n: int, steps: int = 20, height: int | None = None, seed: int = 0) -> torch.Tensor:
    """The autogenous class prior: `n` images in [-1, 1] sampled from the (frozen) pipeline for `class_prompt`."""
    g = torch.Generator().manual_seed(seed)
    out = pipe([class_prompt] * n, num_inference_steps=steps, height=height, width=height, generator=g, output_type="pt")
    return out.images.to(pipe.device) * 2 - 1


# ---- The training loop, through accelerate ----
def _seed(*ints: int) -> int:
    """One generator seed from several ints (e.g. the run's seed and a draw's number)."""
    return sum(k * 1_000_003**i for i, k in enumerate(reversed(ints))) % 2**63


def _draw(groups: list[dict], n: int, seed: int) -> dict:
    """Draw n of the training stream: from each group of paired data (e.g. images, controls, prompts), the example at
    position n mod N of epoch n // N's permutation (seeded by the seed, the group, the epoch), and n, which seeds its
    timestep, noise and prompt dropout: a function of (seed, n) alone, whatever process, micro-batch or batch size it
    lands in (so one process on a batch and two on halves agree)."""
    item = {"n": n}
    for i, group in enumerate(groups):
        size = len(next(iter(group.values())))
        epoch, pos = divmod(n, size)
        j = int(torch.randperm(size, generator=torch.Generator().manual_seed(_seed(seed, 2 + i, epoch)))[pos])
        item.update({name: values[j] for name, values in group.items()})
    return item


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _latest_step(checkpoint_dir) -> int:
    """The largest k of the `step-k` folders in `checkpoint_dir` (0 if none)."""
    return max((int(p.name[5:]) for p in Path(checkpoint_dir).glob("step-*") if p.name[5:].isdigit()), default=0)


def _checkpointing(m) -> bool:
    """Whether gradient (activation) checkpointing is on: diffusers and transformers both flag the blocks."""
    return any(getattr(x, "gradient_checkpointing", False) is True for x in m.modules())


def _set_checkpointing(m, on: bool) -> None:
    """Gradient checkpointing on or off: diffusers' switch, or transformers' (non-reentrant, as diffusers' own)."""
    kw = {"use_reentrant": False}
    if hasattr(m, "enable_gradient_checkpointing"):
        m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()
    elif hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x names
        m.activation_checkpointing_enable(kw) if on else m.activation_checkpointing_disable()
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw) if on else m.gradient_checkpointing_disable()


@contextlib.contextmanager
def _training_setup(trainable: dict, checkpointing: list):
    """Inside the block, each module of `trainable` is in train mode (if any of its parameters trains) with
    `requires_grad` = `trainable[module](parameter name)`, and gradient checkpointing is on for `checkpointing`; each
    module's flags, mode and checkpointing come back afterwards (the reader's pipeline is left as it was found)."""
    saved = [(q, q.requires_grad) for m in trainable for q in m.parameters()]
    modes = [(m, m.training) for m in trainable]
    switched = [m for m in checkpointing if not _checkpointing(m)]
    try:
        for m, rule in trainable.items():
            if any([q.requires_grad_(rule(name)).requires_grad for name, q in m.named_parameters()]):  # a list: sets all
                m.train()
        for m in switched:
            _set_checkpointing(m, True)
        yield
    finally:
        for q, f in saved:
            q.requires_grad_(f)
        for m, mode in modes:
            m.train(mode)
        for m in switched:
            _set_checkpointing(m, False)


def _float32_trained(pipe, modules: list) -> list:
    """The trained parameters, float32 as in diffusers' examples: LoRA adapters are upcast (their `cast_training_params`);
    any other half one is refused (AdamW's eps 1e-8 is 0 in float16; accelerate's fp16 GradScaler refuses it)."""
    names, params = {id(v): k for k, v in pipe.components.items()}, []
    for m, name, q in ((x, n, q) for x in modules for n, q in x.named_parameters() if q.requires_grad):
        if "lora_" in name:
            q.data = q.data.float()  # peft casts the adapters' inputs to their dtype and the sum back
        if q.dtype != torch.float32:
            raise ValueError("trained parameters must be float32: load the pipeline in float32, or train LoRA adapters "
                             "(lora_rank=...), which are kept in float32 on a half-precision pipeline (a ControlNet: "
                             f"controlnet.float()); got {q.dtype} in {names.get(id(m), 'controlnet')}.{name}")  # fmt: skip
        params.append(q)
    return params


def _train(pipe, trainable: dict, checkpointing: list, groups: list[dict], loss_fn, *, steps: int, batch_size: int,
           lr: float, grad_accum: int, mixed_precision: str, gradient_checkpointing: bool, checkpoint_dir, checkpoint_every,
           resume: bool, seed: int, max_grad_norm: float | None, optimizer, accelerator, progress: bool) -> dict:  # fmt: skip
    """The loop of diffusers' training examples. `trainable` maps the modules to prepare (DDP-wrapped when launched on
    several processes) to their rule for which parameters train; `loss_fn(batch, generators, prepared)` is the loss
    of one micro-batch, run through `prepared(module)`: the prepared module where one trains, else the module."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    steps, batch_size, grad_accum = (_positive_int(k, v) for k, v in
                                     (("steps", steps), ("batch_size", batch_size), ("grad_accum", grad_accum)))  # fmt: skip
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir to resume from, got checkpoint_dir=None")
    cpu = (pipe if accelerator is None else accelerator).device.type == "cpu"
    if mixed_precision == "fp16" and cpu:  # accelerate would train in float32 without a word
        raise ValueError("mixed_precision 'fp16' needs a GPU: expected 'bf16' or 'no' on CPU, got 'fp16'")
    acc = accelerator or Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision, cpu=cpu)
    if (acc.gradient_accumulation_steps, acc.mixed_precision) != (grad_accum, mixed_precision):
        raise ValueError(f"expected an accelerator with the arguments' gradient_accumulation_steps={grad_accum}, "
                         f"mixed_precision={mixed_precision!r}, got {acc.gradient_accumulation_steps}, "
                         f"{acc.mixed_precision!r}")  # fmt: skip
    pipe.to(acc.device)
    for m in trainable:
        m.to(acc.device)
    total = batch_size * acc.num_processes * grad_accum  # examples per optimiser step, all processes together
    start = _latest_step(checkpoint_dir) if resume else 0
    if start > steps:
        raise ValueError(f"the checkpoint in {checkpoint_dir} is at step {start}, past the requested steps={steps}")
    loader = torch.utils.data.DataLoader(range(start * total, steps * total), batch_size=batch_size,  # the draws to come,
                                         collate_fn=lambda ns: default_collate([_draw(groups, n, seed) for n in ns]))  # fmt: skip
    losses, micro, step = [], [], start
    with _training_setup(trainable, checkpointing if gradient_checkpointing else []):
        modules = [m for m in trainable if any(q.requires_grad for q in m.parameters())]  # frozen ones are not prepared
        params = _float32_trained(pipe, modules)
        optimizer = (torch.optim.AdamW if optimizer is None else optimizer)(params, lr=lr)
        *prepared, optimizer, loader = acc.prepare(*modules, optimizer, loader)  # once
        through = dict(zip(modules, prepared, strict=True))
        if start:
            acc.load_state(os.path.join(checkpoint_dir, f"step-{start}"))
        bar = tqdm(total=steps, initial=start, disable=not (progress and acc.is_local_main_process))
        try:
            for batch in loader:
                generators = [torch.Generator().manual_seed(_seed(seed, 1, n)) for n in batch["n"].tolist()]
                with acc.accumulate(*prepared):  # no gradient all-reduce until the last micro-batch of the step
                    with acc.autocast():  # the frozen modules too (the prepared ones autocast by themselves)
                        loss = loss_fn(batch, generators, lambda m: through.get(m, m))
                    acc.backward(loss)  # divides by grad_accum; under fp16, scales the loss
                    if acc.sync_gradients and max_grad_norm is not None:
                        acc.clip_grad_norm_(params, max_grad_norm)
                    optimizer.step()  # a no-op until the gradients are synchronised
                    optimizer.zero_grad(set_to_none=True)
                micro.append(acc.gather(loss.detach()).mean())  # mean over the processes
                if acc.sync_gradients:
                    step += 1
                    losses.append(float(torch.stack(micro).mean()))
                    micro = []
                    bar.update(1)
                    bar.set_postfix(loss=losses[-1])
                    if checkpoint_dir is not None and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
                        acc.save_state(os.path.join(checkpoint_dir, f"step-{step}"))
            acc.wait_for_everyone()
        finally:  # also after an error: take accelerate's autocast wrapper off the modules' forward, release them
            bar.close()
            for m in prepared:
                acc.unwrap_model(m, keep_fp32_wrapper=False)
            acc.free_memory()  # accelerate's advice between two trainings (save_state saves every prepared model)
    return {"losses": losses, "steps": step, "start": start, "total_batch_size": total, "num_processes": acc.num_processes}


_LOOP_ARGS = ("steps", "batch_size", "lr", "grad_accum", "mixed_precision", "gradient_checkpointing", "checkpoint_dir",
              "checkpoint_every", "resume", "seed", "max_grad_norm", "optimizer", "accelerator", "progress")  # fmt: skip
_LOOP_DOC = """
    Loop arguments (the names of diffusers' examples): `batch_size` examples per process and micro-batch, so one optimiser
    step (`optimizer(parameters, lr=lr)`, default AdamW, gradients clipped to `max_grad_norm`) sees batch_size x processes
    x `grad_accum` of them; `mixed_precision` "no", "fp16" (CUDA) or "bf16" (CUDA or CPU autocast); with
    `gradient_checkpointing`, activations are recomputed in the backward pass; `checkpoint_dir` receives
    `accelerator.save_state` folders `step-k` (every `checkpoint_every` steps and at the end) and, with `resume`, training
    continues from the latest one exactly as if uninterrupted; `seed` fixes the order of examples and each one's
    timestep, noise and dropout; `accelerator` (default: made from the arguments) is cleared with `free_memory` at the
    end. Several processes: the same script under `accelerate launch` (CPU processes: torchrun). Trained parameters must
    be float32 (a half-precision pipeline trains LoRA adapters, upcast to float32). Returns {"losses" (one per optimiser
    step, mean over processes), "steps", "start", "total_batch_size", "num_processes"}."""


def train_controlnet(pipe, controlnet, images: torch.Tensor, prompts: list[str], controls: torch.Tensor, *, steps: int,
                     batch_size: int, lr: float = 1e-5, p_uncond: float = 0.5, grad_accum: int = 1,
                     mixed_precision: str = "no", gradient_checkpointing: bool = False, checkpoint_dir=None,
                     checkpoint_every: int | None = None, resume: bool = False, seed: int = 0,
                     max_grad_norm: float | None = 1.0, optimizer=None, accelerator=None,
                     progress: bool = True) -> dict:  # fmt: skip
    """Train `controlnet` (in place) on (image, prompt, control) triples with `controlnet_loss`; the pipeline's UNet,
    VAE and text encoder stay locked (diffusers' examples/controlnet/train_controlnet.py)."""
    loop = {k: v for k, v in locals().items() if k in _LOOP_ARGS}  # the loop's arguments, passed on to _train
    check_images(pipe, images)
    if len(prompts) != len(images) or len(controls) != len(images):
        raise ValueError(f"expected one prompt and one control per image ({len(images)}), got {len(prompts)}, {len(controls)}")
    frozen = {m: (lambda name: False) for m in (pipe.unet, pipe.vae, pipe.text_encoder)}

    def loss_fn(batch, generators, prepared):
        return controlnet_loss(pipe, prepared(controlnet), batch["image"], list(batch["prompt"]), batch["control"], generators,
                               p_uncond)  # fmt: skip

    group = {"image": images.detach().cpu(), "control": controls.detach().cpu(), "prompt": list(prompts)}
    return _train(pipe, {controlnet: lambda name: True, **frozen}, [controlnet, pipe.unet], [group], loss_fn, **loop)


def _add_lora(module, rank: int, targets: tuple[str, ...], seed: int) -> None:
    """A LoRA adapter on `module`'s `targets`, as train_dreambooth_lora.py adds it: alpha = rank, "gaussian" init (A ~
    N(0, 1/rank^2), B = 0: the adapted module starts equal to the base). The UNet through diffusers' `add_adapter`
    (`disable_adapters`/`enable_adapters` switch it); the text encoder through peft's `inject_adapter_in_model`
    (transformers 5's `add_adapter` demands peft >= 0.22). Existing LoRA layers are kept: training continues them."""
    from diffusers import ModelMixin
    from peft import LoraConfig, inject_adapter_in_model

    if any("lora_" in name for name, _ in module.named_parameters()):
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
        if isinstance(module, ModelMixin):
            module.add_adapter(config)
        else:
            inject_adapter_in_model(config, module, adapter_name="default")


def train_dreambooth(pipe, instance_images: torch.Tensor, instance_prompt: str, class_images: torch.Tensor | None,
                     class_prompt: str, *, steps: int, batch_size: int, lr: float = 5e-6, prior_weight: float = 1.0,
                     train_text_encoder: bool = True, lora_rank: int | None = None, grad_accum: int = 1,
                     mixed_precision: str = "no", gradient_checkpointing: bool = False, checkpoint_dir=None,
                     checkpoint_every: int | None = None, resume: bool = False, seed: int = 0,
                     max_grad_norm: float | None = 1.0, optimizer=None, accelerator=None,
                     progress: bool = True) -> dict:  # fmt: skip
    """Fine-tune the pipeline's UNet (and text encoder, with `train_text_encoder`) in place with `dreambooth_loss`:
    each draw pairs an instance image with a class image (no prior term when `class_images` is None or
    `prior_weight` is 0); the VAE stays locked (diffusers' examples/dreambooth/train_dreambooth.py). With `lora_rank`,
    LoRA adapters of that rank are added to the UNet's (and the text encoder's) attention projections and only they
    train, the base weights untouched (train_dreambooth_lora.py): the pipeline then samples with the adapters on."""
    loop = {k: v for k, v in locals().items() if k in _LOOP_ARGS}  # the loop's arguments, passed on to _train
    check_images(pipe, instance_images)
    check_prior_weight(prior_weight)
    if lora_rank is not None:
        _positive_int("lora_rank", lora_rank)
        _add_lora(pipe.unet, lora_rank, LORA_UNET_TARGETS, seed)
        if train_text_encoder:
            _add_lora(pipe.text_encoder, lora_rank, LORA_TEXT_TARGETS, seed + 1)
    rule = (lambda name: "lora_" in name) if lora_rank is not None else (lambda name: True)
    trainable = {pipe.unet: rule, pipe.vae: lambda name: False,
                 pipe.text_encoder: rule if train_text_encoder else (lambda name: False)}  # fmt: skip
    groups = [{"instance": instance_images.detach().cpu()}]
    if class_images is not None:
        check_images(pipe, class_images)
        groups.append({"class": class_images.detach().cpu()})

    def loss_fn(batch, generators, prepared):
        return dreambooth_loss(pipe, batch["instance"], instance_prompt, batch.get("class"), class_prompt, generators,
                               prior_weight, unet=prepared(pipe.unet),
                               text_encoder=prepared(pipe.text_encoder))  # fmt: skip

    checkpointing = [pipe.unet, pipe.text_encoder] if train_text_encoder else [pipe.unet]
    return _train(pipe, trainable, checkpointing, groups, loss_fn, **loop)


train_controlnet.__doc__ = (train_controlnet.__doc__ or "") + _LOOP_DOC  # docstrings are None under python -OO
train_dreambooth.__doc__ = (train_dreambooth.__doc__ or "") + _LOOP_DOC
