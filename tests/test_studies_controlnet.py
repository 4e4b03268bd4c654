"""Chapter 08's studies (dlearn.studies.controlnet): mask IoU and the evaluation protocol, the recipe, the
whole-model fine-tune, the cost count, and C1 measured on the shipped weights. The claims the chapter makes from the
numbers recorded with the shipped weights and study are checked in tests/test_records.py."""

import math

import pytest
import torch

from dlearn import controlnet as C
from dlearn import text2image as t2i
from dlearn.studies import controlnet as controlnet_study


def test_check_C1_controlnet_follows_the_mask_far_beyond_the_base_and_a_random_same_class_digit():
    """C1 (the shipped weights): the shipped ControlNet's IoU with the masks is far above both the class-prompted base's
    and that of a random training digit of the same class (5 draws; chapter 08 compares the last two with their SE)."""
    from dlearn import datasets, zoo

    masks, labels, captions = controlnet_study.evaluation_set(100)
    x, y = datasets.digits("train")
    g = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(5):
        pick = torch.stack([torch.nonzero(y == c).flatten()[torch.randint((y == c).sum(), (1,), generator=g)] for c in labels])
        draws.append(controlnet_study.condition_fidelity(C.control_mask(x[pick.flatten()]) * 2 - 1, masks).mean().item())
    random_same_class = sum(draws) / len(draws)
    base = zoo.load("text2image")
    prompts = [f"a {t2i.DIGIT_WORDS[c]}" for c in labels]
    base_iou = controlnet_study.condition_fidelity(C.generate(base, None, None, prompts, seed=2), masks).mean().item()
    cn_imgs = C.generate(base, zoo.load("controlnet"), masks, prompts, seed=2)
    cn_iou = controlnet_study.condition_fidelity(cn_imgs, masks).mean().item()
    assert cn_iou > max(base_iou, random_same_class) + 0.25


def test_prompt_only_fd_of_the_base_is_the_recorded_finetune_start():
    """The whole-model fine-tune starts as the base (its new input weights are 0), so the base's prompt-only FD at the
    study's sampling seed 3 is the one recorded at the fine-tune's step 0; another seed gives another sample."""
    from dlearn import zoo

    base = zoo.load("text2image")
    recorded = controlnet_study.load_study()["finetune_mask_drop_seed0"]["history"][0]["prompt_only_fd"]
    fd3 = controlnet_study.prompt_only_fd(base, seed=3)
    assert abs(fd3 - recorded) < 1e-3 * recorded
    assert controlnet_study.prompt_only_fd(base, seed=4) != fd3
    with pytest.raises(TypeError, match="torch.nn.Module"):
        controlnet_study.prompt_only_fd("base")
    with pytest.raises(TypeError, match="seed must be an int"):
        controlnet_study.prompt_only_fd(base, seed=3.0)


def test_check_C8_condition_encoder_shapes():
    paper = controlnet_study.encoder_output_size(512, controlnet_study.PAPER_HINT_ENCODER)
    assert paper == 32  # the paper's text would miss the 64 latent
    assert controlnet_study.encoder_output_size(512, controlnet_study.CODE_HINT_ENCODER) == 64
    enc = C.ConditionEncoder(320, channels=(16, 32, 96, 256), conditioning_channels=3)
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.kernel_size[0], m.stride[0], m.padding[0]) for m in convs] == controlnet_study.CODE_HINT_ENCODER
    assert [m.out_channels for m in convs] == [16, 16, 32, 32, 96, 96, 256, 320]
    assert enc(torch.zeros(1, 3, 64, 64)).shape == (1, 320, 8, 8) and enc.factor == 8
    assert torch.count_nonzero(enc(torch.randn(1, 3, 64, 64))) == 0  # its last layer is a zero convolution too
    with pytest.raises(ValueError, match="does not fit"):
        controlnet_study.encoder_output_size(2, [(4, 2, 0)])


def test_prompt_settings_and_conditions():
    masks, labels, captions = controlnet_study.evaluation_set(20)
    assert masks.shape == (20, 1, 8, 8) and set(masks.unique().tolist()) <= {0.0, 1.0}
    none, ins, con, per = (controlnet_study.prompts_for(s, labels, captions) for s in controlnet_study.PROMPT_SETTINGS)
    assert none == [""] * 20 and per == captions
    assert all(not any(w in t2i.DIGIT_WORDS for w in p.split()) for p in ins)
    assert all(t2i.parse_prompt(p)[0] == (int(y) + 5) % 10 for p, y in zip(con, labels, strict=True))
    t2i.tokenize(none + ins + con + per)  # every prompt is in the vocabulary
    top, bottom = C.top_half(masks), C.bottom_half(masks)
    assert top[..., 4:, :].sum() == 0 and bottom[..., :4, :].sum() == 0
    perfect = masks * 2 - 1
    assert torch.equal(controlnet_study.condition_fidelity(perfect, masks), torch.ones(20, dtype=torch.float64))
    assert (controlnet_study.condition_fidelity(-perfect, masks) == 0).all()
    with pytest.raises(ValueError, match="setting"):
        controlnet_study.prompts_for("rude", torch.tensor([1]), ["a one"])


def test_training_runs_and_logs_step0(base):
    cn, result = controlnet_study.train_controlnet(max_steps=2, eval_every=2, base=base, progress=False)
    first = result.history[0]
    assert first["step"] == 0 and first["loss"] == first["base_loss"]
    assert {"iou_prompt", "class_accuracy_none", "class_accuracy_prompt", "val"} <= set(result.history[-1])
    with pytest.raises(ValueError, match="n_train"):
        controlnet_study.training_data("mask", 0)
    with pytest.raises(ValueError, match="control"):
        controlnet_study.training_data("edges")


def test_finetune_with_mask_channel_starts_as_the_base_and_moves_every_weight(base, batch):
    x, t, ids, c = batch
    m = controlnet_study.MaskChannelModel(base)
    torch.testing.assert_close(m(x, t, ids, c), base(x, t, ids), rtol=0, atol=1e-6)  # new input weights start at 0
    model, history = controlnet_study.finetune_with_mask_channel(n_pairs=32, max_steps=2, eval_every=2, base=base, progress=False)
    assert [r["step"] for r in history] == [0, 2]
    assert {"train_pairs_loss", "held_out_loss", "prompt_only_fd"} <= set(history[0])
    assert not torch.equal(model.model.text.token.weight, base.text.token.weight)  # the text encoder moved too


def test_transition_on_a_known_sigmoid():
    steps = list(range(0, 2001, 10))
    values = [0.4 + 0.5 / (1 + math.exp(-(s - 1000) / 20)) for s in steps]
    tr = controlnet_study.transition(steps, values)
    assert tr["step_50"] == 1000
    # 10% .. 90% of a logistic with scale 20 spans 2 * 20 * ln 9 = 87.9 steps (at a 10-step grid: 80 or 90)
    assert 80 <= tr["width_10_90"] <= 90
    with pytest.raises(ValueError, match="does not rise"):
        controlnet_study.transition(steps, values[::-1])
    with pytest.raises(ValueError, match="matching"):
        controlnet_study.transition(steps[:3], values[:3])


def test_check_C12_controlnet_counts_less_training_memory_than_the_finetune():
    """The paper: ControlNet needs *more* memory than fine-tuning SD (1.23x). On the toy the direction is reversed:
    the counted memory of a ControlNet step is below that of the whole-model fine-tune."""
    torch.manual_seed(0)
    base = t2i.TextToImage().eval().requires_grad_(False)
    cn, ft = (controlnet_study.training_memory(k, base, batch_size=16) for k in controlnet_study.COST_KINDS)
    assert cn["trainable_params"] < ft["trainable_params"]
    assert cn["grad_and_adam_bytes"] == 3 * 4 * cn["trainable_params"]
    assert cn["total_bytes"] / ft["total_bytes"] < 1
    with pytest.raises(ValueError, match="kind"):
        controlnet_study.training_step("lora", base)


def test_coarse_control_is_scored_against_the_full_mask():
    masks, _, _ = controlnet_study.evaluation_set(20)
    layouts, _, _ = controlnet_study.evaluation_set(20, "coarse")
    assert torch.equal(layouts, C.coarse_layout(masks))
    assert torch.equal(controlnet_study.fidelity_target(20, "coarse"), masks)  # interpreted: the digit's own mask
    assert torch.equal(controlnet_study.fidelity_target(20, "top"), C.top_half(masks))  # copied: the control itself
    # a sample equal to the full mask has the control's coarse layout exactly, and IoU 1 with the mask
    assert torch.equal(controlnet_study.coarse_fidelity(masks * 2 - 1, layouts), torch.ones(20, dtype=torch.float64))
    with pytest.raises(ValueError, match="control"):
        controlnet_study.evaluation_set(5, "edges")


def test_mask_dropout_zeroes_whole_masks_with_the_shared_generator(base, batch):
    x, t, ids, c = batch
    model = controlnet_study.MaskChannelModel(base)
    data = controlnet_study.training_data("mask", 16)
    got = controlnet_study._mask_channel_loss(model, data, torch.Generator().manual_seed(3), 0.5, p_mask_drop=0.5)
    g = torch.Generator().manual_seed(3)  # oracle: draw the same keep-mask, zero those masks by hand, then no dropout
    keep = (torch.rand(16, generator=g) >= 0.5).float().view(-1, 1, 1, 1)
    want = controlnet_study._mask_channel_loss(model, (*data[:3], data[3] * keep), g, 0.5, p_mask_drop=0.0)
    assert 0 < keep.sum() < 16 and torch.equal(got, want)
    with pytest.raises(ValueError, match="p_mask_drop"):
        controlnet_study._mask_channel_loss(model, data, torch.Generator(), 0.5, p_mask_drop=1.0)


def test_saturation_and_cfg_placement_rows(base):
    assert controlnet_study.saturation(torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.01])) == pytest.approx(2 / 5)
    cn = C.ControlNet.from_unet(base.unet)
    rows = controlnet_study.cfg_placement(base, cn, seed=0, n=2)
    want = [(1.0, "(a) both")] + [(w, k) for w in controlnet_study.CFG_SCALES for k in controlnet_study.CFG_OPTIONS]
    assert [(r["guidance_scale"], r["placement"]) for r in rows] == want
    assert all(0 <= r[f"{m}_{s}"] <= 1 for r in rows for m in ("iou", "saturation") for s in ("none", "perfect"))
    # zero residuals: every placement and scale is the plain CFG sample, so each beta's rows agree exactly
    for w in controlnet_study.CFG_SCALES:
        same = [r for r in rows if r["guidance_scale"] == w]
        assert all(r["saturation_perfect"] == same[0]["saturation_perfect"] for r in same)
        assert all(r["iou_perfect"] == same[0]["iou_perfect"] for r in same)
