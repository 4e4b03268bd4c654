"""Chapter 08: ControlNet. The mechanism on a seeded untrained base (fast); the trained claims are in
tests/test_studies_controlnet.py, and those on the numbers recorded with the shipped weights and study in
tests/test_records.py."""

import hashlib

import pytest
import torch

from dlearn import controlnet as C
from dlearn import text2image as t2i
from dlearn.studies import controlnet as controlnet_study


def _perturb(module, gen, std=0.05):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))


def _digest(module):
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


def test_check_C3_base_is_locked_and_gets_no_optimizer_state(base, batch, gen):
    x, t, ids, c = batch
    before = _digest(base)
    cn = C.ControlNet.from_unet(base.unet)
    model = C.ControlledModel(base, cn)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        ((model(x, t, ids, c) - x) ** 2).mean().backward()
        opt.step()
    assert _digest(base) == before
    with_state = {id(p) for p in opt.state}
    assert with_state == {id(p) for p in cn.parameters()}
    assert not any(id(p) in with_state for p in base.parameters())


def test_check_C4_trainable_copy_equals_the_encoder_half(base):
    cn = C.ControlNet.from_unet(base.unet)
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
        mine, theirs = getattr(cn, name).state_dict(), getattr(base.unet, name).state_dict()
        assert mine.keys() == theirs.keys()
        assert max((mine[k] - theirs[k]).abs().max().item() for k in mine) == 0.0
    encoder = sum(p.numel() for n in ("conv_in", "time_embedding", "down_blocks", "mid_block")
                  for p in getattr(base.unet, n).parameters())  # fmt: skip
    extra = sum(p.numel() for m in (cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding)
                for p in m.parameters())  # fmt: skip
    assert sum(p.numel() for p in cn.parameters()) == encoder + extra
    assert sum(p.numel() for p in cn.parameters()) < sum(p.numel() for p in base.unet.parameters())
    # and the copy is a copy: training it leaves the base alone
    with torch.no_grad():
        next(cn.down_blocks.parameters()).add_(1.0)
    assert not torch.equal(next(cn.down_blocks.parameters()), next(base.unet.down_blocks.parameters()))


def test_check_C5_zero_convolutions_leave_the_base_unchanged_bit_for_bit(base, batch, gen):
    x, t, ids, c = batch
    cn = C.ControlNet.from_unet(base.unet)
    text = base.text(ids)
    res = cn(x, t, text, c)
    assert all(torch.count_nonzero(r) == 0 for r in [*res.down, res.mid])
    assert torch.equal(C.ControlledModel(base, cn)(x, t, ids, c), base(x, t, ids))
    _perturb(cn.controlnet_down_blocks, gen)
    assert not torch.equal(C.ControlledModel(base, cn)(x, t, ids, c), base(x, t, ids))


def test_check_C6_only_the_outer_zero_convolutions_get_gradient_at_step_0(base, batch, gen):
    x, t, ids, c = batch
    cn = C.ControlNet.from_unet(base.unet)
    model = C.ControlledModel(base, cn)
    opt = torch.optim.AdamW(cn.parameters(), lr=1e-3)

    def norms():
        opt.zero_grad()
        ((model(x, t, ids, c) - x) ** 2).mean().backward()
        group = {"z2": [*cn.controlnet_down_blocks.parameters(), *cn.controlnet_mid_block.parameters()],
                 "copy": [*cn.down_blocks.parameters(), *cn.mid_block.parameters(), *cn.conv_in.parameters()],
                 "z1": [*cn.controlnet_cond_embedding.conv_out.parameters()]}  # fmt: skip
        return {k: sum(p.grad.norm() ** 2 for p in v if p.grad is not None) ** 0.5 for k, v in group.items()}

    step0 = norms()
    assert step0["z2"] > 0 and step0["copy"] == 0 and step0["z1"] == 0
    opt.step()
    step1 = norms()
    assert all(v > 0 for v in step1.values()), step1


def test_check_C7_one_zero_convolution_per_skip_plus_the_middle_block(base, batch):
    x, t, ids, c = batch
    cn = C.ControlNet.from_unet(base.unet)
    skips_consumed = sum(len(block.resnets) for block in base.unet.up_blocks)
    assert len(cn.controlnet_down_blocks) == skips_consumed == 4
    res = cn(x, t, base.text(ids), c)
    assert [tuple(r.shape[1:]) for r in res.down] == [(32, 8, 8), (32, 8, 8), (32, 4, 4), (64, 4, 4)]
    assert tuple(res.mid.shape[1:]) == (64, 4, 4)
    assert C.skip_shapes(base.unet) == [tuple(r.shape[1:]) for r in [*res.down, res.mid]]


def test_check_C9_step0_loss_equals_the_base_loss_exactly(base):
    data = controlnet_study.training_data("mask", 64)
    cn = C.ControlNet.from_unet(base.unet)
    loss = C.controlnet_loss(base, cn, data, torch.Generator().manual_seed(3))
    base_loss = C.controlnet_loss(base, None, data, torch.Generator().manual_seed(3))
    assert loss.item() == base_loss.item()
    gauss = C.ControlNet.from_unet(base.unet, init="gaussian")
    assert C.controlnet_loss(base, gauss, data, torch.Generator().manual_seed(3)).item() != base_loss.item()


def test_check_C13_control_on_both_branches_cancels_without_a_prompt(base, batch, gen):
    x, t, _, c = batch
    cn = C.ControlNet.from_unet(base.unet)
    _perturb(cn, gen)
    null = base.text(t2i.tokenize([""] * len(x)))
    for w in (1.0, 3.0, 7.5):
        prd = C.guided_eps(base, [cn], [c], x, t, null, null, w, "both")
        e_u = C.controlled_eps(base, x, t, None, cn(x, t, null, c), null)
        assert torch.equal(prd - e_u, torch.zeros_like(x)) or (prd - e_u).abs().max() == 0
        # the control acts with weight 1 whatever w is
        torch.testing.assert_close(prd, C.guided_eps(base, [cn], [c], x, t, null, null, 1.0, "both"), rtol=0, atol=0)


def test_check_C14_control_on_the_conditional_branch_is_multiplied_by_w(base, batch, gen):
    x, t, ids, c = batch
    cn = C.ControlNet.from_unet(base.unet)
    _perturb(cn, gen)
    cond, null = base.text(ids), base.text(t2i.tokenize([""] * len(x)))
    zero = torch.zeros_like(c)
    off = C.ControlNet.from_unet(base.unet)  # zero residuals: "no control"
    for w in (2.0, 5.0):
        change = C.guided_eps(base, [cn], [c], x, t, cond, null, w, "cond") - C.guided_eps(
            base, [off], [zero], x, t, cond, null, w, "cond"
        )
        branch = C.controlled_eps(base, x, t, None, cn(x, t, cond, c), cond) - C.controlled_eps(base, x, t, None, None, cond)
        torch.testing.assert_close(change, w * branch, rtol=1e-4, atol=1e-5)


def test_check_C15_block_weights():
    code = C.guess_mode_weights(13)
    assert round(code[0], 4) == 0.0994 and code[-1] == 1.0
    torch.testing.assert_close(torch.tensor(code), torch.logspace(-1, 0, 13), rtol=7e-3, atol=0)  # diffusers: within 0.6%
    assert C.paper_block_weights([64, 32, 16, 8]) == [1, 2, 4, 8]
    cn = C.ControlNet()
    assert C.toy_block_weights(cn, "paper") == [1, 1, 2, 2, 2]
    assert C.toy_block_weights(cn, "code") == pytest.approx([0.825**4, 0.825**3, 0.825**2, 0.825, 1])
    with pytest.raises(ValueError, match="expected 5 block weights"):
        C.Residuals([torch.ones(1)] * 4, torch.ones(1)).scaled([1.0, 2.0])


def test_check_C16_two_controlnets_add_their_residuals(base, batch, gen):
    x, t, ids, c = batch
    cn1, cn2 = C.ControlNet.from_unet(base.unet), C.ControlNet.from_unet(base.unet)
    _perturb(cn1, gen)
    _perturb(cn2, gen)
    c1, c2 = C.top_half(c), C.bottom_half(c)
    text = base.text(ids)
    both = C.ControlledModel(base, cn1, cn2)(x, t, ids, [c1, c2])
    r1, r2 = cn1(x, t, text, c1), cn2(x, t, text, c2)
    by_hand = base.unet(x, t, encoder_hidden_states=text,
                        down_block_additional_residuals=tuple(a + b for a, b in zip(r1.down, r2.down, strict=True)),
                        mid_block_additional_residual=r1.mid + r2.mid).sample  # fmt: skip
    assert torch.equal(both, by_hand)
    assert torch.equal(C.top_half(c) + C.bottom_half(c), c)


def test_matches_diffusers_controlnet_from_unet(base, batch, gen):
    x, t, ids, c = batch
    cn = C.ControlNet.from_unet(base.unet)
    _perturb(cn, gen)  # non-zero everywhere, so every weight matters
    ref = C.to_diffusers(cn)
    text = base.text(ids)
    mine = cn(x, t, text, c, scale=0.7)
    down, mid = ref(x, t, encoder_hidden_states=text, controlnet_cond=c, conditioning_scale=0.7, return_dict=False)
    for a, b in zip([*mine.down, mine.mid], [*down, mid], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and diffusers' own from_unet copies the same encoder half as ours
    from diffusers import ControlNetModel

    theirs = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16,), conditioning_channels=1)
    ours = C.ControlNet.from_unet(base.unet).state_dict()
    assert ours.keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        if not k.startswith("controlnet_cond_embedding.conv_in") and not k.startswith("controlnet_cond_embedding.blocks"):
            assert torch.equal(v, ours[k]), k  # the copy and every zero-initialised part agree


def test_control_shapes_get_clear_errors(base, batch):
    x, t, ids, c = batch
    cn = C.ControlNet.from_unet(base.unet)
    text = base.text(ids)
    with pytest.raises(ValueError, match=r"expected a control of shape \(6, 1, 8, 8\).*got \(6, 1, 1, 1\)"):
        cn(x, t, text, c[:, :, :1, :1])  # diffusers would broadcast this collapsed condition
    with pytest.raises(ValueError, match="got \\(5, 1, 8, 8\\)"):
        cn(x, t, text, c[:5])
    with pytest.raises(ValueError, match="got \\(6, 3, 8, 8\\)"):
        cn(x, t, text, c.expand(-1, 3, -1, -1))
    with pytest.raises(TypeError, match="float"):
        cn(x, t, text, c.long())
    with pytest.raises(TypeError, match="tensor"):
        cn(x, t, text, c.numpy())
    with pytest.raises(ValueError, match="one control per ControlNet"):
        C.ControlledModel(base, cn)(x, t, ids, [c, c])
    with pytest.raises(ValueError, match="one prompt per control"):
        C.generate(base, cn, c, ["a three"])
    with pytest.raises(ValueError, match="placement"):
        C.generate(base, cn, c, [""] * 6, guidance_scale=2.0, placement="uncond")
    with pytest.raises(ValueError, match="variant"):
        C.ControlNet(variant="tiny")
    with pytest.raises(ValueError, match="init"):
        C.ControlNet(init="ones")


def test_lite_controlnet_shapes_and_zero_start(base, batch):
    x, t, ids, c = batch
    lite = C.ControlNet.from_unet(base.unet, variant="lite")
    res = lite(x, t, base.text(ids), c)
    assert [tuple(r.shape[1:]) for r in [*res.down, res.mid]] == C.skip_shapes(base.unet)
    assert torch.equal(C.ControlledModel(base, lite)(x, t, ids, c), base(x, t, ids))
    full = C.ControlNet.from_unet(base.unet)
    assert sum(p.numel() for p in lite.parameters()) < sum(p.numel() for p in full.parameters()) / 2
    with pytest.raises(ValueError, match="lite"):
        C.to_diffusers(lite)


def test_coarse_layout_is_a_2x2_max_pool_blown_back_up():
    m = torch.zeros(1, 1, 8, 8)
    m[0, 0, 0, 1] = 1  # one pixel in the top-left 2x2 cell
    m[0, 0, 5, 6] = 1  # one in the cell of rows 4-5, columns 6-7
    out = C.coarse_layout(m)
    want = torch.zeros(1, 1, 8, 8)
    want[0, 0, 0:2, 0:2] = 1
    want[0, 0, 4:6, 6:8] = 1
    assert torch.equal(out, want)
    assert torch.equal(C.coarse_layout(out), out)  # a layout map is its own layout
    assert torch.equal(C.coarse_layout(m, block=4)[0, 0, :4, :4], torch.ones(4, 4))
    assert C.CONTROLS["coarse"] is C.coarse_layout
    with pytest.raises(ValueError, match="divisible"):
        C.coarse_layout(torch.zeros(1, 1, 7, 7))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        C.coarse_layout(torch.zeros(8, 8))
