"""Chapter 09: DreamBooth (Ruiz et al. 2023) on the book's tiny text-to-image model.

Fine-tune the whole model (text encoder and U-Net) on 3-5 images of one *subject* with the prompt
"a [V] [class noun]", where [V] is a rare identifier, and keep the class prior alive with the autogenous,
class-specific prior-preservation loss (paper eq. 2):

    E[ w_t ||x_hat(a_t x + s_t eps, c) - x||^2 + lambda w_t' ||x_hat(a_t' x_pr + s_t' eps', c_pr) - x_pr||^2 ]

where x_pr are samples of the *frozen* model for the class prompt c_pr = "a [class noun]". We train in the
eps form (`eps_from_x0_weight` converts the paper's x-hat weights).

The toy (TB6): a subject is one k-means cluster (in the digits classifier's feature space) of one digit class,
taken from the validation and test splits, which the base never saw; the identifier is one of the vocabulary's
spare words ("sks", ...). Measures (the papers' DINO / CLIP-I / CLIP-T, PRES and DIV, by analogy):

- subject fidelity: mean cosine similarity of classifier features between samples and held-out subject images;
- prompt fidelity: the classifier's probability of the prompted class;
- PRES (language drift): subject fidelity of samples of the *class* prompt, which should stay low;
- DIV: mean pairwise feature distance (1 - cosine) between samples of the subject prompt.

The zoo's recipe (`train_dreambooth`), what a fine-tuned model is measured on (`final_metrics`) and the chapter's
study runs are in `dlearn.studies.dreambooth`.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dlearn import datasets, metrics
from dlearn.text2image import DIGIT_WORDS, SPARE_WORDS, TOKEN_ID, VOCAB, TextToImage, generate, noised, tokenize
from dlearn.train import show_progress

IDENTIFIER = "sks"

# --------------------------------------------------------------------------------------------
# Prompts (B3) and the loss weights (B2)
# --------------------------------------------------------------------------------------------


def subject_prompt(identifier: str | None = IDENTIFIER, class_word: str | None = "three", context: tuple[str, ...] = ()) -> str:
    """ "a [identifier] [context words] [class noun]", e.g. "a sks thick three"; `None` leaves a part out."""
    words = ["a", *([identifier] if identifier else []), *context, *([class_word] if class_word else [])]
    unknown = [w for w in words if w not in VOCAB]
    if unknown:
        raise ValueError(f"unknown word(s) {unknown}; the vocabulary is: {' '.join(VOCAB[2:])}")
    if len(words) == 1:
        raise ValueError("a prompt needs an identifier or a class noun")
    return " ".join(words)


def eps_from_x0_weight(alpha_bar: torch.Tensor) -> torch.Tensor:
    """The factor turning the paper's x-hat loss into the eps loss: ||x_hat - x||^2 = (s^2 / a^2) ||eps_hat - eps||^2
    with a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar), since x_hat = (z - s eps_hat) / a (chapter 04, D25)."""
    return (1 - alpha_bar) / alpha_bar


# --------------------------------------------------------------------------------------------
# Subjects: one style of one digit class, unseen by the base
# --------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """A toy subject: `images` (the 3-5 the model is fine-tuned on), `held_out` (more images of the same subject,
    for measuring), both in [-1, 1], shape (N, 1, 8, 8); its digit class; its cluster's share of the training
    split of that class (how common the style is in the base's data)."""

    label: int
    images: torch.Tensor
    held_out: torch.Tensor
    cluster: int
    train_share: float

    @property
    def class_word(self) -> str:
        return DIGIT_WORDS[self.label]


def style_clusters(label: int, k: int = 6, seed: int = 0, classifier=None):
    """k-means (scikit-learn) of one class's training digits in the classifier's feature space.

    Returns:
        the fitted `KMeans`, the training images of the class (N, 1, 8, 8) and their cluster ids (N,).
    """
    from sklearn.cluster import KMeans

    if label not in range(10):
        raise ValueError(f"label must be a digit 0..9, got {label!r}")
    clf = metrics.shipped_classifier() if classifier is None else classifier
    x, y = datasets.digits("train", form="unit")
    x = x[y == label]
    km = KMeans(k, n_init=10, random_state=seed).fit(metrics.features(clf, x).double().numpy())
    return km, x, torch.as_tensor(km.labels_)


def make_subject(label: int = 3, n_images: int = 5, cluster: str | int = "distinctive", k: int = 6, seed: int = 0,
                 classifier=None) -> Subject:  # fmt: skip
    """A subject from the validation and test digits of class `label` that fall in one style cluster.

    Args:
        cluster: an id, or "distinctive" (the cluster whose centre is farthest from the class's mean training
            feature, among those
            with at least `n_images` + 8 unseen members), or "common" / "rare" (the largest / smallest share of
            the class's training digits, same condition).
        n_images: how many go into `images` (the ones nearest the cluster centre). `held_out` is the rest beyond
            the fifth, whatever `n_images`, so that runs with 1..5 images are measured on the same images.
    """
    if not 1 <= n_images <= 5:
        raise ValueError(f"n_images must be 1..5 (DreamBooth uses 3-5), got {n_images}")
    clf = metrics.shipped_classifier() if classifier is None else classifier
    km, _, train_ids = style_clusters(label, k, seed, clf)
    xs, ys = zip(*(datasets.digits(s, form="unit") for s in ("val", "test")), strict=True)
    x = torch.cat(xs)[torch.cat(ys) == label]
    feats = metrics.features(clf, x).double().numpy()
    ids = torch.as_tensor(km.predict(feats))
    share = torch.bincount(train_ids, minlength=k).double() / len(train_ids)
    ok = [c for c in range(k) if int((ids == c).sum()) >= n_images + 8]
    if isinstance(cluster, str):
        if cluster not in ("distinctive", "common", "rare"):
            raise ValueError(f"cluster must be an id or 'distinctive', 'common', 'rare'; got {cluster!r}")
        if not ok:
            raise ValueError(f"no cluster of class {label} has {n_images + 8} unseen members; use a smaller k")
        centre = (km.cluster_centers_ * share.numpy()[:, None]).sum(0)  # the class's mean training feature
        key = {"distinctive": lambda c: -np.linalg.norm(km.cluster_centers_[c] - centre),
               "common": lambda c: -share[c].item(), "rare": lambda c: share[c].item()}[cluster]  # fmt: skip
        cluster = min(ok, key=key)
    elif cluster not in ok:
        raise ValueError(f"cluster {cluster} of class {label} has too few unseen members; usable: {ok}")
    members = torch.nonzero(ids == cluster).flatten()
    dist = np.linalg.norm(feats[members.numpy()] - km.cluster_centers_[cluster], axis=1)
    order = members[torch.as_tensor(dist).argsort()]
    return Subject(label, x[order[:n_images]], x[order[5:]], int(cluster), share[cluster].item())


# --------------------------------------------------------------------------------------------
# Measures (B11): subject fidelity, prompt fidelity, PRES, DIV
# --------------------------------------------------------------------------------------------


def _features(x: torch.Tensor, classifier=None) -> torch.Tensor:
    clf = metrics.shipped_classifier() if classifier is None else classifier
    return metrics.features(clf, x.detach().cpu().float()).double()


def class_centre(label: int, classifier=None) -> torch.Tensor:
    """The mean classifier feature of the training digits of class `label` (64,)."""
    x, y = datasets.digits("train", form="unit")
    return _features(x[y == label], classifier).mean(0)


def feature_similarity(a: torch.Tensor, b: torch.Tensor, classifier=None, centre: torch.Tensor | None = None,
                       exclude_diagonal: bool = False) -> float:  # fmt: skip
    """Mean cosine similarity of the classifier's features over all pairs (a_i, b_j).

    Args:
        centre: subtract this feature vector first. Raw features (None) are the CLIP-I analogue: every three looks
            like every other three (about 0.98). Centred on the class mean (`class_centre`) they are the DINO
            analogue: what is left is what sets an image apart *within* its class, the subject's own look.
        exclude_diagonal: skip i == j (for a set against itself).
    """
    for name, t in (("a", a), ("b", b)):
        if t.ndim != 4 or t.shape[1:] != (1, 8, 8):
            raise ValueError(f"{name}: expected images (N, 1, 8, 8) in [-1, 1], got {tuple(t.shape)}")
    fa, fb = _features(a, classifier), _features(b, classifier)
    if centre is not None:
        fa, fb = fa - centre, fb - centre
    sim = nn.functional.normalize(fa, dim=1) @ nn.functional.normalize(fb, dim=1).T
    if exclude_diagonal:
        if sim.shape[0] != sim.shape[1] or sim.shape[0] < 2:
            raise ValueError("exclude_diagonal needs one set of at least two images against itself")
        return ((sim.sum() - sim.diagonal().sum()) / (sim.numel() - sim.shape[0])).item()
    return sim.mean().item()


def subject_fidelity(images: torch.Tensor, subject: Subject, classifier=None, reference: str = "held_out") -> float:
    """DINO analogue: class-centred feature cosine between `images` and the subject's held-out images (or its
    training `images`, `reference="images"`)."""
    ref = {"held_out": subject.held_out, "images": subject.images}[reference]
    return feature_similarity(images, ref, classifier, centre=class_centre(subject.label, classifier))


def diversity(images: torch.Tensor, classifier=None, centre: torch.Tensor | None = None) -> float:
    """DIV analogue: mean pairwise feature distance 1 - cosine over distinct pairs (0 = all alike)."""
    return 1.0 - feature_similarity(images, images, classifier, centre, exclude_diagonal=True)


def unseen_pool(subject: Subject, k: int = 6, seed: int = 0, classifier=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation and test digits of the subject's class except its training `images`, and whether each lies in
    the subject's style cluster (`make_subject`'s k-means; pass the same `k` and `seed`).

    Returns:
        images (N, 1, 8, 8) in [-1, 1] and a bool mask (N,): True for the subject's other images (its `held_out`).
    """
    clf = metrics.shipped_classifier() if classifier is None else classifier
    km, _, _ = style_clusters(subject.label, k, seed, clf)
    xs, ys = zip(*(datasets.digits(s, form="unit") for s in ("val", "test")), strict=True)
    x = torch.cat(xs)[torch.cat(ys) == subject.label]
    training = (x.flatten(1)[:, None] == subject.images.flatten(1)[None]).all(2).any(1)
    x = x[~training]
    member = torch.as_tensor(km.predict(metrics.features(clf, x).double().numpy())) == subject.cluster
    return x, member


def separation_auc(inside: torch.Tensor, outside: torch.Tensor) -> tuple[float, float]:
    """How well a score ranks `inside` above `outside`: the area under the ROC curve, P(score_in > score_out)
    (ties count one half), and its standard error by Hanley & McNeil (1982),

        SE^2 = (A(1 - A) + (n_in - 1)(Q1 - A^2) + (n_out - 1)(Q2 - A^2)) / (n_in n_out),  Q1 = A/(2 - A),  Q2 = 2A^2/(1 + A).

    Scale-free: any increasing transform of the score leaves both unchanged (B11).
    """
    a, b = torch.as_tensor(inside, dtype=torch.float64), torch.as_tensor(outside, dtype=torch.float64)
    if a.ndim != 1 or b.ndim != 1 or len(a) < 1 or len(b) < 1:
        raise ValueError(f"expected two non-empty 1-d score vectors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    diff = a[:, None] - b[None]
    auc = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean().item()
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (len(a) - 1) * (q1 - auc**2) + (len(b) - 1) * (q2 - auc**2)) / (len(a) * len(b))
    return auc, math.sqrt(max(var, 0.0))


def prompt_fidelity(images: torch.Tensor, label: int, classifier=None) -> float:
    """CLIP-T analogue: the classifier's mean probability of the prompted class."""
    clf = metrics.shipped_classifier() if classifier is None else classifier
    return metrics.predict(clf, images.detach().cpu().float())[:, label].mean().item()


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------


def prior_samples(base: TextToImage, class_word: str, n: int = 100, guidance_scale: float = 2.0, steps: int = 20,
                  seed: int = 0) -> torch.Tensor:  # fmt: skip
    """The autogenous class prior: `n` samples of the frozen base for "a [class noun]"."""
    return generate(base, [f"a {class_word}"] * n, guidance_scale, steps=steps, seed=seed)


def diffusion_loss(model: TextToImage, x0: torch.Tensor, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
    """The eps-loss of `model` on images `x0` with their prompts, noise and time steps from `gen`."""
    ids = tokenize(prompts).to(x0.device)
    x_t, t, eps = noised(x0, model.alpha_bar, gen)
    return ((model(x_t, t, ids) - eps) ** 2).mean()


def check_prior_weight(prior_weight: float) -> float:
    """lambda of the prior-preservation loss: a finite number >= 0 (NaN and inf are refused, not trained on)."""
    if not isinstance(prior_weight, numbers.Real) or not math.isfinite(prior_weight) or prior_weight < 0:
        raise ValueError(f"prior_weight must be a finite number >= 0, got {prior_weight!r}")
    return float(prior_weight)


def prior_preservation_loss(model: TextToImage, instance_x: torch.Tensor, instance_prompt: str,
                            prior_x: torch.Tensor | None, prior_prompt: str, prior_weight: float, batch_size: int,
                            gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """One step's DreamBooth objective (paper eq. 2, eps form): the instance loss plus lambda times the prior loss,

        diffusion_loss(instance batch, "a [V] [class noun]") + prior_weight * diffusion_loss(prior batch, "a [class noun]").

    From `gen`, in this order: `batch_size` indices into the subject images `instance_x` (with replacement), the
    instance batch's time steps and noise, then (if `prior_x`, the pool of prior samples, is given) `batch_size`
    indices into `prior_x` and the prior batch's time steps and noise. `prior_x` None is the loss without prior
    preservation (the instance loss alone, nothing more drawn).
    """
    prior_weight = check_prior_weight(prior_weight)
    idx = torch.randint(len(instance_x), (batch_size,), generator=gen)
    loss = diffusion_loss(model, instance_x[idx], [instance_prompt] * batch_size, gen)
    if prior_x is not None:
        jdx = torch.randint(len(prior_x), (batch_size,), generator=gen)
        loss = loss + prior_weight * diffusion_loss(model, prior_x[jdx], [prior_prompt] * batch_size, gen)
    return loss


MODES = ("dreambooth", "embedding")


def trainable_parameters(model: TextToImage, mode: str, identifier: str = IDENTIFIER) -> list[nn.Parameter]:
    """ "dreambooth": every weight; "embedding": only the identifier's row of the token table (the Textual
    Inversion analogue; a gradient hook zeroes every other row)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model.requires_grad_(mode == "dreambooth")
    if mode == "dreambooth":
        return list(model.parameters())
    table = model.text.token.weight
    table.requires_grad_(True)
    row = torch.zeros(table.shape[0], 1)
    row[TOKEN_ID[identifier]] = 1.0
    table.register_hook(lambda g: g * row.to(g.device))
    return [table]


def finetune(base: TextToImage, subject: Subject, identifier: str = IDENTIFIER, class_word: str | None = "",
             prior_weight: float = 1.0, mode: str = "dreambooth", steps: int = 400, lr: float = 2e-4,
             n_prior: int = 100, batch_size: int = 8, eval_every: int = 100, n_eval: int = 48, seed: int = 0,
             progress: bool | None = None):  # fmt: skip
    """DreamBooth on a copy of `base`: every step, `batch_size` subject images (drawn with replacement) with the
    prompt "a [identifier] [class noun]" and, if `prior_weight` > 0, as many prior samples with "a [class noun]".

    Args:
        class_word: the class noun in the prompt; "" (default) means the subject's own, `None` leaves it out.
        mode: "dreambooth" (every weight) or "embedding" (only the identifier's embedding, Textual Inversion).
        eval_every: measure every this many steps (and at step 0): subject fidelity and DIV of `n_eval` samples of
            the subject prompt, PRES and class accuracy of `n_eval` samples of the class prompt (w = 2, DDIM-20).

    Returns:
        the fine-tuned model (eval mode) and its history (list of dicts).
    """
    from tqdm.auto import tqdm

    prior_weight = check_prior_weight(prior_weight)
    if identifier not in VOCAB:
        raise ValueError(f"identifier {identifier!r} is not in the vocabulary; spare words: {SPARE_WORDS}")
    noun = subject.class_word if class_word == "" else class_word
    prompt = subject_prompt(identifier, noun)
    class_prompt = f"a {subject.class_word}"
    clf = metrics.shipped_classifier()
    base = base.eval().requires_grad_(False)
    prior = prior_samples(base, subject.class_word, n_prior, seed=seed + 1000) if prior_weight > 0 else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = copy.deepcopy(base)
    params = trainable_parameters(model, mode, identifier)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history = []

    centre = class_centre(subject.label, clf)

    def measure(step):
        ours = generate(model, [prompt] * n_eval, 2.0, steps=20, seed=seed + 7)
        cls = generate(model, [class_prompt] * n_eval, 2.0, steps=20, seed=seed + 7)
        history.append({
            "step": step,
            "subject_fidelity": feature_similarity(ours, subject.held_out, clf, centre),
            "clip_i": feature_similarity(ours, subject.held_out, clf),
            "div": diversity(ours, clf, centre),
            "prompt_fidelity": prompt_fidelity(ours, subject.label, clf),
            "nn_gap": (nearest_distance(ours, subject.images) - nearest_distance(ours, subject.held_out)).mean().item(),
            "pres": feature_similarity(cls, subject.images, clf, centre),
            "class_div": diversity(cls, clf, centre),
            "class_accuracy": metrics.accuracy(metrics.predict(clf, cls), torch.full((n_eval,), subject.label)),
        })  # fmt: skip

    measure(0)
    model.train()
    for step in tqdm(range(1, steps + 1), disable=not show_progress(progress), leave=False, desc="dreambooth"):
        loss = prior_preservation_loss(model, subject.images, prompt, prior, class_prompt, prior_weight, batch_size, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % eval_every == 0 or step == steps:
            model.eval()
            measure(step)
            model.train()
    return model.eval().requires_grad_(False), history


def nearest_distance(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Pixel-space L2 distance of each sample to its nearest reference image, shape (N,)."""
    return torch.cdist(samples.reshape(len(samples), -1).double(), reference.reshape(len(reference), -1).double()).min(1).values
