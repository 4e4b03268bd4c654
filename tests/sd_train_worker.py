"""The training run of tests/test_sd_train.py's several-process test (not collected: no test_ prefix).

`python tests/sd_train_worker.py OUT BATCH_SIZE` trains, on `sd.tiny_pipeline()` at 16x16, a ControlNet and then a
DreamBooth (UNet and text encoder, with prior preservation) for `STEPS` steps each with `BATCH_SIZE` examples per
process, and writes each process's trained parameters to OUT/rank{k}.safetensors and its loss histories to
OUT/rank{k}.json. Plain SGD, not the default AdamW: Adam divides each gradient by its own running size, so a
parameter whose true gradient is zero moves by up to lr on float rounding alone (here the biases just before a
GroupNorm with one channel per group, which the normalisation cancels: their 1-vs-2-process difference under AdamW
was 2.8e-4 after 2 steps at lr 1e-3), while SGD moves it by lr x the rounding. Started by torchrun with two
processes (each process gets half of every batch: accelerate shards the loader and averages the gradients) or called
in process with one (`run`), on the same data, seeds and initial weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from dlearn import sd, sd_train

STEPS = 2
SIZE = 16  # images 16x16 -> latents 8x8 (the tiny VAE's factor is 2)
LR = 0.1
PROMPTS = ["a photo of sks dog", "a dog", "a photo of a dog", "a sks dog"]


def data(n: int = 4):
    """n images in [-1, 1], n binary controls, n prompts: fixed by seed 0."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1
    controls = (torch.rand(n, 3, SIZE, SIZE, generator=g) > 0.5).float()
    return images, controls, PROMPTS[:n]


def setup():
    """The tiny pipeline (seed 0) and its ControlNet (the condition encoder's random layers seeded by 0)."""
    sd.quiet()
    pipe = sd.tiny_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        controlnet = sd_train.controlnet_for(pipe)
    return pipe, controlnet


def run(out: str | Path, batch_size: int, rank: int = 0) -> None:
    from safetensors.torch import save_file

    pipe, controlnet = setup()
    images, controls, prompts = data()
    kw = {"steps": STEPS, "batch_size": batch_size, "lr": LR, "optimizer": torch.optim.SGD, "progress": False}
    cn = sd_train.train_controlnet(pipe, controlnet, images, prompts, controls, **kw)
    db = sd_train.train_dreambooth(pipe, images[:2], "a photo of sks dog", images[2:], "a photo of a dog", **kw)
    tensors = {f"controlnet.{k}": v for k, v in controlnet.state_dict().items()}
    tensors |= {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    out = Path(out)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps({"controlnet": cn, "dreambooth": db}))


if __name__ == "__main__":
    from accelerate import PartialState

    run(sys.argv[1], int(sys.argv[2]), PartialState(cpu=True).process_index)  # cpu=True: gloo, not one process each
