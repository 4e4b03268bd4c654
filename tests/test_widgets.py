"""The notebooks' widgets build, redraw when moved, and refuse bad input."""

import ipywidgets
import pytest
import torch

from dlearn import schedules, widgets


def test_latent_explorer_redraws():
    calls = []

    def decode(z):
        calls.append(z.clone())
        return torch.zeros(1, 1, 8, 8)

    box = widgets.latent_explorer(decode)
    slider = box.children[0].children[0]
    slider.value = 1.5
    assert isinstance(box, ipywidgets.VBox) and len(calls) == 2 and calls[-1][0, 0].item() == 1.5


def test_schedule_explorer_switches_quantity():
    abs_ = {name: schedules.alpha_bar_from_betas(schedules.make_betas(name, 100)) for name in ("linear", "cosine")}
    box = widgets.schedule_explorer(abs_)
    quantity, window = box.children[0].children
    for value in quantity.options:
        quantity.value = value
    window.value = (0.2, 0.5)
    with pytest.raises(ValueError, match="values in"):
        widgets.schedule_explorer({"bad": torch.tensor([0.5, 1.0])})


def test_forward_process_slider_moves():
    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(100))
    box = widgets.forward_process_slider(torch.zeros(3, 1, 8, 8), torch.zeros(50, 2), ab)
    box.children[0].value = 99
    with pytest.raises(ValueError, match="points"):
        widgets.forward_process_slider(torch.zeros(3, 1, 8, 8), torch.zeros(50, 3), ab)


def test_score_field_moves_and_refuses_other_dimensions():
    from dlearn import toys

    ab = schedules.alpha_bar_from_betas(schedules.linear_betas(100))
    box = widgets.score_field(toys.mixture_2d(), ab, n=50, grid=5)
    box.children[0].value = 99
    box.children[0].value = 0
    with pytest.raises(ValueError, match="2-D"):
        widgets.score_field(toys.gaussian_data(), ab)


def test_prompt_explorer_generates_and_reports_bad_prompts():
    calls = []

    def generate(prompts, w):
        from dlearn import text2image

        text2image.tokenize(prompts)  # raises for unknown words, like the real generator
        calls.append((prompts[0], w))
        return torch.zeros(len(prompts), 1, 8, 8)

    box = widgets.prompt_explorer(generate, n=3)
    text, scale = box.children[0].children
    scale.value = 4.0
    assert box.children[1].value.startswith("3 images in")
    text.value = "a purple three"  # unknown word: the widget shows the error, nothing is generated
    assert calls == [("a thick three", 2.0), ("a thick three", 4.0)]
    assert "unknown word" in box.children[1].value


def test_control_explorer_draws_picks_and_reports_iou():
    calls = []
    square = torch.zeros(1, 1, 8, 8)
    square[..., 2:6, 2:6] = 1

    def generate(mask, prompts, s):
        from dlearn import text2image

        text2image.tokenize(prompts)
        calls.append((mask.clone(), prompts[0], s))
        return mask * 2 - 1  # a perfect follower: IoU 1

    box = widgets.control_explorer(generate, {"square": square, "empty": torch.zeros(1, 8, 8)}, n=2)
    (pick, text, scale), grid, status = box.children[0].children, box.children[1], box.children[2]
    assert torch.equal(calls[-1][0][:1], square) and calls[-1][2] == 1.0
    assert status.value.endswith("mean IoU with the mask 1.00")
    grid.children[0].value = True  # draw one more pixel
    assert calls[-1][0][0, 0, 0, 0] == 1 and calls[-1][0].sum() == 2 * 17
    n_calls = len(calls)
    pick.value = "empty"  # picking a mask regenerates once, not once per changed cell
    assert len(calls) == n_calls + 1 and calls[-1][0].sum() == 0
    scale.value = 0.5
    assert calls[-1][2] == 0.5
    text.value = "a purple three"
    assert "unknown word" in status.value and len(calls) == n_calls + 2
    with pytest.raises(ValueError, match="at least one"):
        widgets.control_explorer(generate, {})


def test_inversion_explorer_caches_inversions_and_reports_bad_prompts():
    inverted, edited = [], []

    def invert(i):
        inverted.append(i)
        return torch.full((1, 1, 8, 8), float(i) / 10)

    def edit(inv, prompt):
        from dlearn import text2image

        text2image.tokenize(prompt)
        edited.append(prompt)
        return {"original": inv, "edited": -inv}

    box = widgets.inversion_explorer(invert, edit, ["first", "second"], ["a three", "a seven"])
    (pick, text), status = box.children[0].children, box.children[1]
    assert inverted == [0] and edited == ["a three"] and status.value.startswith("inversion")
    text.value = "a eight"
    pick.value = 1  # a new digit: inverted once, and its caption becomes the prompt (one edit, not two)
    pick.value = 0  # cached: not inverted again
    assert inverted == [0, 1] and edited == ["a three", "a eight", "a seven", "a three"]
    text.value = "a purple three"
    assert "unknown word" in status.value
    with pytest.raises(ValueError, match="one caption per name"):
        widgets.inversion_explorer(invert, edit, ["a"], [])
