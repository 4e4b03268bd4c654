"""Chapter 09: DreamBooth. The loss weights, prompts, metric code and training mechanics here, and the claims on the
shipped model; the claims on the shipped study are in test_records.py (B1 in test_studies_dreambooth.py)."""

import pytest
import torch

from dlearn import dreambooth as D
from dlearn import text2image as t2i
from dlearn.studies import dreambooth as dreambooth_study


@pytest.fixture(scope="module")
def subject():
    return D.make_subject(**dreambooth_study.MAIN_SUBJECT)


def test_check_B2_x_hat_weights_are_eps_weights(gen):
    ab = torch.rand(50, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    x, eps, eps_hat = torch.randn(3, 50, 64, generator=gen, dtype=torch.float64)
    a, s = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
    z = a * x + s * eps
    x_hat = (z - s * eps_hat) / a
    lhs = ((x_hat - x) ** 2).sum(1)
    rhs = D.eps_from_x0_weight(ab) * ((eps_hat - eps) ** 2).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_check_B3_prompt_builder():
    assert D.subject_prompt() == "a sks three"
    assert D.subject_prompt("zwx", "seven", ("thick",)) == "a zwx thick seven"
    assert D.subject_prompt("sks", None) == "a sks" and D.subject_prompt(None, "three") == "a three"
    ids = t2i.tokenize(D.subject_prompt())
    assert ids[0, 1:4].tolist() == [t2i.TOKEN_ID[w] for w in ("a", "sks", "three")]
    with pytest.raises(ValueError, match="unknown word"):
        D.subject_prompt("dog")
    with pytest.raises(ValueError, match="identifier or a class noun"):
        D.subject_prompt(None, None)


def test_check_B11_metric_code(subject):
    from dlearn import datasets

    x, y = datasets.digits("test", form="unit")
    threes, sevens = x[y == 3][:20], x[y == 7][:20]
    assert D.feature_similarity(threes[:1], threes[:1]) == pytest.approx(1.0, abs=1e-12)
    assert D.feature_similarity(threes[:1], threes[:1], centre=D.class_centre(3)) == pytest.approx(1.0, abs=1e-12)
    same = D.feature_similarity(threes, threes, exclude_diagonal=True)
    assert D.feature_similarity(threes, sevens) < same
    assert D.diversity(threes[:1].expand(5, -1, -1, -1)) == pytest.approx(0.0, abs=1e-12)
    assert D.prompt_fidelity(threes, 3) > 0.9 and D.prompt_fidelity(threes, 7) < 0.1
    # B11: ranked by their similarity to the 5 training images, the subject's other images stand above the other
    # unseen threes far better with centred features (DINO analogue) than raw ones (CLIP-I analogue); the AUC is
    # scale-free, so this is not the wider range that centring gives every cosine
    pool, member = D.unseen_pool(subject)
    centre = D.class_centre(3)
    auc = {}
    for name, c in (("raw", None), ("centred", centre)):
        score = torch.tensor([D.feature_similarity(pool[i : i + 1], subject.images, centre=c) for i in range(len(pool))])
        auc[name] = D.separation_auc(score[member], score[~member])
    (a_raw, se_raw), (a_c, se_c) = auc["raw"], auc["centred"]
    assert a_c - a_raw > 2 * (se_raw**2 + se_c**2) ** 0.5
    with pytest.raises(ValueError, match="expected images"):
        D.feature_similarity(threes[:, 0], threes)
    with pytest.raises(ValueError, match="at least two"):
        D.diversity(threes[:1])


def test_subject_is_unseen_by_the_base_and_consistent(subject):
    from dlearn import datasets

    train, _ = datasets.digits("train", form="unit")
    dist = torch.cdist(subject.images.reshape(5, -1), train.reshape(len(train), -1)).min(1).values
    assert (dist > 0).all()  # none of the subject images is a training digit
    assert subject.images.shape == (5, 1, 8, 8) and len(subject.held_out) >= 8
    one = D.make_subject(3, n_images=1)
    assert torch.equal(one.images, subject.images[:1]) and torch.equal(one.held_out, subject.held_out)
    common = D.make_subject(3, cluster="common")
    assert common.train_share > subject.train_share
    with pytest.raises(ValueError, match="n_images"):
        D.make_subject(3, n_images=6)
    with pytest.raises(ValueError, match="cluster"):
        D.make_subject(3, cluster="biggest")
    with pytest.raises(ValueError, match="label"):
        D.make_subject(12)


def test_embedding_mode_moves_only_the_identifier_row(subject):
    torch.manual_seed(0)
    base = t2i.TextToImage().eval()
    model, history = D.finetune(base, subject, mode="embedding", steps=3, lr=0.1, n_prior=4, n_eval=4, eval_every=3,
                                prior_weight=0.0, progress=False)  # fmt: skip
    changed = {
        n for (n, a), (_, b) in zip(model.named_parameters(), base.named_parameters(), strict=True) if not torch.equal(a, b)
    }
    assert changed == {"text.token.weight"}
    rows = (model.text.token.weight - base.text.token.weight).abs().sum(1)
    assert torch.nonzero(rows).flatten().tolist() == [t2i.TOKEN_ID["sks"]]
    assert [r["step"] for r in history] == [0, 3]


def test_check_B6_dreambooth_mode_moves_every_part_and_keeps_the_base(subject):
    torch.manual_seed(0)
    base = t2i.TextToImage().eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model, history = D.finetune(base, subject, steps=2, n_prior=4, n_eval=4, eval_every=2, progress=False)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # a copy is fine-tuned
    assert not torch.equal(model.text.token.weight, base.text.token.weight)
    assert not torch.equal(model.unet.conv_out.weight, base.unet.conv_out.weight)
    assert {"subject_fidelity", "clip_i", "div", "pres", "class_div", "class_accuracy", "prompt_fidelity"} <= set(history[0])
    with pytest.raises(ValueError, match="prior_weight"):
        D.finetune(base, subject, prior_weight=-1.0)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        D.finetune(base, subject, identifier="dog")
    with pytest.raises(ValueError, match="mode"):
        D.trainable_parameters(base, "lora")


def test_unseen_pool_is_the_held_out_subject_and_the_other_unseen_threes(subject):
    from dlearn import datasets

    pool, member = D.unseen_pool(subject)
    n_unseen = sum(int((datasets.digits(s, form="unit")[1] == 3).sum()) for s in ("val", "test"))
    assert len(pool) == n_unseen - len(subject.images) and int(member.sum()) == len(subject.held_out)
    key = lambda x: sorted(map(tuple, x.flatten(1).tolist()))  # noqa: E731
    assert key(pool[member]) == key(subject.held_out)


def test_separation_auc_against_sklearn_and_hanley_mcneil(gen):
    from sklearn.metrics import roc_auc_score

    a, b = torch.randn(12, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen, dtype=torch.float64) - 0.5
    b[3] = a[0]  # one tie
    auc, se = D.separation_auc(a, b)
    assert auc == pytest.approx(roc_auc_score([1] * 12 + [0] * 30, torch.cat([a, b]).numpy()), abs=1e-12)
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    assert se**2 == pytest.approx((auc * (1 - auc) + 11 * (q1 - auc**2) + 29 * (q2 - auc**2)) / (12 * 30), rel=1e-12)
    assert D.separation_auc(a.exp(), b.exp()) == (auc, se)  # scale-free: an increasing transform changes nothing
    assert D.separation_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == (1.0, 0.0)
    assert D.separation_auc(torch.zeros(3), torch.zeros(4))[0] == 0.5
    with pytest.raises(ValueError, match="non-empty 1-d"):
        D.separation_auc(torch.zeros(3), torch.zeros(0))


def test_nearest_distance():
    ref = torch.zeros(2, 1, 8, 8)
    ref[1] = 1.0
    samples = torch.full((3, 1, 8, 8), 0.25)
    torch.testing.assert_close(D.nearest_distance(samples, ref), torch.full((3,), 2.0, dtype=torch.float64))


def test_check_B6_the_shipped_model_moved_the_text_encoder(subject):
    """B6: DreamBooth fine-tunes every layer, the text encoder included. (B13 and B14 are illustrations in the
    notebook: the toy's only context words are the subject's own attributes, so they cannot be tested here.)"""
    from dlearn import zoo

    base, db = zoo.load("text2image"), zoo.load("dreambooth")
    assert not torch.equal(db.text.token.weight, base.text.token.weight)
    assert not torch.equal(db.text.transformer.layers[0].linear1.weight, base.text.transformer.layers[0].linear1.weight)
    moved = [n for (n, p), q in zip(db.unet.named_parameters(), base.unet.parameters(), strict=True) if not torch.equal(p, q)]
    assert len(moved) > len(list(base.unet.parameters())) // 2


def _own_eps_loss(model, x0, prompt, g):
    """The eps-loss written out here, not with dreambooth.diffusion_loss or text2image.noised: t ~ U{0..T-1}, then
    eps ~ N(0, I), both from `g`, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
    t = torch.randint(0, len(model.alpha_bar), (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = model.alpha_bar[t].reshape(-1, 1, 1, 1)
    return ((model(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, t2i.tokenize([prompt] * len(x0))) - eps) ** 2).mean()


@torch.no_grad()
def test_check_B2_prior_preservation_loss_is_instance_plus_lambda_prior(gen):
    """Paper eq. 2: the objective is the instance loss plus lambda times the prior loss, on the same draws; so it is
    linear in lambda, and lambda = 0 leaves the instance loss alone. The two losses are recomputed here."""
    torch.manual_seed(0)
    model = t2i.TextToImage().eval()
    inst, prior = torch.rand(5, 1, 8, 8, generator=gen) * 2 - 1, torch.rand(7, 1, 8, 8, generator=gen) * 2 - 1
    args = (model, inst, "a sks three", prior, "a three")

    def total(w, seed=3):
        return D.prior_preservation_loss(*args, w, 4, torch.Generator().manual_seed(seed))

    g = torch.Generator().manual_seed(3)
    inst_loss = _own_eps_loss(model, inst[torch.randint(5, (4,), generator=g)], "a sks three", g)
    prior_loss = _own_eps_loss(model, prior[torch.randint(7, (4,), generator=g)], "a three", g)
    assert prior_loss > 0.1 and inst_loss > 0.1  # an untrained model: both terms count
    for w in (0.0, 0.3, 1.0, 2.5):
        torch.testing.assert_close(total(w), inst_loss + w * prior_loss, rtol=1e-5, atol=0)
    l0, l1 = total(0.0), total(1.0)
    assert torch.equal(l0, total(0))  # an int weight is the same number
    torch.testing.assert_close(total(0.7) - l0, 0.7 * (l1 - l0), rtol=1e-4, atol=0)  # linear in lambda
    torch.testing.assert_close(l0, inst_loss, rtol=1e-5, atol=0)
    # without prior samples: the instance loss, and only the instance batch's draws are taken from the generator
    g_none = torch.Generator().manual_seed(3)
    torch.testing.assert_close(D.prior_preservation_loss(model, inst, "a sks three", None, "a three", 1.0, 4, g_none),
                               inst_loss, rtol=1e-5, atol=0)  # fmt: skip
    g_own = torch.Generator().manual_seed(3)
    _own_eps_loss(model, inst[torch.randint(5, (4,), generator=g_own)], "a sks three", g_own)
    assert torch.equal(torch.rand(3, generator=g_none), torch.rand(3, generator=g_own))


def test_finetune_trains_on_its_prior_weight(subject, monkeypatch):
    """The training loop hands `prior_weight` (and the prior samples) to the objective at every step."""
    seen = []
    real = D.prior_preservation_loss

    def spy(model, instance_x, instance_prompt, prior_x, prior_prompt, prior_weight, batch_size, gen):
        seen.append((prior_weight, prior_x is None, instance_prompt, prior_prompt))
        return real(model, instance_x, instance_prompt, prior_x, prior_prompt, prior_weight, batch_size, gen)

    monkeypatch.setattr(D, "prior_preservation_loss", spy)
    torch.manual_seed(0)
    base = t2i.TextToImage().eval()
    for w in (0.25, 0.0):
        seen.clear()
        D.finetune(base, subject, prior_weight=w, steps=2, n_prior=3, n_eval=2, eval_every=2, batch_size=2, progress=False)
        assert seen == [(w, w == 0, "a sks three", "a three")] * 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -1e-9, "1.0", None])
def test_prior_weight_must_be_a_finite_number_at_least_zero(subject, bad):
    torch.manual_seed(0)
    base = t2i.TextToImage().eval()
    with pytest.raises(ValueError, match="prior_weight must be a finite number >= 0"):  # a short run, if it ran
        D.finetune(base, subject, prior_weight=bad, steps=1, n_prior=2, n_eval=2, eval_every=1, batch_size=2, progress=False)
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="prior_weight"):
        D.prior_preservation_loss(base, x, "a sks three", x, "a three", bad, 2, torch.Generator().manual_seed(0))
    assert D.check_prior_weight(0) == 0.0 and D.check_prior_weight(2) == 2.0
