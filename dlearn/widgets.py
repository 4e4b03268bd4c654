"""Interactive figures for the notebooks (ipywidgets). Presentation only: no mathematics in here.

Each widget has a static twin in `dlearn.plotting` that the notebooks also draw, so that the book
reads the same on a code host or in a PDF, where widgets do not run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlearn.studies.controlnet import condition_fidelity


def latent_explorer(decode: Callable[[torch.Tensor], torch.Tensor], limit: float = 3.0, step: float = 0.05):
    """Two sliders (z_1, z_2) that decode a 2-D latent into a digit, live.

    Args:
        decode: (1, 2) latent -> (1, 1, 8, 8) image in [-1, 1] (e.g. the decoder's mean).
        limit: the sliders run over [-limit, limit].

    Returns:
        an ipywidgets `VBox` (display it, or leave it as a cell's last expression).
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt

    z1 = W.FloatSlider(value=0.0, min=-limit, max=limit, step=step, description="z_1", continuous_update=True)
    z2 = W.FloatSlider(value=0.0, min=-limit, max=limit, step=step, description="z_2", continuous_update=True)
    out = W.Output()

    def draw(*_):
        with torch.no_grad():
            img = decode(torch.tensor([[z1.value, z2.value]], dtype=torch.float32))
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.imshow(img[0, 0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_axis_off()
            ax.set_title(f"z = ({z1.value:+.2f}, {z2.value:+.2f})", fontsize=8)
            plt.show()

    z1.observe(draw, names="value")
    z2.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox([z1, z2]), out])


def schedule_explorer(alpha_bars: dict[str, torch.Tensor]):
    """Plot alpha_bar, SNR or log-SNR over normalised time t in [0, 1] for named schedules; a dropdown picks
    the quantity and a range slider zooms into part of the chain.

    Args:
        alpha_bars: {name: alpha_bar over its steps, shape (T,)}; schedules of different lengths are
            drawn over the same normalised time.

    Returns:
        an ipywidgets `VBox`.
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt

    for name, a in alpha_bars.items():
        if a.ndim != 1 or not ((a > 0) & (a < 1)).all():
            raise ValueError(f"alpha_bars[{name!r}] must be a 1-D tensor of values in (0, 1)")
    quantity = W.Dropdown(options=["alpha_bar", "SNR (log axis)", "log-SNR"], value="log-SNR", description="show")
    window = W.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.01, description="t range")
    out = W.Output()

    def draw(*_):
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(5, 3))
            for name, a in alpha_bars.items():
                a = a.double().cpu()
                t = torch.linspace(0, 1, len(a), dtype=torch.float64)
                y = {"alpha_bar": a, "SNR (log axis)": a / (1 - a), "log-SNR": torch.log(a) - torch.log1p(-a)}[quantity.value]
                keep = (t >= window.value[0]) & (t <= window.value[1])
                ax.plot(t[keep].numpy(), y[keep].numpy(), label=name)
            if quantity.value == "SNR (log axis)":
                ax.set_yscale("log")
            ax.set_xlabel("t (normalised)")
            ax.set_ylabel(quantity.value)
            ax.legend(fontsize=8)
            plt.show()

    quantity.observe(draw, names="value")
    window.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox([quantity, window]), out])


def forward_process_slider(images: torch.Tensor, points: torch.Tensor, alpha_bar: torch.Tensor, seed: int = 0):
    """A slider over t that shows q(x_t | x_0) on digits and on 2-D points, with one fixed noise draw
    (so that moving t shows the same noise fading in).

    Args:
        images: digits in [-1, 1], shape (n, 1, 8, 8).
        points: 2-D samples, shape (m, 2).
        alpha_bar: the schedule, shape (T,).

    Returns:
        an ipywidgets `VBox`.
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt

    if images.ndim != 4 or points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"expected images (n, 1, 8, 8) and points (m, 2), got {tuple(images.shape)} and {tuple(points.shape)}")
    g = torch.Generator().manual_seed(seed)
    eps_img = torch.randn(images.shape, generator=g, dtype=images.dtype)
    eps_pts = torch.randn(points.shape, generator=g, dtype=points.dtype)
    step = W.IntSlider(value=0, min=0, max=len(alpha_bar) - 1, step=1, description="t", continuous_update=False)
    out = W.Output()

    def draw(*_):
        a = alpha_bar[step.value].to(images.dtype)
        x_img = a.sqrt() * images + (1 - a).sqrt() * eps_img
        x_pts = a.sqrt() * points + (1 - a).sqrt() * eps_pts
        with out:
            out.clear_output(wait=True)
            fig, axes = plt.subplots(1, len(images) + 1, figsize=(1.4 * len(images) + 3, 2.6),
                                     gridspec_kw={"width_ratios": [1] * len(images) + [2.2]})  # fmt: skip
            for ax, img in zip(axes[:-1], x_img, strict=True):
                ax.imshow(img[0].cpu().numpy(), cmap="gray", vmin=-2, vmax=2)
                ax.set_axis_off()
            axes[-1].scatter(x_pts[:, 0].cpu().numpy(), x_pts[:, 1].cpu().numpy(), s=2, alpha=0.4)
            axes[-1].set_xlim(-4, 4)
            axes[-1].set_ylim(-4, 4)
            axes[-1].set_aspect("equal")
            fig.suptitle(f"t = {step.value}: alpha_bar = {a.item():.4g}, SNR = {(a / (1 - a)).item():.3g}", fontsize=9)
            plt.show()

    step.observe(draw, names="value")
    draw()
    return W.VBox([step, out])


def score_field(mixture, alpha_bar: torch.Tensor, n: int = 300, grid: int = 15, limit: float = 3.5, seed: int = 0):
    """A slider over t on the plane: samples of x_t, the exact score of q(x_t) as arrows on a grid, and for
    some samples an arrow to Tweedie's E[x0 | x_t].

    Args:
        mixture: a 2-D `toys.GaussianMixture` (its score and posterior mean are exact).
        alpha_bar: the schedule, shape (T,).

    Returns:
        an ipywidgets `VBox`.
    """
    import ipywidgets as W
    import matplotlib.pyplot as plt

    if mixture.dim != 2:
        raise ValueError(f"score_field draws 2-D mixtures, got dimension {mixture.dim}")
    g = torch.Generator().manual_seed(seed)
    x0, _ = mixture.sample(n, g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    lin = torch.linspace(-limit, limit, grid, dtype=torch.float64)
    pts = torch.stack(torch.meshgrid(lin, lin, indexing="xy"), -1).reshape(-1, 2)
    step = W.IntSlider(value=100, min=0, max=len(alpha_bar) - 1, step=1, description="t", continuous_update=False)
    out = W.Output()

    def draw(*_):
        a = alpha_bar[step.value].double()
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        s = mixture.score(pts, a)
        s = s / s.norm(dim=1, keepdim=True).clamp(min=1e-12) * 0.2  # directions; lengths would span decades
        tw = mixture.posterior_mean(x_t[:40], a)  # Tweedie: E[x0 | x_t]
        with out:
            out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            ax.scatter(x_t[:, 0], x_t[:, 1], s=4, alpha=0.4, label="x_t")
            ax.quiver(pts[:, 0], pts[:, 1], s[:, 0], s[:, 1], angles="xy", scale_units="xy", scale=1, width=0.003, color="k")
            ax.quiver(x_t[:40, 0], x_t[:40, 1], (tw - x_t[:40])[:, 0], (tw - x_t[:40])[:, 1], angles="xy", scale_units="xy",
                      scale=1, width=0.004, color="C3", label="to E[x0 | x_t]")  # fmt: skip
            ax.set_xlim(-limit, limit)
            ax.set_ylim(-limit, limit)
            ax.set_aspect("equal")
            ax.legend(fontsize=7, loc="lower left")
            ax.set_title(f"t = {step.value}: alpha_bar = {a.item():.3g}; black: score directions", fontsize=8)
            plt.show()

    step.observe(draw, names="value")
    draw()
    return W.VBox([step, out])


def prompt_explorer(generate: Callable[[list[str], float], torch.Tensor], prompt: str = "a thick three", n: int = 8,
                    max_scale: float = 8.0):  # fmt: skip
    """A prompt box and a guidance-scale slider that generate `n` images live, with the seconds it took.

    Args:
        generate: (prompts, guidance scale) -> images in [-1, 1], shape (len(prompts), 1, 8, 8); e.g.
            `lambda p, w: text2image.generate(model, p, w, steps=20)`.

    Returns:
        an ipywidgets `VBox` (controls, a status line with the seconds per batch, the images). A prompt
        with unknown words shows the tokenizer's error in the status line instead of images.
    """
    import time

    import ipywidgets as W
    import matplotlib.pyplot as plt

    text = W.Text(value=prompt, description="prompt", continuous_update=False)
    scale = W.FloatSlider(value=2.0, min=0.0, max=max_scale, step=0.5, description="guidance", continuous_update=False)
    out = W.Output()
    status = W.Label()

    def draw(*_):
        with out:
            out.clear_output(wait=True)
            start = time.perf_counter()
            try:
                images = generate([text.value] * n, scale.value)
            except ValueError as exc:
                status.value = f"cannot generate: {exc}"
                return
            seconds = time.perf_counter() - start
            status.value = f"{n} images in {seconds:.2f} s"
            fig, axes = plt.subplots(1, n, figsize=(1.2 * n, 1.6))
            for ax, img in zip(axes, images, strict=True):
                ax.imshow(img[0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_axis_off()
            fig.suptitle(f"{text.value!r}, w = {scale.value:g}: {n} images in {seconds:.2f} s", fontsize=9)
            plt.show()

    text.observe(draw, names="value")
    scale.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox([text, scale]), status, out])


def control_explorer(generate: Callable[[torch.Tensor, list[str], float], torch.Tensor], masks: dict[str, torch.Tensor],
                     prompt: str = "", n: int = 6, max_scale: float = 2.0):  # fmt: skip
    """Draw or pick a control mask, set the prompt and the conditioning scale, and generate `n` images live.

    Args:
        generate: (mask (n, 1, 8, 8) in {0, 1}, prompts, conditioning scale) -> images in [-1, 1], (n, 1, 8, 8);
            e.g. `lambda m, p, s: controlnet.generate(base, cn, m, p, scale=s)`.
        masks: named masks to start from (each (1, 8, 8) or (1, 1, 8, 8)), e.g. a few validation digits'.

    Returns:
        an ipywidgets `VBox`: a mask picker, an 8x8 grid of toggles to draw on, the prompt and the scale, a status
        line (seconds, and the mean IoU of the images with the mask), the images.
    """
    import time

    import ipywidgets as W
    import matplotlib.pyplot as plt


    if not masks:
        raise ValueError("masks must name at least one starting mask")
    names = list(masks)
    pick = W.Dropdown(options=["(draw)", *names], value=names[0], description="mask")
    cells = [W.ToggleButton(value=False, layout=W.Layout(width="22px", height="22px")) for _ in range(64)]
    grid = W.GridBox(cells, layout=W.Layout(grid_template_columns="repeat(8, 24px)"))
    text = W.Text(value=prompt, description="prompt", continuous_update=False)
    scale = W.FloatSlider(value=1.0, min=0.0, max=max_scale, step=0.25, description="control", continuous_update=False)
    out, status = W.Output(), W.Label()
    busy = {"setting": False}

    def current_mask() -> torch.Tensor:
        return torch.tensor([float(c.value) for c in cells]).reshape(1, 1, 8, 8)

    def draw(*_):
        if busy["setting"]:
            return
        mask = current_mask().expand(n, -1, -1, -1)
        with out:
            out.clear_output(wait=True)
            start = time.perf_counter()
            try:
                images = generate(mask, [text.value] * n, scale.value)
            except ValueError as exc:
                status.value = f"cannot generate: {exc}"
                return
            seconds = time.perf_counter() - start
            fid = condition_fidelity(images, mask).mean().item()
            status.value = f"{n} images in {seconds:.2f} s; mean IoU with the mask {fid:.2f}"
            fig, axes = plt.subplots(1, n + 1, figsize=(1.2 * (n + 1), 1.6))
            axes[0].imshow(mask[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            axes[0].set_title("control", fontsize=8)
            for ax, img in zip(axes[1:], images, strict=True):
                ax.imshow(img[0].cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
            for ax in axes:
                ax.set_axis_off()
            fig.suptitle(f"{text.value!r}, scale {scale.value:g}: IoU {fid:.2f}", fontsize=9)
            plt.show()

    def load(*_):
        if pick.value == "(draw)":
            return
        busy["setting"] = True
        for c, v in zip(cells, masks[pick.value].reshape(64).tolist(), strict=True):
            c.value = bool(v > 0.5)
        busy["setting"] = False
        draw()

    pick.observe(load, names="value")
    for c in cells:
        c.observe(draw, names="value")
    text.observe(draw, names="value")
    scale.observe(draw, names="value")
    load()
    return W.VBox([W.HBox([pick, text, scale]), grid, status, out])


def inversion_explorer(invert: Callable[[int], object], edit: Callable[[object, str], dict[str, torch.Tensor]],
                       names: list[str], captions: list[str]):  # fmt: skip
    """Pick a digit, invert it (once; cached), type an edited prompt, compare.

    Args:
        invert: index -> an inversion (whatever `edit` takes), e.g. a null-text inversion of test digit `index`.
        edit: (inversion, prompt) -> named images in [-1, 1], each (1, 8, 8) or (1, 1, 8, 8), shown in a row.
        names, captions: one per choice: its label in the picker and the prompt to start from.

    Returns:
        an ipywidgets `VBox`: picker and prompt, a status line (seconds for the inversion and the edit), the images.
    """
    import time

    import ipywidgets as W
    import matplotlib.pyplot as plt

    if not names or len(names) != len(captions):
        raise ValueError(f"need one caption per name and at least one: got {len(names)} names, {len(captions)} captions")
    pick = W.Dropdown(options=[(n, i) for i, n in enumerate(names)], value=0, description="digit")
    text = W.Text(value=captions[0], description="prompt", continuous_update=False)
    out, status = W.Output(), W.Label()
    cache: dict[int, tuple[object, float]] = {}
    busy = {"setting": False}

    def draw(*_):
        if busy["setting"]:
            return
        i = pick.value
        if i not in cache:
            start = time.perf_counter()
            cache[i] = (invert(i), time.perf_counter() - start)
        inv, inv_seconds = cache[i]
        with out:
            out.clear_output(wait=True)
            start = time.perf_counter()
            try:
                images = edit(inv, text.value)
            except ValueError as exc:
                status.value = f"cannot edit: {exc}"
                return
            status.value = f"inversion {inv_seconds:.1f} s (once per digit), edit {time.perf_counter() - start:.2f} s"
            fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 1.9))
            for ax, (name, img) in zip(axes, images.items(), strict=True):
                ax.imshow(img.reshape(8, 8).cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_title(name, fontsize=7)
                ax.set_axis_off()
            plt.show()

    def new_digit(*_):
        busy["setting"] = True
        text.value = captions[pick.value]
        busy["setting"] = False
        draw()

    pick.observe(new_digit, names="value")
    text.observe(draw, names="value")
    draw()
    return W.VBox([W.HBox([pick, text]), status, out])
