"""The exercises' checks: every reference solution passes, every stub is "not attempted", and plausible wrong
answers (a sign error, a missing term, an off-by-one) fail with a message that names the failed property and
does not print the solution, so no check can pass everything."""

import math
import re

import pytest
import torch

from dlearn import exercise_solutions as sol
from dlearn import exercises
from dlearn.distributions import kl_normal_diag, log_categorical_pixels

KEYS = sorted(exercises.REGISTRY)


def _stub_function(*args, **kwargs):
    raise NotImplementedError


# ---- plausible wrong answers, each with a word of the property its check should name ----


def _tb1_m():
    model = exercises.toys.linear_gaussian()
    k = model.latent_dim
    return model.weight.T @ model.weight / model.sigma2 + torch.eye(k, dtype=torch.float64), k


def _gap_logdet_sign():  # 01.2: + log det M instead of - log det M
    m, k = _tb1_m()
    return 0.5 * (torch.trace(m) - k + torch.logdet(m)).item()


def _elbo_1d_no_variance_term(x, m, s2, w, b, sigma2):  # 01.4: forgets w^2 s2 in E_q[log p(x | z)]
    return sol.elbo_1d(x, m, s2, w, b, sigma2) + w**2 * s2 / (2 * sigma2)


def _elbo_1d_entropy_sign(x, m, s2, w, b, sigma2):  # 01.4: subtracts the entropy of q
    return sol.elbo_1d(x, m, s2, w, b, sigma2) - torch.log(2 * math.pi * math.e * s2)


def _neg_elbo_std_as_var(x, mean, logvar, eps, decode):  # 02.3: z = mean + var * eps
    z = mean + logvar.exp() * eps
    return kl_normal_diag(mean, logvar) - log_categorical_pixels(x, decode(z))


def _neg_elbo_kl_sign(x, mean, logvar, eps, decode):  # 02.3: -ELBO with the KL subtracted
    return -kl_normal_diag(mean, logvar) - log_categorical_pixels(x, decode(mean + (0.5 * logvar).exp() * eps))


def _two_level_standard_prior(ll, m1, lv1, pm1, plv1, m2, lv2):  # 03.1: KL of z1 to N(0, I), not p(z1 | z2)
    return sol.two_level_neg_elbo(ll, m1, lv1, 0 * pm1, 0 * plv1, m2, lv2)


def _two_level_no_kl2(ll, m1, lv1, pm1, plv1, m2, lv2):  # 03.1: forgets the top level's KL
    return kl_normal_diag(m1, lv1, pm1, plv1) - ll


def _warmup_off_by_one(recon, kl, step, warmup, free_bits):  # 03.2: kappa = step / warmup
    kappa = min(1.0, step / warmup) if warmup > 0 else 1.0
    return recon.mean() + kappa * kl.mean(0).clamp(min=free_bits).sum()


def _warmup_free_bits_per_image(recon, kl, step, warmup, free_bits):  # 03.2: floors each image's KL
    kappa = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return recon.mean() + kappa * kl.clamp(min=free_bits).mean(0).sum()


def _warmup_weights_everything(recon, kl, step, warmup, free_bits):  # 03.2: kappa on the whole loss
    kappa = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return kappa * (recon.mean() + kl.mean(0).clamp(min=free_bits).sum())


def _ignored_gap_without_trace():  # 03.3: plugs in the mean of z1 instead of averaging over q(z1 | x)
    model, x = exercises.two_level_setting()
    (m1, _), (gain, offset, c2) = exercises.hvae.markov_posterior_factors(model, x)
    prec, mean = torch.linalg.inv(c2), m1[0] @ gain.T + offset
    return 0.5 * (torch.trace(prec) - c2.shape[0] + torch.logdet(c2) + mean @ prec @ mean).item()


WRONG = {
    "01.1": [
        ("no division by K", lambda: lambda lw: torch.logsumexp(lw, 0), "log of the average weight"),
        ("exponentiates without shifting", lambda: lambda lw: torch.log(torch.exp(lw).mean(0)), "finite"),
    ],
    "01.2": [
        ("sign of the log-determinant", _gap_logdet_sign, "log p(x) - ELBO(q)"),
        ("ELBO - log p(x), a negative gap", lambda: -sol.gap_at_the_prior(), "gap is >= 0"),
    ],
    "01.3": [
        ("the part of the gap left open", lambda: 1 - sol.iwae_fraction(), "fraction of the gap"),
        ("a fraction in percent", lambda: 100 * sol.iwae_fraction(), "in [0, 1]"),
    ],
    "01.4": [
        ("missing w^2 s2", lambda: _elbo_1d_no_variance_term, "the ELBO equals"),
        ("entropy sign", lambda: _elbo_1d_entropy_sign, "the ELBO equals"),
    ],
    "02.1": [
        ("KL(p || q)", lambda: lambda mq, lq, mp, lp: sol.kl_diag(mp, lp, mq, lq), "E_q[log q - log p]"),
        ("missing the -1", lambda: lambda mq, lq, mp, lp: sol.kl_diag(mq, lq, mp, lp) + 0.5, "E_q[log q - log p]"),
    ],
    "02.2": [("the mean of f as baseline", lambda: 2.0, "least variance")],
    "02.3": [
        ("exp(logvar) as the standard deviation", lambda: _neg_elbo_std_as_var, "-ELBO = KL"),
        ("KL subtracted", lambda: _neg_elbo_kl_sign, "-ELBO = KL"),
    ],
    "02.4": [
        ("the inverse ratio", lambda: 1 / sol.variance_ratio(), "noisier"),
        ("a ratio of standard deviations", lambda: math.sqrt(sol.variance_ratio()), "ratio of variances"),
    ],
    "03.1": [
        ("KL of z1 to N(0, I)", lambda: _two_level_standard_prior, "-ELBO"),
        ("missing the KL of z2", lambda: _two_level_no_kl2, "-ELBO"),
    ],
    "03.2": [
        ("off-by-one warm-up", lambda: _warmup_off_by_one, "loss equals"),
        ("free bits per image", lambda: _warmup_free_bits_per_image, "loss equals"),
        ("warm-up weight on the reconstruction too", lambda: _warmup_weights_everything, "loss equals"),
    ],
    "03.3": [
        ("the mean of z1 plugged in", _ignored_gap_without_trace, "log p(x) - bound"),
        ("the negative gap", lambda: -sol.ignored_input_gap(), "gap is >= 0"),
    ],
    "03.4": [
        ("the bound minus log p(x)", lambda: -sol.perturbed_gap(), "gap is >= 0"),
        ("the gap of the exact encoder", lambda: 0.0, "log p(x) - bound"),
    ],
}


def _leaks(message: str, value: float) -> list[str]:
    """The numbers in a message that are the solution's value up to 1% and a power of ten (55.5 printed as 5.55)."""
    numbers = re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", message)
    return [
        n for n in numbers
        if float(n) > 0 and any(abs(float(n) * 10.0**p - abs(value)) <= 0.01 * abs(value) for p in range(-4, 5))
    ]  # fmt: skip


@pytest.mark.parametrize("key", KEYS)
def test_reference_solution_passes(key):
    result = exercises.check(key, sol.answer(key), quiet=True)
    assert result.passed, str(result)
    assert result.status == "correct"


@pytest.mark.parametrize("key", KEYS)
def test_stub_is_not_attempted(key, capsys):
    stub = exercises.STUB if exercises.REGISTRY[key].answer_type == "number" else _stub_function
    for answer in (stub, NotImplemented):
        result = exercises.check(key, answer)
        assert result.status == "not attempted" and not result.passed
        assert "not attempted" in capsys.readouterr().out  # printed for a notebook


@pytest.mark.parametrize("key", KEYS)
def test_wrong_answers_fail_without_giving_the_solution(key):
    assert WRONG.get(key), f"exercise {key} needs at least one wrong answer in this test"
    solution = sol.answer(key)
    for label, make, prop in WRONG[key]:
        result = exercises.check(key, make(), quiet=True)
        assert result.status == "not yet right", f"{key}: the wrong answer '{label}' passed"
        assert " fails on " in result.message and prop in result.message, f"{key} '{label}': {result.message}"
        if isinstance(solution, float):
            leaked = _leaks(result.message, solution)
            assert not leaked, f"{key} '{label}' prints the solution {leaked}: {result.message}"
        else:
            assert not re.search(r"\d\.\d{3}", result.message), f"{key} '{label}' prints a computed value: {result.message}"


# the least measurement each experiment's question asks for
MINIMUM = {"01.3": {"num_repeats": 10_000}, "02.4": {"num_samples": 100_000}, "03.4": {"num_samples": 100_000}}


def test_every_experiment_states_its_least_measurement():
    assert sorted(MINIMUM) == [k for k in KEYS if exercises.REGISTRY[k].kind == "experiment"]
    for key, size in MINIMUM.items():
        assert f"{next(iter(size.values())):,}" in exercises.REGISTRY[key].question


@pytest.mark.parametrize("key", sorted(MINIMUM))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_experiments_pass_at_the_least_size_and_other_seeds(key, seed):
    """The tolerance of an experiment covers the noise of the smallest measurement its question allows."""
    assert exercises.check(key, sol.SOLUTIONS[key](**MINIMUM[key], seed=seed), quiet=True).passed


def test_each_chapter_has_three_to_five_graded_exercises_of_every_kind():
    chapters = sorted({ex.chapter for ex in exercises.exercises()})
    assert chapters == ["01", "02", "03"]
    for chapter in chapters:
        chapter_exercises = exercises.exercises(chapter)
        assert 3 <= len(chapter_exercises) <= 5, chapter
        assert [ex.key for ex in chapter_exercises] == [f"{chapter}.{i}" for i in range(1, len(chapter_exercises) + 1)]
        assert {ex.kind for ex in chapter_exercises} == set(exercises.KINDS), chapter
        assert len({ex.difficulty for ex in chapter_exercises}) >= 2, f"chapter {chapter}: one difficulty only"


def test_solutions_cover_exactly_the_registry():
    assert sorted(sol.SOLUTIONS) == KEYS
    assert all(f.__doc__ for f in sol.SOLUTIONS.values())


def test_instructor_table_lists_every_exercise():
    table = exercises.instructor_table()
    lines = table.splitlines()
    assert lines[0] == "| key | title | kind | difficulty | minutes | practises |"
    assert len(lines) == 2 + len(KEYS)
    for key, line in zip(KEYS, lines[2:], strict=True):
        ex = exercises.REGISTRY[key]
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert cells == [key, ex.title, ex.kind, str(ex.difficulty), str(ex.minutes), ex.practises]
    assert exercises.show("02.3").startswith("02.3 The VAE's negative ELBO (implementation, difficulty 2")
    assert exercises.instructor_table("02").count("\n| 02.") == len(exercises.exercises("02"))


def test_answers_of_the_wrong_type_or_that_crash_are_explained():
    result = exercises.check("01.2", "0.5", quiet=True)
    assert result.status == "not yet right" and "is a number" in result.message
    result = exercises.check("02.1", 0.5, quiet=True)
    assert result.status == "not yet right" and "is a function" in result.message

    def crashes(mean_q, logvar_q, mean_p, logvar_p):
        raise RuntimeError("shape mismatch")

    result = exercises.check("02.1", crashes, quiet=True)
    assert result.status == "not yet right" and "RuntimeError: shape mismatch" in result.message
    result = exercises.check("02.1", lambda *a: torch.zeros(2), quiet=True)
    assert "shape" in result.message
    with pytest.raises(ValueError, match="no exercise"):
        exercises.check("99.1", 0.0)
    with pytest.raises(ValueError, match="no solution"):
        sol.answer("99.1")
