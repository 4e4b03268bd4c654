"""The claims the book makes about numbers recorded with the shipped weights and study files.

These tests read records: the metadata stored with a weights file (`zoo.info`) and the shipped study JSON files
(`load_study`). They do not re-measure those numbers; the registry does that (`python -m dlearn.zoo check NAME
--full`, and `make registry`), and the studies recreate theirs (`python -m dlearn.studies.controlnet study`,
`python -m dlearn.studies.dreambooth study`). They are data-consistency tests, not unit tests: they fail when a
record no longer supports what the book says about it, not when code is wrong.
"""

import math
import statistics

import pytest
import torch

from dlearn import datasets, distributions, zoo
from dlearn.studies import controlnet as controlnet_study
from dlearn.studies import dreambooth as dreambooth_study


def _mean_se(record: dict, key: str) -> tuple[float, float]:
    """Mean and standard error of one metric over a record's training seeds (SE nan for a single seed)."""
    values = [r["metrics"][key] for r in record["runs"]]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def _diff(a, b):
    """Difference of two arms' means over seeds, and its SE (the notebook's `compare`)."""
    return statistics.mean(a) - statistics.mean(b), math.hypot(
        statistics.stdev(a) / math.sqrt(len(a)), statistics.stdev(b) / math.sqrt(len(b))
    )


# --------------------------------------------------------------------------------------------
# Every record
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(zoo.REGISTRY))
def test_record_seeds_and_spread_agree_with_the_runs(name):
    """What `zoo check NAME` holds every record to without re-measuring: its seeds are the entry's (those a full
    retrain runs), then any added with `zoo train NAME --add-seeds`, increasing; its mean and std are its runs'."""
    assert zoo._check_summary(name, zoo.info(name))


# --------------------------------------------------------------------------------------------
# Chapter 02: the VAE
# --------------------------------------------------------------------------------------------


def test_record_V10_latent_sizes_have_three_seeds_of_one_recipe_and_rank_as_02b_says():
    """Study 02b ranks the latent sizes (vae_z2, vae_z8, vae_z16: the VAE recipe, another architecture than `vae`)
    over three training seeds each, only beyond 2 SE of the difference: the records must hold seeds 0-2 of one
    recipe, with mean and std matching their runs, and the ranking 02b asserts (a larger latent, a lower bound)
    must hold for the records by that rule."""
    infos = {k: zoo.info(f"vae_z{k}") for k in (2, 8, 16)}
    assert all([r["seed"] for r in info["runs"]][:3] == [0, 1, 2] for info in infos.values())  # `--add-seeds` may add more
    assert len({info["recipe"] for info in infos.values()}) == 1
    assert zoo.REGISTRY["vae_z8"].config != zoo.REGISTRY["vae"].config
    stats = {}
    for k, info in infos.items():
        for key in ("neg_elbo", "neg_iwae_1000"):
            values = torch.tensor([r["metrics"][key] for r in info["runs"]], dtype=torch.float64)
            assert torch.isfinite(values).all()
            assert info["mean"][key] == pytest.approx(values.mean().item())
            assert info["std"][key] == pytest.approx(values.std().item(), rel=1e-6)
            stats[k, key] = _mean_se(info, key)
    for small, large in ((2, 8), (8, 16)):
        for key in ("neg_elbo", "neg_iwae_1000"):
            diff = stats[small, key][0] - stats[large, key][0]
            assert diff > 2 * math.hypot(stats[small, key][1], stats[large, key][1]), (small, large, key)


def _seeds(name: str) -> list[int]:
    """The seeds of a record's runs: the entry's seeds (a full retrain's) first, then any added with `add_seeds`."""
    seeds = [r["seed"] for r in zoo.info(name)["runs"]]
    assert seeds[: len(zoo.REGISTRY[name].seeds)] == list(zoo.REGISTRY[name].seeds)
    return seeds


def test_record_the_shipped_vae_has_three_seeds():
    meta = zoo.info("vae")
    assert _seeds("vae")[:3] == [0, 1, 2]  # at least three: `zoo train vae --add-seeds` may add more
    for key in ("neg_elbo", "neg_iwae_1000"):
        values = [r["metrics"][key] for r in meta["runs"]]
        assert meta["mean"][key] == pytest.approx(sum(values) / len(values))
        assert meta["metrics"][key] >= meta["metrics"]["neg_iwae_1000"]  # the IWAE bound is the tighter one


# --------------------------------------------------------------------------------------------
# Chapter 03: the HVAE
# --------------------------------------------------------------------------------------------


def test_record_H6_the_hvae_recipe_beats_the_vae_recipe_which_differs_in_warm_up_too():
    """Chapter 03: the HVAE recipe (KL warm-up) beats the VAE recipe (none) beyond 2 SE over 3 seeds each (H6); because
    the recipes differ in warm-up as well as in the second level, the chapter does not call that depth. On the same
    schedule without warm-up (3 seeds each, independent means) the two-level model and the VAE are within noise (H11).
    (Over at least 3 seeds each: the records may hold seeds added with `zoo train NAME --add-seeds`.)"""
    hvae, vae, cold = zoo.info("hvae"), zoo.info("vae"), zoo.info("hvae_no_warmup")
    assert _seeds("hvae")[:3] == _seeds("vae")[:3] == _seeds("hvae_no_warmup")[:3] == [0, 1, 2]
    assert vae["recipe_kwargs"].get("warmup_steps", 0) == cold["recipe_kwargs"].get("warmup_steps", 0) == 0
    assert hvae["recipe_kwargs"]["warmup_steps"] > 0
    assert hvae["recipe_kwargs"]["max_steps"] == vae["recipe_kwargs"]["max_steps"] == cold["recipe_kwargs"]["max_steps"]
    (h, h_se), (v, v_se), (c, c_se) = (_mean_se(r, "neg_iwae_1000") for r in (hvae, vae, cold))
    assert v - h > 2 * math.hypot(h_se, v_se)
    assert abs(v - c) < 2 * math.hypot(v_se, c_se)


# --------------------------------------------------------------------------------------------
# Chapter 04: the VDM
# --------------------------------------------------------------------------------------------


def test_record_the_shipped_vdm_bound_beats_part_one_and_the_autoregressive_anchor():
    vdm_bound = zoo.info("vdm")["mean"]["neg_elbo"]
    assert vdm_bound < zoo.info("vae")["mean"]["neg_iwae_1000"]  # below the VAE's IWAE bound
    assert vdm_bound < zoo.info("hvae")["mean"]["neg_iwae_1000"]
    # Tomczak's intro_dgm autoregressive model, exact NLL on the same split: one run with no spread, so (as chapter 04b
    # does) its side borrows the VDM's own SD over seeds, added to the VDM's SE; below it beyond 2 SE of that
    runs = torch.tensor([r["metrics"]["neg_elbo"] for r in zoo.info("vdm")["runs"]], dtype=torch.float64)
    sd = runs.std().item()
    assert len(runs) >= 3 and 86.4 - vdm_bound > 2 * math.hypot(sd / math.sqrt(len(runs)), sd)


# --------------------------------------------------------------------------------------------
# Chapter 05: the DDPM on the digits
# --------------------------------------------------------------------------------------------


def test_record_P10_P14_P24_P25_as_study_05b_reads_them():
    """The trained comparisons of study 05b, as recorded with the shipped weights or records (`zoo check NAME --full`
    re-measures them), by 05b's rule: a ranking needs n >= 3 training seeds and a difference beyond 2 SE; a recipe
    with one seed is a record of its weights, not ranked."""
    # P24: ancestral T = 1000 against DDIM-50, paired over the DDPM recipe's training seeds: FD within noise,
    # memorisation higher beyond 2 SE
    runs = zoo.info("ddpm")["runs"]
    assert len(runs) >= 3
    paired = {}
    for key in ("fd", "memorisation"):
        d = torch.tensor([r["metrics"][f"{key}_ancestral"] - r["metrics"][f"{key}_ddim50"] for r in runs], dtype=torch.float64)
        paired[key] = (d.mean().item(), (d.std() / math.sqrt(len(d))).item())
    assert abs(paired["fd"][0]) <= 2 * paired["fd"][1]
    assert paired["memorisation"][0] > 2 * paired["memorisation"][1]
    # P10: L_vlb (one seed) gives a higher FD with both samplers, and a lower bound, than every seed of L_simple
    for key in ("fd_ancestral", "fd_ddim50"):
        assert min(r["metrics"][key] for r in zoo.info("ddpm_vlb")["runs"]) > max(r["metrics"][key] for r in runs)
    assert max(r["metrics"]["neg_elbo"] for r in zoo.info("ddpm_vlb")["runs"]) < min(r["metrics"]["neg_elbo"] for r in runs)
    # P14: x0 against eps prediction over three training seeds each
    for key in ("fd_ancestral", "fd_ddim50"):
        x0, eps = zoo.info("ddpm_x0"), zoo.info("ddpm")
        (mx, sx), (me, se_) = _mean_se(x0, key), _mean_se(eps, key)
        # within noise, as 05b reads it
        assert min(len(x0["runs"]), len(eps["runs"])) >= 3 and abs(mx - me) <= 2 * math.hypot(sx, se_), key
    # P25: the recipe with the best bound (the 17-level denoiser on L_vlb) is not the one with the best samples
    names = ("ddpm", "ddpm_x0", "ddpm_v", "ddpm_vlb", "ddpm_levels", "ddpm_levels_vlb")
    best_bound = min(names, key=lambda n: _mean_se(zoo.info(n), "neg_elbo")[0])
    assert best_bound == "ddpm_levels_vlb"
    assert _mean_se(zoo.info(best_bound), "fd_ddim50")[0] > _mean_se(zoo.info("ddpm"), "fd_ddim50")[0]


def _histogram_bpd():
    """The per-pixel histogram baseline in bits/dim on the test digits (a statistic of the data, no weights; its
    value is checked in tests/test_diffusion.py)."""
    x_train, _ = datasets.digits("train")
    x_test, _ = datasets.digits("test")
    logits = distributions.pixel_histogram_logits(x_train).expand(len(x_test), -1, -1, -1, -1)
    return distributions.nats_to_bits_per_dim(-distributions.log_categorical_pixels(x_test, logits).mean().item(), 64)


def test_record_P12_the_shipped_ddpms_beat_the_uniform_and_histogram_baselines():
    """Recorded bits/dim of the chapter's DDPMs (shipped weights or records) against the uniform (log2 17) and
    per-pixel histogram baselines."""
    hist_bpd = _histogram_bpd()
    bpd = {n: zoo.info(n)["metrics"]["neg_elbo_bpd"] for n in ("ddpm", "ddpm_vlb", "ddpm_levels", "ddpm_levels_vlb")}
    assert all(v < math.log2(17) for v in bpd.values())  # every eps or level model beats uniform
    assert bpd["ddpm_levels_vlb"] < hist_bpd  # the 17-level denoiser trained on the bound beats the histogram


# --------------------------------------------------------------------------------------------
# Chapter 08: ControlNet (the shipped weights' metrics and the shipped study,
# python -m dlearn.studies.controlnet study)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cn_study():
    return controlnet_study.load_study()


def test_record_controlnet_study_has_every_job(cn_study):
    assert set(cn_study) == set(controlnet_study.STUDY_JOBS)


def test_record_C2_full_finetune_overfits_and_forgets(cn_study):
    h = cn_study["finetune_mask_channel"]["history"]
    gap = [r["held_out_loss"] - r["train_pairs_loss"] for r in h]
    assert gap[-1] > gap[0] + 0.002
    assert h[-1]["prompt_only_fd"] > h[0]["prompt_only_fd"]


def test_record_C10_prompt_dropout_controlnet_names_the_digit_from_the_mask(cn_study):
    """With prompt dropout the ControlNet names the digit from the mask alone (3 seeds, mean - 2 SE above 0.8);
    the run without dropout has one seed, so chapter 08b does not rank the two."""
    acc = [cn_study[f"full_zero_seed{s}"]["final"]["class_accuracy_none"] for s in range(3)]
    assert statistics.mean(acc) - 2 * statistics.stdev(acc) / math.sqrt(3) > 0.8


def test_record_C11_learning_curve_of_the_shipped_controlnet():
    """The recorded curve rises well above the base (no claim of suddenness: at this scale the rise starts at once),
    and the prompted samples stay valid digits throughout (class accuracy never below the step-0 base's)."""
    h = zoo.info("controlnet")["history"]
    tr = controlnet_study.transition([r["step"] for r in h], [r["val"] for r in h])
    assert h[0]["step"] == 0 and tr["end"] > tr["start"] + 0.2 and tr["step_10"] <= tr["step_50"] <= tr["step_90"]
    acc = [r["class_accuracy_prompt"] for r in h]
    assert min(acc[1:]) >= acc[0] - 0.02


def test_record_C17_gaussian_init_disturbs_the_base_at_the_start(cn_study):
    """At step 0 the Gaussian-initialised ControlNet raises the loss and wrecks the prompted samples' class; the
    zero-initialised one changes nothing. (That it also *lags* later does not hold at this scale: see chapter 08.)"""
    for s in range(3):
        zero, gauss = cn_study[f"full_zero_seed{s}"]["history"], cn_study[f"full_gaussian_seed{s}"]["history"]
        assert zero[0]["loss"] == zero[0]["base_loss"] and gauss[0]["loss"] > gauss[0]["base_loss"]
        assert gauss[0]["class_accuracy_prompt"] < zero[0]["class_accuracy_prompt"] - 0.2


def test_record_C28_coarse_control_gaussian_start_disturbs_the_base(cn_study):
    """On the coarse layout control (3 seeds each): zero-initialised runs start at the base's loss exactly, Gaussian
    ones above it, and the prompted class accuracy at step 0 is lower for the Gaussian start beyond 2 SE."""
    runs = {k: [cn_study[f"coarse_{k}_seed{s}"]["history"][0] for s in range(3)] for k in ("zero", "gaussian")}
    assert all(h["loss"] == h["base_loss"] for h in runs["zero"])
    assert all(h["loss"] > h["base_loss"] for h in runs["gaussian"])
    d, se = _diff(*[[h["class_accuracy_prompt"] for h in runs[k]] for k in ("zero", "gaussian")])
    assert d > 2 * se


def test_record_C18_lite_is_weaker_without_a_prompt(cn_study):
    """Over 3 training seeds each, the full ControlNet follows the mask better than the lite one without a prompt,
    by more than 2 SE (chapter 08b's C18)."""
    full = [cn_study[f"full_zero_seed{s}"]["final"]["iou_none"] for s in range(3)]
    lite = [cn_study[f"lite_zero_seed{s}"]["final"]["iou_none"] for s in range(3)]
    d, se = _diff(full, lite)
    assert d > 2 * se


def test_record_C19_C21_prompt_settings_on_the_shipped_controlnet():
    """Recorded metrics (the registry stage re-measures the "none" and "perfect" rows, `zoo check --full` all):
    every prompt setting follows the mask far better than the
    base with the perfect prompt; compatible prompt + control gives both class and mask; a conflicting prompt loses
    the prompt's class (the control wins the trade-off)."""
    m = zoo.info("controlnet")["metrics"]
    assert all(m[f"iou_{s}"] > m["base_iou_perfect"] + 0.2 for s in controlnet_study.PROMPT_SETTINGS)
    assert m["class_accuracy_perfect"] > 0.9 and m["iou_perfect"] > 0.8
    assert m["prompt_class_accuracy_conflicting"] < m["class_accuracy_perfect"] - 0.2


def test_record_C20_robust_to_data_size(cn_study):
    """50, 500 and 1000 pairs: no collapse of the base task and the mask followed far better than by the base alone
    in every case. (That IoU *increases* with data does not hold at this scale: see chapter 08.)"""
    base_iou = zoo.info("controlnet")["metrics"]["base_iou_perfect"]
    for k in ("n50_seed0", "n500_seed0", "full_zero_seed0"):
        f = cn_study[k]["final"]
        assert f["class_accuracy_perfect"] >= 0.9 and f["iou_perfect"] > base_iou + 0.2
        assert f["fd_perfect"] < 2 * cn_study["full_zero_seed0"]["final"]["fd_perfect"]


# --------------------------------------------------------------------------------------------
# Chapter 09: DreamBooth (the shipped study, python -m dlearn.studies.dreambooth study)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db_study():
    return dreambooth_study.load_study()


def _mean(study, group, metric):
    return sum(study[f"{group}_seed{s}"]["final"][metric] for s in range(3)) / 3


def test_record_dreambooth_study_has_every_job(db_study):
    assert set(db_study) == set(dreambooth_study.STUDY_JOBS)


def _arm(study, arm, metric, history=None):
    """An arm's metric at training seeds 0, 1, 2: the final value, or the learning curve's entry `history`."""
    runs = [study[job] for job in dreambooth_study.arm_seeds(arm)]
    return [r["final"][metric] if history is None else r["history"][history][metric] for r in runs]


def test_record_B4_a_used_word_as_identifier_damages_its_class(db_study):
    """Fine-tuned with 'seven' as the identifier, 'a seven' is drawn as a seven far less often (3 seeds); the base
    draws sevens (chapter 09 measures it live)."""
    acc = _arm(db_study, "identifier_seven", "identifier_class_accuracy")
    assert statistics.mean(acc) + 2 * statistics.stdev(acc) / math.sqrt(3) < 0.7


def test_record_B5_wrong_class_noun_damages_that_class(db_study):
    wrong, correct = _arm(db_study, "noun_wrong", "other_classes_fd"), _arm(db_study, "noppl", "other_classes_fd")
    d, se = _diff(wrong, correct)
    assert d > 2 * se and statistics.mean(wrong) > 2 * statistics.mean(correct)


def test_record_B7_B9_language_drift_without_prior_preservation(db_study):
    base_pres = db_study["ppl_seed0"]["history"][0]["pres"]
    assert _mean(db_study, "noppl", "pres") > base_pres + 0.3
    assert _mean(db_study, "ppl", "pres") < _mean(db_study, "noppl", "pres") - 0.3
    for s in range(3):  # PRES rises over training without PPL
        h = db_study[f"noppl_seed{s}"]["history"]
        assert h[-1]["pres"] > h[0]["pres"] + 0.3


def test_record_B8_diversity_as_measured(db_study):
    """The toy's direction is the opposite of the paper's: prior preservation *lowers* DIV of the subject prompt."""
    assert _mean(db_study, "ppl", "div") < _mean(db_study, "noppl", "div")


def test_record_B10_prior_preservation_not_seen_to_protect_other_classes(db_study):
    """The other classes' FD with vs without prior preservation (3 seeds each) lie within 2 SE, as chapter 09 reports."""
    d, se = _diff(_arm(db_study, "ppl", "other_classes_fd"), _arm(db_study, "noppl", "other_classes_fd"))
    assert abs(d) <= 2 * se


def test_record_B12_dreambooth_beats_the_embedding_alone(db_study):
    emb = _mean(db_study, "embedding", "subject_fidelity")
    assert min(_mean(db_study, "ppl", "subject_fidelity"), _mean(db_study, "noppl", "subject_fidelity")) > emb + 0.2


def test_record_B15_samples_move_toward_the_training_images(db_study):
    """The nearest-neighbour gap falls below the base's and after step 50 (it does not by itself show copying: the
    five training images are the subject cluster's most central members; chapter 09 prints the references)."""
    base_gap = db_study["ppl_seed0"]["history"][0]["nn_gap"]
    assert _mean(db_study, "ppl", "nn_gap") < base_gap
    curve = [sum(db_study[f"ppl_seed{s}"]["history"][i]["nn_gap"] for s in range(3)) / 3 for i in range(7)]
    assert curve[1] > curve[-1]


def test_record_B16_rare_and_common_subject_end_points_within_noise(db_study):
    """Over 3 seeds the rare and the common subject end at subject fidelities within 2 SE of each other (the rare one's
    larger gain is its lower start)."""
    d, se = _diff(_arm(db_study, "ppl", "subject_fidelity"), _arm(db_study, "common_subject", "subject_fidelity"))
    assert abs(d) <= 2 * se


def test_record_B17_number_of_images(db_study):
    """One subject image collapses the samples: DIV far below five images' (3 seeds each)."""
    one, five = _arm(db_study, "n_images1", "div"), _arm(db_study, "ppl", "div")
    d, se = _diff(five, one)
    assert d > 2 * se and statistics.mean(one) < 0.05
