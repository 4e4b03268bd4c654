"""Chapter 11's trained tiny Stable Diffusion (`dlearn.studies.sd`): the recipe writes a folder that `sd.load_pipeline`
loads like a real checkpoint, the shipped folder is what the recipe builds, and what its metrics file records holds
(the full re-measurement is marked `registry`)."""

import json
import math

import pytest
import torch

from dlearn import datasets, metrics, sd
from dlearn.studies import sd as sd_study
from dlearn.text2image import DIGIT_WORDS, evaluation_prompts

torch.set_num_threads(1)
sd.quiet()


@pytest.fixture(scope="module")
def shipped():
    return sd.load_pipeline(sd_study.TINY_SD, device="cpu"), sd_study.read_metrics(sd_study.TINY_SD)


def _architecture(config) -> dict:
    """A diffusers config without its bookkeeping keys (and the VAE's fitted scaling factor), JSON-normalised."""
    keep = {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "scaling_factor"}
    return json.loads(json.dumps(keep))


def test_rgb16_round_trip_and_captions():
    x, y = datasets.digits("val", form="unit")
    images, labels, captions = sd_study.digits_rgb("val")
    assert images.shape == (len(y), 3, 16, 16) and torch.equal(labels, y) and len(captions) == len(y)
    assert torch.equal(images[:, 0], images[:, 2]) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(sd_study.to_digits(images), x)  # 2x2 means of repeated pixels give the pixels back
    assert all(c.split()[-1] == DIGIT_WORDS[int(k)] for c, k in zip(captions, labels, strict=True))
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        sd_study.to_rgb16(images)


def test_recipe_writes_a_folder_that_load_pipeline_loads(tmp_path):
    """A few steps of each stage into a tmp folder: it loads like a real checkpoint and draws a 16x16 image."""
    recipe = sd_study.Recipe(vae_steps=3, unet_steps=3, eval_every=3, val_samples=4, sample_steps=2)
    record = sd_study.train_tiny_sd(tmp_path, seed=0, recipe=recipe, evaluate=False, progress=False)
    assert set(record["train_seconds"]) == {"vae", "denoiser"}
    assert json.loads((tmp_path / sd_study.METRICS_FILE).read_text())["settings"]["unet_steps"] == 3
    pipe = sd.load_pipeline(tmp_path, device="cpu")
    assert list((tmp_path / "unet").glob("*.safetensors")) and not list(tmp_path.rglob("*.bin"))
    image = pipe("a thick three", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and bool(torch.isfinite(image).all())
    # SD's rule, recomputed on the saved VAE: scaling_factor = 1 / std of posterior samples of the training latents
    scale = sd_study.latent_scale(pipe.vae, sd_study.digits_rgb("train")[0], seed=0)
    assert math.isclose(pipe.vae.config.scaling_factor, scale, rel_tol=1e-5)


def test_recipe_is_seeded(tmp_path):
    """The same seed gives bit-identical weights on CPU; another seed other weights."""
    from safetensors.torch import load_file

    recipe = sd_study.Recipe(vae_steps=2, unet_steps=2, eval_every=2, val_samples=2, sample_steps=2)
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        sd_study.train_tiny_sd(tmp_path / name, seed=seed, recipe=recipe, evaluate=False, progress=False)
        runs.append({part: load_file(tmp_path / name / part / "diffusion_pytorch_model.safetensors") for part in ("vae", "unet")})
    for part in ("vae", "unet"):
        assert all(torch.equal(runs[0][part][k], runs[1][part][k]) for k in runs[0][part]), part
        assert not all(torch.equal(runs[0][part][k], runs[2][part][k]) for k in runs[0][part]), part


def test_shipped_folder_is_what_the_recipe_builds(shipped):
    pipe, record = shipped
    fresh = sd_study.build_components(sd_study.Recipe(**record["settings"]), seed=record["seed"])
    for name in ("vae", "unet"):
        assert _architecture(getattr(pipe, name).config) == _architecture(fresh[name].config), name
    assert _architecture(pipe.scheduler.config) == _architecture(fresh["scheduler"].config)
    assert {k: pipe.scheduler.config[k] for k in sd_study.scheduler_config()} == sd_study.scheduler_config()
    got, want = pipe.text_encoder.config.to_dict(), fresh["text_encoder"].config.to_dict()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "projection_dim"):  # fmt: skip
        assert got[key] == want[key], key
    ids = pipe.tokenizer(list(sd_study.WORDS)).input_ids
    assert ids == fresh["tokenizer"](list(sd_study.WORDS)).input_ids and all(len(i) == 3 for i in ids)  # bos, word, eos
    assert pipe.tokenizer.model_max_length == 77 and pipe.vae_scale_factor == 2
    assert pipe.vae.config.scaling_factor == pytest.approx(record["metrics"]["scaling_factor"], rel=1e-7)
    assert sd_study.parameter_counts(pipe) == record["metrics"]["parameters"]
    for name in ("vae", "text_encoder", "unet"):
        assert not getattr(pipe, name).training


def test_trained_pipeline_beats_chance_and_the_vae_beats_the_mean_image(shipped):
    """Live: 80 samples (every evaluation prompt once, a sampling seed the record did not use) at the recorded guidance
    scale. The threshold is the recorded class accuracy p less 3 binomial SEs at n = 80 and 3 seed SEs; the binomial SE
    uses Laplace's (80 p + 1) / 82 so that a recorded 100% still allows a few errors. The threshold must itself clear
    chance (0.1) by 3 binomial SEs. The VAE's test reconstruction must be 10x better than the mean image's."""
    pipe, record = shipped
    rec = record["metrics"]
    prompts, classes, _ = evaluation_prompts(1)
    n = len(prompts)
    p = rec["class_accuracy"]
    smoothed = (n * p + 1) / (n + 2)
    threshold = p - 3 * math.sqrt(smoothed * (1 - smoothed) / n) - 3 * rec.get("class_accuracy_se", 0.0)
    assert threshold > 0.1 + 3 * math.sqrt(0.1 * 0.9 / n), f"recorded accuracy {p:.3f} is too close to chance"
    images = sd_study.sample(pipe, prompts, rec["guidance_scale"], rec["sample_steps"], seed=max(rec["seeds"]) + 1)
    acc = metrics.accuracy(metrics.predict(metrics.shipped_classifier(), sd_study.to_digits(images)), classes)
    assert acc >= threshold, f"class accuracy {acc:.3f} < {threshold:.3f}"
    vae = sd_study.vae_metrics(pipe)
    assert vae["vae_mse_16"] < 0.1 * vae["mean_image_mse_16"]
    assert vae["vae_mse_16"] == pytest.approx(rec["vae_mse_16"], rel=sd_study.TOLERANCES["vae_mse"])


def test_compare_flags_what_moved():
    rec = {
        "vae_mse_16": 0.01,
        "vae_mse_8": 0.005,
        "class_accuracy": 0.9,
        "fd": 10.0,
        "per_seed": [{"class_accuracy": 0.9, "fd": 10.0}],
    }
    assert sd_study.compare(rec, dict(rec)) == [] and sd_study.compare(rec, {**rec, "fd": 11.0}) == []  # 10% < 15%
    moved = {**rec, "class_accuracy": 0.8, "fd": 20.0}
    problems = sd_study.compare(rec, moved)
    assert [p.split(":")[0] for p in problems] == ["class_accuracy", "fd"]
    one_seed = {**moved, "per_seed": [{"class_accuracy": 0.9, "fd": 10.0}]}  # seed 0 agrees with its record
    assert sd_study.compare(rec, one_seed, seed_index=0) == []


@pytest.mark.registry
def test_shipped_metrics_reproduce():
    """Re-measures the shipped folder's metrics (one sampling seed) within `TOLERANCES`."""
    assert sd_study.check(sd_study.TINY_SD, quick=True) == []
