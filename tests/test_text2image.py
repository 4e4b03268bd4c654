"""Chapter 07's toy text-to-image world: vocabulary, tokenizer errors, the attribute captioner, the text encoder."""

import pytest
import torch

from dlearn import datasets
from dlearn import text2image as t2i


def test_tokenize_pads_and_starts_with_bos():
    ids = t2i.tokenize(["a thick three", ""])
    assert ids.shape == (2, t2i.MAX_LENGTH) and (ids[:, 0] == t2i.BOS).all()
    assert ids[0, 1:4].tolist() == [t2i.TOKEN_ID[w] for w in ("a", "thick", "three")] and (ids[0, 4:] == t2i.PAD).all()
    assert (ids[1, 1:] == t2i.PAD).all()  # the empty prompt
    assert torch.equal(t2i.tokenize("A Thick Three"), ids[:1])


def test_tokenize_refuses_unknown_words_and_long_prompts():
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['elephant'\].*the vocabulary is: a zero one"):
        t2i.tokenize("a thick elephant")
    with pytest.raises(ValueError, match="unknown"):
        t2i.tokenize("<pad> three")  # special tokens are not words
    with pytest.raises(ValueError, match="at most 6 fit"):
        t2i.tokenize("a thick thin slanted upright large three")
    with pytest.raises(TypeError, match="strings"):
        t2i.tokenize([3])


def _digit(rows, cols, level=16):
    x = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    for r, c in zip(rows, cols, strict=True):
        x[0, 0, r, c] = level
    return x


def test_attributes_on_drawn_digits():
    upright = _digit(range(1, 7), [3] * 6)
    leaning = _digit(range(1, 7), [6, 5, 4, 3, 2, 1])  # top to the right
    thick = torch.cat([_digit(range(1, 7), [3] * 6), _digit(range(1, 7), [4] * 6)]).amax(0, keepdim=True)
    a = {k: v.tolist() for k, v in t2i.attributes(torch.cat([upright, leaning, thick])).items()}
    assert abs(a["slant"][0]) < 1e-12 and a["slant"][1] > 0.5
    assert a["thickness"][2] == pytest.approx(2 * a["thickness"][0])
    assert a["size"][1] > a["size"][2] > a["size"][0] == pytest.approx((35 / 12) ** 0.5)  # sqrt(var of rows 1..6)
    with pytest.raises(ValueError, match="shape"):
        t2i.attributes(torch.zeros(2, 8, 8, dtype=torch.long))


def test_captions_split_each_class_in_half():
    x, y = datasets.digits("train")
    caps = t2i.caption(x, y)
    assert caps[0].startswith("a ") and caps[0].endswith(t2i.DIGIT_WORDS[int(y[0])])
    words = t2i.default_thresholds().words(x, y)
    for k, (_, high) in t2i.ATTRIBUTE_WORDS.items():
        share = sum(w == high for w in words[k]) / len(y)
        assert 0.4 < share < 0.55, (k, share)  # at or just under half: ties at the median go low
    for c in caps[:50]:
        t2i.tokenize(c)  # every caption is a valid prompt
    assert t2i.parse_prompt("a thick three") == (3, {"thickness": "thick"}) and t2i.parse_prompt("") == (None, {})


def test_text_encoder_shapes_and_padding():
    torch.manual_seed(0)
    enc = t2i.TextEncoder().eval()
    ids = t2i.tokenize(["a thick three", "", "sks"])
    out = enc(ids)
    assert out.shape == (3, t2i.MAX_LENGTH, 32) and torch.isfinite(out).all()
    # padding does not influence the real tokens: same prompt padded to the same length gives the same embedding
    again = enc(t2i.tokenize(["a thick three"]))
    torch.testing.assert_close(out[:1, :4], again[:, :4])
    with pytest.raises(ValueError, match="<bos>"):
        enc(torch.zeros(1, t2i.MAX_LENGTH, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        enc(ids[:, :3])


def test_prompt_fidelity_of_real_digits_is_near_perfect():
    x, y = datasets.digits("val")
    from dlearn.distributions import levels_to_unit

    bits = t2i.attribute_bits(x, y)
    fid = t2i.prompt_fidelity(levels_to_unit(x), y, bits)
    assert fid["class_accuracy"] > 0.95 and fid["attribute_accuracy"] == 1.0 and fid["fd"] < 5
    flipped = t2i.prompt_fidelity(levels_to_unit(x), y, 1 - bits)
    assert flipped["attribute_accuracy"] == 0.0


def test_evaluation_prompts_cover_every_class_and_attribute_combination():
    prompts, classes, bits = t2i.evaluation_prompts(per_prompt=2)
    assert len(prompts) == 160 and len(set(prompts)) == 80 and torch.bincount(classes).tolist() == [16] * 10
    for p, c, b in zip(prompts, classes, bits, strict=True):
        digit, asked = t2i.parse_prompt(p)
        assert digit == c and all(asked[k] == t2i.ATTRIBUTE_WORDS[k][int(b[j])] for j, k in enumerate(t2i.ATTRIBUTE_WORDS))


def test_model_generates_with_guidance_and_training_prompts_drop_out():
    torch.manual_seed(0)
    model = t2i.TextToImage()
    imgs = t2i.generate(model, ["a thick three", ""], guidance_scale=3.0, steps=3)
    assert imgs.shape == (2, 1, 8, 8) and imgs.abs().max() <= 1
    assert torch.equal(imgs, t2i.generate(model, ["a thick three", ""], guidance_scale=3.0, steps=3))
    with pytest.raises(ValueError, match="one prompt per image"):
        model(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), t2i.tokenize(["a three"]))
    g = torch.Generator().manual_seed(0)
    prompts = t2i.training_prompts(torch.zeros(2000, dtype=torch.long), torch.ones(2000, 3, dtype=torch.long), g)
    assert abs(sum(p == "" for p in prompts) / 2000 - 0.1) < 0.02
    assert all(p == "" or (p.startswith("a ") and p.endswith("zero") and "thin" not in p) for p in prompts)


@torch.no_grad()
def test_generate_guides_with_the_conditional_branch_weighted_w():
    """Classifier-free guidance in `generate` pinned without guidance.cfg: this test's own sampler calls the model's
    two branches directly, eps = eps(x, "") + w (eps(x, prompt) - eps(x, "")), from the same x_T (N(0, I) from
    the seed), with chapter 05's DDIM. w = 1 is the conditional branch alone, w = 0 the unconditional one; the
    branches of an untrained model differ by about 0.1, which a swap turns into image differences of order 1, while
    batching the two branches together (as generate does) changes the images by about 1e-5."""
    from dlearn import ddim

    torch.manual_seed(0)
    model = t2i.TextToImage(channels=(16, 32)).eval()
    prompts = ["a thick three", "a seven", "a slanted one"]
    cond, uncond = t2i.tokenize(prompts), t2i.tokenize([""] * 3)
    x_T = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(3))

    def own(w, first, second):
        def eps(x, t):
            e_first, e_second = model(x, t, first), model(x, t, second)
            return e_first + w * (e_second - e_first)

        return ddim.sample(eps, x_T, model.alpha_bar, 4, clip=False, progress=False).clamp(-1, 1)

    for w in (0.0, 1.0, 2.5):
        got = t2i.generate(model, prompts, guidance_scale=w, steps=4, seed=3, batch_size=2)
        torch.testing.assert_close(got, own(w, uncond, cond), atol=1e-3, rtol=0)
        assert (got - own(w, cond, uncond)).abs().max() > 0.5  # the swapped branches: far off


@torch.no_grad()
def test_generate_raw_is_generate_before_the_clamp_and_clips_x0_only_when_asked():
    """Oracle: this test's own DDIM loop with the model's two branches (chapter 05's `ddim.sample`, with and without
    x0 clipping); `generate` is `generate_raw` clamped to [-1, 1], bit for bit."""
    from dlearn import ddim, guidance

    torch.manual_seed(0)
    model = t2i.TextToImage(channels=(16, 32)).eval()
    prompts = ["a thick three", "a seven", ""]
    cond, uncond = t2i.tokenize(prompts), t2i.tokenize([""] * 3)
    x_T = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(5))

    def own(w, clip):
        def eps(x, t):
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond]))
            return guidance.cfg(*both.chunk(2), w)

        return ddim.sample(eps, x_T, model.alpha_bar, 4, clip=clip, progress=False)

    for w in (2.0, 6.0):
        raw = t2i.generate_raw(model, prompts, w, steps=4, seed=5)
        torch.testing.assert_close(raw, own(w, False), atol=1e-5, rtol=0)
        assert torch.equal(t2i.generate(model, prompts, w, steps=4, seed=5), raw.clamp(-1, 1))
        clipped = t2i.generate_raw(model, prompts, w, steps=4, seed=5, clip=True)
        torch.testing.assert_close(clipped, own(w, True), atol=1e-5, rtol=0)
        assert (clipped - raw).abs().max() > 1e-3  # the clipping does change the samples of an untrained model
    with pytest.raises(TypeError, match="clip must be a bool"):
        t2i.generate_raw(model, prompts, 2.0, steps=2, clip="yes")
    with pytest.raises(TypeError):
        t2i.generate_raw(model, "a three", 2.0, steps=2)
