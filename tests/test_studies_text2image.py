"""Chapter 07's protocol metrics (the recipe's few-step run and the shipped model's re-measurement are in test_zoo.py)."""

import torch

from dlearn import datasets
from dlearn import text2image as t2i
from dlearn.studies import text2image as text2image_study


def test_protocol_metrics_at_every_guidance_scale_and_quick_metrics_is_the_w2_part(monkeypatch):
    """With a stand-in generator that answers each prompt with a real validation digit of the prompted class."""
    x, y = datasets.digits("val", form="unit")
    calls = []

    def fake_generate(model, prompts, guidance_scale, steps, seed):
        calls.append((len(prompts), guidance_scale, steps, seed))
        digits = torch.tensor([t2i.parse_prompt(p)[0] for p in prompts])
        return torch.stack([x[y == c][i % int((y == c).sum())] for i, c in enumerate(digits.tolist())])

    monkeypatch.setattr(text2image_study, "generate", fake_generate)
    full = text2image_study.protocol_metrics(None)
    assert calls == [(960, w, 50, 0) for w in text2image_study.GUIDANCE_SCALES]
    measures = ("class_accuracy", "attribute_accuracy", "fd", "memorisation")
    assert set(full) == {f"{k}_w{w:g}" for k in measures for w in text2image_study.GUIDANCE_SCALES}
    assert full["class_accuracy_w1"] > 0.95
    quick = text2image_study.quick_metrics(None)
    assert quick == {k: v for k, v in full.items() if k.endswith("_w2")}

