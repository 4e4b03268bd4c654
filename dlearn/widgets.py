"""Interactive figures for the notebooks (ipywidgets). Presentation only: no mathematics in here.

Each widget has a static twin in `dlearn.plotting` that the notebooks also draw, so that the book
reads the same on a code host or in a PDF, where widgets do not run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


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
