"""Benchmarks that print figures (speed goals live here, not in timed tests).

    python -m dlearn.bench ddim [--steps 50] [--batch 256] [--repeats 5]

`ddim`: seconds per sampling step of the book's DDIM loop (`ddim.sample`) against a loop over
diffusers' `DDIMScheduler.step` with the same network, inputs and settings; prints both and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


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
    from dlearn import ddim, nets, schedules

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlearn.bench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="which", required=True)
    p = sub.add_parser("ddim", help="the book's DDIM loop against diffusers' DDIMScheduler")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    res = bench_ddim(args.steps, args.batch, args.repeats)
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps, median of {args.repeats}")
    for k, v in res.items():
        print(f"{k}: {v:.3g}")


if __name__ == "__main__":
    main()
