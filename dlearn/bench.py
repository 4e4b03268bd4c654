"""Benchmarks that print figures (speed goals live here, not in timed tests).

    python -m dlearn.bench ddim [--steps 50] [--batch 256] [--repeats 5]
    python -m dlearn.bench controlnet [--batch 64] [--repeats 20]

`ddim`: seconds per sampling step of the book's DDIM loop (`ddim.sample`) against a loop over
diffusers' `DDIMScheduler.step` with the same network, inputs and settings; prints both and their ratio.
`controlnet`: seconds per training step (forward + backward) of a ControlNet on the locked base against
fine-tuning every weight of the base (chapter 08, C12), and the memory count of `dlearn.studies.controlnet.training_memory`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dlearn import ddim, nets, schedules, zoo
from dlearn.studies import controlnet as controlnet_study


def _diffusers_loop(net, x_T, num_steps):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(num_steps)
    x = x_T
    for t in scheduler.timesteps:
        out = net(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = scheduler.step(out, t, x).prev_sample
    return x


def bench_ddim(num_steps: int = 50, batch: int = 256, repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Median seconds per step of both loops, and book / diffusers."""
    torch.manual_seed(seed)
    net = nets.ConvDenoiser(in_ch=1, out_ch=1, channels=(32, 64), emb_dim=128).eval()
    alpha_bar = schedules.alpha_bar_from_betas(schedules.linear_betas(1000))
    x_T = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    loops = {
        "book": lambda: ddim.sample(net, x_T, alpha_bar, num_inference_steps=num_steps, progress=False),
        "diffusers": lambda: _diffusers_loop(net, x_T, num_steps),
    }
    with torch.no_grad():
        results = {name: fn() for name, fn in loops.items()}  # warm-up, and the two must agree
        if (results["book"] - results["diffusers"]).abs().max() > 1e-4:
            raise AssertionError("the two loops disagree: the benchmark would compare different work")
        times = {name: [] for name in loops}
        for _ in range(repeats):
            for name, fn in loops.items():  # interleaved, so that machine load hits both alike
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) / num_steps)
    out = {f"{name}_s_per_step": statistics.median(v) for name, v in times.items()}
    out["ratio_book_over_diffusers"] = out["book_s_per_step"] / out["diffusers_s_per_step"]
    return out


def bench_controlnet(batch: int = 64, repeats: int = 20) -> dict[str, float]:
    """Median seconds per training step (forward + backward, interleaved) and counted bytes, and their ratios."""
    base = zoo.load("text2image")
    steps = {k: controlnet_study.training_step(k, base, batch)[1] for k in controlnet_study.COST_KINDS}
    for fn in steps.values():
        fn()  # warm-up
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    out = {f"{k}_s_per_step": statistics.median(v) for k, v in times.items()}
    out["time_ratio_controlnet_over_finetune"] = out["controlnet_s_per_step"] / out["finetune_s_per_step"]
    mem = {k: controlnet_study.training_memory(k, base, batch)["total_bytes"] for k in steps}
    out.update({f"{k}_training_bytes": float(v) for k, v in mem.items()})
    out["memory_ratio_controlnet_over_finetune"] = mem["controlnet"] / mem["finetune"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlearn.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="which", required=True)
    p = sub.add_parser("ddim", help="the book's DDIM loop against diffusers' DDIMScheduler")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("controlnet", help="a ControlNet training step against fine-tuning the whole base")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if args.which == "controlnet":
        res = bench_controlnet(args.batch, args.repeats)
        print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}, median of {args.repeats}")
    else:
        res = bench_ddim(args.steps, args.batch, args.repeats)
        print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps, median of {args.repeats}")
    for k, v in res.items():
        print(f"{k}: {v:.3g}")


if __name__ == "__main__":
    main()
