"""Chapter 09's recipe, measurements and study: `train_dreambooth` fine-tunes the shipped "text2image" base on the
chapter's main subject (`MAIN_SUBJECT`) into the shipped "dreambooth" model; `final_metrics` is everything the chapter
measures on a fine-tuned model (`protocol_metrics` records it for the main subject); `STUDY_JOBS` are the chapter's
runs, shipped in dlearn/weights/dreambooth_study.json (`load_study`).

    python -m dlearn.zoo train dreambooth                  # runs `train_dreambooth`, records `protocol_metrics`
    python -m dlearn.studies.dreambooth study [JOB ...]    # reruns the study (all jobs by default)
"""

from __future__ import annotations

import time

import torch

from dlearn import datasets, metrics, results, shipped
from dlearn.dreambooth import (
    IDENTIFIER,
    Subject,
    class_centre,
    diversity,
    feature_similarity,
    finetune,
    make_subject,
    nearest_distance,
    prompt_fidelity,
    subject_prompt,
)
from dlearn.studies import text2image as text2image_study
from dlearn.text2image import DIGIT_WORDS, TextToImage, generate
from dlearn.train import TrainResult

MAIN_SUBJECT = {"label": 3, "cluster": "distinctive", "n_images": 5}
DEFAULT_LR = {"dreambooth": 2e-4, "embedding": 5e-2}


@torch.no_grad()
def final_metrics(model: TextToImage, subject: Subject, identifier: str = IDENTIFIER, class_word: str | None = "",
                  n: int = 64, seed: int = 11, classifier=None) -> dict[str, float]:  # fmt: skip
    """Everything chapter 09 measures on a fine-tuned model (w = 2, DDIM-20):

    - of `n` samples of the subject prompt: subject fidelity (DINO analogue), CLIP-I analogue, prompt fidelity
      (CLIP-T analogue), DIV, and the nearest-neighbour gap (pixel distance to the nearest of the subject's training
      images minus to the nearest held-out one; negative = closer to the training images, B15);
    - of `n` samples of the class prompt: PRES, their diversity and class accuracy (language drift, B7);
    - of 32 samples of each *other* class's prompt: their FD to the test digits of those classes (B10);
    - when the identifier is a digit word (B4): the class accuracy of samples of "a [that word]".
    """
    clf = metrics.shipped_classifier() if classifier is None else classifier
    noun = subject.class_word if class_word == "" else class_word
    centre = class_centre(subject.label, clf)
    ours = generate(model, [subject_prompt(identifier, noun)] * n, 2.0, steps=20, seed=seed)
    cls = generate(model, [f"a {subject.class_word}"] * n, 2.0, steps=20, seed=seed)
    others = [c for c in range(10) if c != subject.label]
    other_imgs = generate(model, [f"a {DIGIT_WORDS[c]}" for c in others for _ in range(32)], 2.0, steps=20, seed=seed)
    x_test, y_test = datasets.digits("test", form="unit")
    keep = y_test != subject.label
    out = {
        "subject_fidelity": feature_similarity(ours, subject.held_out, clf, centre),
        "clip_i": feature_similarity(ours, subject.held_out, clf),
        "prompt_fidelity": prompt_fidelity(ours, subject.label, clf),
        "div": diversity(ours, clf, centre),
        "nn_gap": (nearest_distance(ours, subject.images) - nearest_distance(ours, subject.held_out)).mean().item(),
        "pres": feature_similarity(cls, subject.images, clf, centre),
        "class_div": diversity(cls, clf, centre),
        "class_accuracy": metrics.accuracy(metrics.predict(clf, cls), torch.full((n,), subject.label)),
        "other_classes_fd": metrics.frechet_distance(metrics.features(clf, other_imgs), metrics.features(clf, x_test[keep])),
    }  # fmt: skip
    if identifier in DIGIT_WORDS:
        word = generate(model, [f"a {identifier}"] * n, 2.0, steps=20, seed=seed)
        target = torch.full((n,), DIGIT_WORDS.index(identifier))
        out["identifier_class_accuracy"] = metrics.accuracy(metrics.predict(clf, word), target)
    return out


def train_dreambooth(seed: int = 0, max_steps: int = 300, prior_weight: float = 1.0, mode: str = "dreambooth",
                     identifier: str = IDENTIFIER, class_word: str | None = "", label: int = 3,
                     cluster: str | int = "distinctive", n_images: int = 5, lr: float | None = None,
                     eval_every: int = 50, base: TextToImage | None = None, progress: bool | None = None):  # fmt: skip
    """The zoo's recipe: `finetune` on `make_subject(label, n_images, cluster)` from the shipped `text2image` base.

    Returns:
        the model and a `TrainResult` whose history is `finetune`'s (no checkpoint selection: the last weights).
    """
    start = time.perf_counter()
    base = text2image_study.shipped_base() if base is None else base
    subject = make_subject(label, n_images, cluster)
    model, history = finetune(base, subject, identifier, class_word, prior_weight, mode, max_steps,
                              DEFAULT_LR[mode] if lr is None else lr, eval_every=eval_every, seed=seed,
                              progress=progress)  # fmt: skip
    return model, TrainResult(max_steps, None, None, False, time.perf_counter() - start, history)


def protocol_metrics(model: TextToImage) -> dict[str, float]:
    """`final_metrics` of a model fine-tuned on the chapter's main subject with "a sks three"."""
    return final_metrics(model, make_subject(**MAIN_SUBJECT))


STUDY_PATH = shipped.WEIGHTS_DIR / "dreambooth_study.json"
STUDY_JOBS = {
    **{f"ppl_seed{s}": {"seed": s} for s in range(3)},
    **{f"noppl_seed{s}": {"seed": s, "prior_weight": 0.0} for s in range(3)},
    **{f"embedding_seed{s}": {"seed": s, "mode": "embedding", "prior_weight": 0.0} for s in range(3)},
    "identifier_seven": {"identifier": "seven"},
    "noun_wrong": {"class_word": "seven", "prior_weight": 0.0},
    "noun_none": {"class_word": None, "prior_weight": 0.0},
    **{f"n_images{k}": {"n_images": k} for k in range(1, 5)},
    "common_subject": {"cluster": "common"},
    # the same single-setting arms at training seeds 1 and 2 (seed 0 keeps its name above)
    **{f"identifier_seven_seed{s}": {"seed": s, "identifier": "seven"} for s in (1, 2)},
    **{f"noun_wrong_seed{s}": {"seed": s, "class_word": "seven", "prior_weight": 0.0} for s in (1, 2)},
    **{f"noun_none_seed{s}": {"seed": s, "class_word": None, "prior_weight": 0.0} for s in (1, 2)},
    **{f"n_images{k}_seed{s}": {"seed": s, "n_images": k} for k in range(1, 5) for s in (1, 2)},
    **{f"common_subject_seed{s}": {"seed": s, "cluster": "common"} for s in (1, 2)},
}  # fmt: skip
"""Chapter 09's runs (300 steps each, `train_dreambooth` defaults otherwise), every arm over training seeds 0, 1, 2:
prior preservation on and off and the embedding-only (Textual Inversion) analogue (B7-B9, B12); an existing word as
identifier (B4); wrong and no class noun, both without prior preservation, against `noppl_seed*` (B5); 1-4 subject
images against `ppl_seed*`'s 5 (B17); a subject from the class's most common style cluster (B16). The seed-0 runs
of the single-setting arms keep their first names (`identifier_seven`, ..., `common_subject`); `arm_seeds` lists
an arm's three job names."""

ARM_SEED0 = {"identifier_seven", "noun_wrong", "noun_none", "common_subject", *(f"n_images{k}" for k in range(1, 5))}


def arm_seeds(arm: str) -> list[str]:
    """The study's job names of one arm at training seeds 0, 1, 2 (e.g. "ppl" or "noun_wrong")."""
    if arm in ARM_SEED0:
        names = [arm, f"{arm}_seed1", f"{arm}_seed2"]
    else:
        names = [f"{arm}_seed{s}" for s in range(3)]
    missing = [n for n in names if n not in STUDY_JOBS]
    if missing:
        raise ValueError(
            f"no study arm {arm!r} (jobs {missing} unknown); arms: ppl, noppl, embedding, {', '.join(sorted(ARM_SEED0))}"
        )
    return names


def run_study_job(name: str, base: TextToImage | None = None, steps: int = 300) -> dict:
    """One run of the study: its config, learning curve, final metrics and seconds."""
    if name not in STUDY_JOBS:
        raise ValueError(f"no study job {name!r}; known: {sorted(STUDY_JOBS)}")
    base = text2image_study.shipped_base() if base is None else base
    start = time.perf_counter()
    cfg = {"seed": 0, **STUDY_JOBS[name]}
    model, result = train_dreambooth(max_steps=steps, base=base, progress=False, **cfg)
    subject = make_subject(cfg.get("label", 3), cfg.get("n_images", 5), cfg.get("cluster", "distinctive"))
    final = final_metrics(model, subject, cfg.get("identifier", IDENTIFIER), cfg.get("class_word", ""))
    return {"config": cfg, "history": result.history, "final": final, "seconds": round(time.perf_counter() - start, 1)}


def load_study(path=None) -> dict:
    """The shipped study results ({job: result}); `python -m dlearn.studies.dreambooth study` recreates them."""
    return results.load_study(STUDY_PATH if path is None else path, "python -m dlearn.studies.dreambooth study")


def main(argv: list[str] | None = None) -> None:
    results.study_cli(argv, "python -m dlearn.studies.dreambooth", "chapter 09's study", STUDY_JOBS, run_study_job, STUDY_PATH)


if __name__ == "__main__":
    main()
