"""Chapter 11: Prompt-to-Prompt attention control (`dlearn.p2p`) on diffusers' StableDiffusionPipeline.

The mechanism is tested on the tiny random pipeline (`sd.tiny_pipeline`, 32x32 images, 16x16x4 latents, 4-5 DDIM
steps, float32 on CPU): the recorded attention maps are compared with the maps a run without control computes, and the
edited run with diffusers' own pipeline call. The claim that a word swap preserves the source image better than a
plain prompt swap is measured on the tiny pipeline trained on the digits (dlearn/weights/tiny_sd)."""

from pathlib import Path

import pytest
import torch

from dlearn import inversion as I
from dlearn import metrics, p2p, sd

SRC, TGT = "a thin seven", "a thick seven"  # one token each: equal token lengths
W = 7.5
TRAINED = Path(__file__).resolve().parent.parent / "dlearn" / "weights" / "tiny_sd"


def _tamed(pipe):
    with torch.no_grad():  # as in test_sd: a random UNet's eps is large; scale it so that latents stay O(1)
        pipe.unet.conv_out.weight.mul_(0.1)
        pipe.unet.conv_out.bias.mul_(0.1)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    sd.quiet()
    return _tamed(sd.tiny_pipeline())


@pytest.fixture(scope="module")
def v_pipe():
    from diffusers import DDIMScheduler

    p = _tamed(sd.tiny_pipeline())
    p.scheduler = DDIMScheduler.from_config(p.scheduler.config, prediction_type="v_prediction")
    return p


@pytest.fixture
def z():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))


def _plain(pipe, prompt, z, steps):
    """diffusers' own pipeline call, default attention processors: the oracle for runs without control."""
    with torch.no_grad():
        return pipe(prompt=prompt, latents=z, num_inference_steps=steps, guidance_scale=W, height=32, width=32,
                    output_type="latent").images  # fmt: skip


def _check_injection(pipe, z, steps=5):
    """Word swap with fraction 0.5 for both windows: the reference counts cross-attention steps on N + 1 rows and
    self-attention steps on N, so the cross window is int(0.5 * 6) = 3 steps and the self window int(0.5 * 5) = 2."""
    assert p2p.replace_window(0.5, steps, steps + 1, "c") == (0, 3) and p2p.replace_window(0.5, steps, steps, "s") == (0, 2)
    assert p2p.replace_window((0.2, 0.6), 10, 11, "c") == (2, 6)
    r = p2p.edit(pipe, SRC, TGT, z, steps=steps, guidance_scale=W, cross_replace=0.5, self_replace=0.5, record=True,
                 record_self=True)  # fmt: skip
    alone_z, alone = p2p.capture(pipe, [SRC], z, steps, W, record_self=True)
    assert len(r.maps["cross"]) == steps * 6 and len(r.maps["self"]) == steps * 6  # 6 transformer blocks, 1 per step
    for kind, window in (("cross", 3), ("self", 2)):
        for (step, layer), m in r.maps[kind].items():
            # the source row is computed as if alone (same latents), up to float32 rounding of a batch of 2 vs 1
            assert torch.allclose(m[0], alone[kind][(step, layer)][0], atol=1e-5), (kind, step, layer)
            if step < window:  # injected: the target's maps ARE the source run's
                assert torch.equal(m[1], m[0]), (kind, step, layer)
                assert torch.allclose(m[1], alone[kind][(step, layer)][0], atol=1e-5)
            else:  # its own maps afterwards (different tokens, a different trajectory)
                assert (m[1] - m[0]).abs().max() > 1e-4, (kind, step, layer)
    assert torch.allclose(r.source, alone_z, atol=1e-4), (r.source - alone_z).abs().max()
    assert (r.target - r.source).abs().max() > 1e-3  # the edit changed something
    return r


def test_word_swap_injects_the_source_maps_and_leaves_the_source_alone(pipe, z):
    _check_injection(pipe, z)


def test_without_injection_the_edit_is_the_plain_pipeline_run(pipe, z):
    r = p2p.edit(pipe, SRC, TGT, z, steps=4, guidance_scale=W, cross_replace=0.0, self_replace=0.0, record=True)
    assert all((m[1] - m[0]).abs().max() > 1e-4 for m in r.maps["cross"].values())
    avg = p2p.mean_cross_map(r.maps, 1)  # 16x16 latents -> cross-attention at 8x8 in the tiny UNet
    assert avg.shape == (8, 8, 77) and torch.allclose(avg.sum(-1), torch.ones(8, 8), atol=1e-5)
    # diffusers' default processor (scaled_dot_product_attention) vs explicit softmax, batch 2 vs 1: float32 rounding
    for row, prompt in ((r.source, SRC), (r.target, TGT)):
        plain = _plain(pipe, prompt, z, 4)
        assert torch.allclose(row, plain, atol=1e-4), (row - plain).abs().max()


def test_the_processor_with_no_control_is_diffusers_attn_processor_bit_for_bit(pipe, z):
    from diffusers.models.attention_processor import AttnProcessor

    saved = dict(pipe.unet.attn_processors)
    try:
        pipe.unet.set_attn_processor(AttnProcessor())
        theirs = _plain(pipe, [SRC, TGT], z.expand(2, -1, -1, -1), 3)
    finally:
        pipe.unet.set_attn_processor(saved)
    ours = p2p.run(pipe, [SRC, TGT], z, 3, W, controller=p2p.AttentionStore(2))
    assert torch.equal(ours, theirs)


def test_only_the_conditional_target_row_is_controlled():
    """One cross-attention layer on a CFG batch [uncond source, uncond target, cond source, cond target] (the
    reference's attn[h // 2:]): the first three rows are diffusers' AttnProcessor's bit for bit; the last one mixes
    the target's values with the source's probabilities."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, ctx = torch.randn(4, 9, 16), torch.randn(4, 77, 12)  # 77 tokens, as the tokenizer pads
    ctrl = p2p.P2PController(sd.tiny_tokenizer(), SRC, TGT, 1, cross_replace=1.0)
    ctrl.num_layers = 1
    with torch.no_grad():
        theirs = AttnProcessor()(attn, x, ctx)
        ours = p2p.P2PAttnProcessor(ctrl, "layer")(attn, x, ctx)
        assert torch.equal(ours[:3], theirs[:3])
        q, k, v = (attn.head_to_batch_dim(f) for f in (attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)))
        probs = attn.get_attention_scores(q, k).reshape(4, 2, 9, 77)
        expected = attn.to_out[0](attn.batch_to_head_dim(probs[2] @ v.reshape(4, 2, 77, 8)[3]))
        assert torch.allclose(ours[3], expected[0], atol=1e-6) and not torch.allclose(ours[3], theirs[3], atol=1e-3)
    assert ctrl.step == 1  # one call per layer per step: the controller counts steps by layer calls


def test_processors_are_restored_after_edit_and_when_it_raises(pipe, z, monkeypatch):
    before = {k: id(v) for k, v in pipe.unet.attn_processors.items()}
    p2p.edit(pipe, SRC, TGT, z, steps=2, guidance_scale=W)
    assert {k: id(v) for k, v in pipe.unet.attn_processors.items()} == before

    def boom(*args, **kwargs):
        assert all(isinstance(v, p2p.P2PAttnProcessor) for v in pipe.unet.attn_processors.values())  # installed
        raise RuntimeError("scheduler failed")

    monkeypatch.setattr(pipe.scheduler, "step", boom)
    with pytest.raises(RuntimeError, match="scheduler failed"):
        p2p.edit(pipe, SRC, TGT, z, steps=2, guidance_scale=W)
    assert {k: id(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_reweight_scales_the_chosen_tokens_maps_by_c_without_renormalising(pipe, z):
    """The reference's AttentionReweight: inside the cross window the target's maps are the source's times the
    equalizer (c at the word's tokens, 1 elsewhere), not renormalised; outside it, the target's own maps."""
    prompt = "a thick seven"
    pos = p2p.word_positions(pipe.tokenizer, prompt, "thick")
    assert pos == [2]
    r = p2p.edit(pipe, prompt, prompt, z, steps=4, guidance_scale=W, cross_replace=0.6, self_replace=0.0,
                 mode="reweight", reweight={"thick": 3.0}, record=True)  # fmt: skip
    c = torch.ones(77)
    c[pos] = 3.0
    for (step, _), m in r.maps["cross"].items():
        if step < 3:  # int(0.6 * 5)
            assert torch.equal(m[1], m[0] * c)
            assert torch.allclose(m[1].sum(-1), 1 + 2 * m[0][..., 2])  # rows sum to more than 1: no renormalisation
        else:
            assert torch.allclose(m[1].sum(-1), torch.ones(()), atol=1e-5)
    # with c = 1 the re-weighted run is the source itself (same prompt, same maps)
    same = p2p.edit(pipe, prompt, prompt, z, steps=4, guidance_scale=W, mode="reweight", reweight={"thick": 1.0})
    assert torch.allclose(same.target, same.source, atol=1e-5)


def test_refine_aligns_the_tokens_and_added_words_keep_their_maps(pipe, z):
    assert p2p.align([0, 5, 6, 1], [0, 5, 9, 6, 1]) == ([0, 1, -1, 2, 3], [True, True, False, True, True])
    assert p2p.align([0, 5, 9, 6, 1], [0, 5, 6, 1])[0] == [0, 1, 3, 4]  # a removed word: its map is dropped
    source, target = "a seven", "a thick seven"  # target tokens: <bos> a thick seven <eos>
    index, alphas = p2p.refinement_mapper(pipe.tokenizer, source, target)
    assert index[:5].tolist() == [0, 1, 0, 2, 3] and alphas[:5].tolist() == [1, 1, 0, 1, 1]
    assert index[5:].tolist() == list(range(5, 77)) and bool((alphas[5:] == 1).all())
    r = p2p.edit(pipe, source, target, z, steps=4, guidance_scale=W, cross_replace=1.0, self_replace=0.0,
                 mode="refine", reweight={"thick": 2.0}, record=True)  # fmt: skip
    own = p2p.capture(pipe, [source, target], z, 4, W)[1]["cross"]
    for src, tgt in r.maps["cross"].values():
        assert torch.equal(tgt[..., [0, 1, 3, 4]], src[..., [0, 1, 2, 3]])  # aligned tokens: the source's maps
        assert torch.equal(tgt[..., 5:], src[..., 5:])
    # the added word keeps its own map (x2 here): in the first cross-attention layer of step 0 the target's input is
    # still that of a run without control (deeper layers see the edited layers' outputs)
    first = min(k for k in own if k[0] == 0)
    assert torch.allclose(r.maps["cross"][first][1][..., 2], 2 * own[first][1][..., 2], atol=1e-6)


def test_bad_input_raises_clear_errors(pipe, z):
    kw = {"steps": 2, "guidance_scale": W}
    with pytest.raises(ValueError, match="equal token length"):
        p2p.edit(pipe, "a seven", "a thick seven", z, **kw)
    with pytest.raises(ValueError, match="equal token length"):
        p2p.edit(pipe, "a seven", "a xyzzy", z, mode="reweight", reweight={"a": 2.0}, **kw)  # "xyzzy": byte tokens
    for bad in (1.5, -0.1, (0.6, 0.2), (0.0, 1.2)):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            p2p.edit(pipe, SRC, TGT, z, cross_replace=bad, **kw)
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            p2p.edit(pipe, SRC, TGT, z, self_replace=bad, **kw)
    for bad in ("0.5", None, (0.1, 0.2, 0.3)):
        with pytest.raises(TypeError, match="fraction"):
            p2p.edit(pipe, SRC, TGT, z, cross_replace=bad, **kw)
    with pytest.raises(ValueError, match="mode should be one of"):
        p2p.edit(pipe, SRC, TGT, z, mode="swap", **kw)
    with pytest.raises(ValueError, match="needs reweight"):
        p2p.edit(pipe, SRC, SRC, z, mode="reweight", **kw)
    with pytest.raises(ValueError, match="a word of the prompt"):
        p2p.edit(pipe, SRC, TGT, z, reweight={"thin": 2.0}, **kw)  # "thin" is not in the target prompt
    with pytest.raises(TypeError, match="reweight should be a dict"):
        p2p.edit(pipe, SRC, TGT, z, reweight=[("thick", 2.0)], **kw)
    with pytest.raises(TypeError, match="prompts"):
        p2p.edit(pipe, SRC, 7, z, **kw)
    with pytest.raises(ValueError, match="starting latents"):
        p2p.edit(pipe, SRC, TGT, z.expand(2, -1, -1, -1), **kw)
    with pytest.raises(ValueError, match="one null embedding per step"):
        p2p.edit(pipe, SRC, TGT, z, nulls=[sd.encode_prompts(pipe, [""])], **kw)
    with pytest.raises(ValueError, match="guidance_scale > 1 with per-step nulls"):  # the pipeline uses no null at w <= 1
        p2p.edit(pipe, SRC, TGT, z, steps=2, guidance_scale=1.0, nulls=[sd.encode_prompts(pipe, [""])] * 2)
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        p2p.edit(pipe, SRC, TGT, z, steps=2, guidance_scale=0.5)
    before = {k: id(v) for k, v in pipe.unet.attn_processors.items()}
    assert {k: id(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_v_prediction_pipeline(v_pipe, z):
    assert sd.prediction_type(v_pipe) == "v_prediction"
    _check_injection(v_pipe, z)
    r = p2p.edit(v_pipe, SRC, TGT, z, steps=4, guidance_scale=W, cross_replace=0.0, self_replace=0.0)
    assert torch.allclose(r.target, _plain(v_pipe, TGT, z, 4), atol=1e-4)


def test_editing_a_null_text_inversion_reconstructs_the_source(pipe):
    """A real image inverted on an sd.PipelineWorld: the source row of the edit is sd.pipeline_reconstruct's
    reconstruction (the same loop with the same per-step nulls), and without injection the target row is the plain
    prompt swap through the same nulls."""
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    world = sd.PipelineWorld(pipe, [SRC])
    inv = I.null_text_optimisation(world, I.ddim_invert(world, sd.encode_images(pipe, image), 3), W, inner_steps=2)
    r = p2p.edit_inversion(pipe, inv, SRC, TGT, cross_replace=0.0, self_replace=0.0)
    assert torch.allclose(r.source, sd.pipeline_reconstruct(pipe, world, inv, W), atol=1e-4)
    swapped = sd.pipeline_reconstruct(pipe, sd.PipelineWorld(pipe, [TGT]), inv, W)
    assert torch.allclose(r.target, swapped, atol=1e-4)
    edited = p2p.edit_inversion(pipe, inv, SRC, TGT, record=True)
    assert torch.allclose(edited.source, r.source, atol=1e-4)
    assert all(torch.equal(m[1], m[0]) for (step, _), m in edited.maps["cross"].items() if step < 3)  # int(.8 * 4)


# --------------------------------------------------------------------------------------------
# On the tiny pipeline trained on the digits: does a word swap preserve the source image?
# --------------------------------------------------------------------------------------------

ATTRIBUTE_SWAPS = [("a thin seven", "a thick seven"), ("a thick three", "a thin three"), ("a thin zero", "a thick zero"),
                   ("a thick two", "a thin two")]  # fmt: skip
DIGIT_SWAPS = [("a thin three", "a thin eight"), ("a thick one", "a thick seven"), ("a thin six", "a thin five"),
               ("a thick four", "a thick nine")]  # fmt: skip


def preservation(pipe, pairs, seeds, steps: int, w: float, **options) -> dict:
    """For each seed (starting latents) and (source, target) pair: the decoded source image, its Prompt-to-Prompt
    edit and the plain prompt swap from the same latents. Per seed, the pixel MSE to the source (16x16 RGB in [-1, 1])
    averaged over the pairs, for each method; per edit, whether the target's class (the book's digit classifier) and
    thickness word (chapter 07's captioner with the target class's median) are reached, on the 8x8 grey digit."""
    from dlearn import text2image as t2i
    from dlearn.distributions import unit_to_levels
    from dlearn.studies.sd import to_digits

    clf, th = metrics.shipped_classifier(), t2i.default_thresholds()
    side = pipe.unet.config.sample_size
    out = {"p2p": [], "plain": [], "class": {"p2p": [], "plain": []}, "thickness": {"p2p": [], "plain": []}}
    for seed in seeds:
        z = torch.randn(1, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))
        per = {"p2p": [], "plain": []}
        for src, tgt in pairs:
            r = p2p.edit(pipe, src, tgt, z, steps=steps, guidance_scale=w, **options)
            images = sd.decode_latents(pipe, torch.cat([r.source, r.target, p2p.run(pipe, [tgt], z, steps, w)]))
            digit, asked = t2i.parse_prompt(tgt)
            levels = unit_to_levels(to_digits(images[1:]))
            got_class = metrics.predict(clf, t2i.levels_to_unit(levels)).argmax(-1)
            got_thick = t2i.attribute_bits(levels, torch.tensor([digit, digit]), th)[:, 0]
            for k, name in enumerate(("p2p", "plain")):
                per[name].append(I.mse(images[1 + k : 2 + k], images[:1]).item())
                out["class"][name].append(int(got_class[k]) == digit)
                out["thickness"][name].append(int(got_thick[k]) == t2i.ATTRIBUTE_WORDS["thickness"].index(asked["thickness"]))
        for name in ("p2p", "plain"):
            out[name].append(sum(per[name]) / len(per[name]))
    return out


@pytest.mark.parametrize("pairs", [ATTRIBUTE_SWAPS, DIGIT_SWAPS], ids=["thin-thick", "digit"])
def test_word_swap_preserves_the_source_better_than_a_plain_prompt_swap(pairs):
    """The paper's claim (Sec. 3.2, Fig. 4; Fig. 2 for the plain swap): with the source's attention maps injected, the
    edit keeps the source image's layout; a plain prompt swap from the same noise does not. On the tiny pipeline
    trained on the digits, at its recorded guidance scale and steps, paired over 5 seeds (4 swaps each): pixel MSE to
    the source, P2P lower by more than 2 SE. And the edit happens: P2P reaches the asked class in every edit and the
    asked thickness word in more than half (a coin would); it reaches the thickness less often than the plain swap,
    so part of the lower MSE is a weaker edit (chapter 11, section 2, measures that on inverted real digits)."""
    from dlearn.studies import sd as study

    assert (TRAINED / "model_index.json").exists(), f"the trained tiny pipeline is missing: expected {TRAINED}"
    sd.quiet()
    pipe = sd.load_pipeline(TRAINED, device="cpu")
    recorded = study.read_metrics(TRAINED)["metrics"]
    w, steps = recorded["guidance_scale"], recorded["sample_steps"]
    res = preservation(pipe, pairs, range(5), steps=steps, w=w)
    diff = [b - a for a, b in zip(res["p2p"], res["plain"], strict=True)]
    (m_p, se_p), (m_s, se_s), (m_d, se_d) = (metrics.mean_se(v) for v in (res["p2p"], res["plain"], diff))
    print(f"w = {w}, {steps} steps; pixel MSE to the source: P2P {m_p:.4f} +- {se_p:.4f}, plain swap {m_s:.4f} +- "
          f"{se_s:.4f}, plain - P2P {m_d:.4f} +- {se_d:.4f}")  # fmt: skip
    for what in ("class", "thickness"):
        print(f"{what} reached:", {k: f"{sum(v)}/{len(v)}" for k, v in res[what].items()})
    assert m_d > 2 * se_d
    assert all(res["class"]["p2p"]), res["class"]
    assert sum(res["thickness"]["p2p"]) > len(res["thickness"]["p2p"]) / 2, res["thickness"]
