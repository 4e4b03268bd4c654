"""Exercises with checks: a registry of the chapters' exercises and `check`, which grades an answer.

Each exercise has a key ("01.2": chapter 01, exercise 2), a title, a difficulty (1 easy to 3 hard), a kind
("derivation", "implementation" or "experiment"), the minutes it is expected to take, what it practises, the
question, and a check. A student writes the answer in the chapter's notebook, starting from the stub

    answer = exercises.STUB                      # a number, or
    def answer(...): raise NotImplementedError   # a function

and calls `exercises.check("01.2", answer)`, which prints and returns a `Result`:

- "not attempted" for the stub (`STUB`, `NotImplemented`, or a function that raises NotImplementedError);
- "not yet right" for a wrong answer, naming the property that failed and the input it failed on, without
  printing the expected value;
- "correct" for a right one.

Derivations are answered by a number or a small function that the check compares with an oracle (a closed
form from the chapter's module, `torch.distributions`, or Gauss-Hermite quadrature, which is exact for the
polynomials used here); implementations by a function run on several inputs against the chapter's
reference; experiments by a small measured number that the check recomputes exactly and compares within a
tolerance stated in the question. Every check runs in well under a second on one CPU thread.
`instructor_table()` lists the exercises for a course. Reference solutions are in
`dlearn.exercise_solutions`, apart from the chapters.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from dlearn import distributions, elbo, hvae, toys

KINDS = ("derivation", "implementation", "experiment")
STATUSES = ("not attempted", "not yet right", "correct")


class _Stub:
    """The placeholder answer of a notebook's exercise cell."""

    def __repr__(self) -> str:
        return "exercises.STUB"


STUB = _Stub()


class Wrong(Exception):
    """Raised by a check: `prop` is the property the answer fails, `on` the input it fails on, `hint` a nudge."""

    def __init__(self, prop: str, on: str, hint: str = ""):
        super().__init__(prop)
        self.prop, self.on, self.hint = prop, on, hint


@dataclass(frozen=True)
class Exercise:
    """One exercise of the registry; `checker(answer)` returns None for a right answer or raises `Wrong`."""

    key: str
    title: str
    difficulty: int
    kind: str
    minutes: int
    practises: str
    question: str
    answer_type: str  # "number" or "function"
    checker: object

    def __post_init__(self):
        if self.kind not in KINDS or self.difficulty not in (1, 2, 3) or self.answer_type not in ("number", "function"):
            raise ValueError(f"exercise {self.key}: bad kind {self.kind!r}, difficulty {self.difficulty} or answer type")

    @property
    def chapter(self) -> str:
        return self.key.split(".")[0]


@dataclass(frozen=True)
class Result:
    """What `check` found: the key, a status from `STATUSES`, and a message for the student."""

    key: str
    status: str
    message: str

    @property
    def passed(self) -> bool:
        return self.status == "correct"

    def __str__(self) -> str:
        return f"[{self.key}] {self.status}: {self.message}"


REGISTRY: dict[str, Exercise] = {}


def _register(key, title, difficulty, kind, minutes, practises, question, answer_type):
    """Decorator: add the decorated check function to `REGISTRY` under `key`."""

    def wrap(checker):
        REGISTRY[key] = Exercise(key, title, difficulty, kind, minutes, practises, question, answer_type, checker)
        return checker

    return wrap


# --------------------------------------------------------------------------------------------
# helpers of the checks
# --------------------------------------------------------------------------------------------


def _number(answer, on: str) -> float:
    """The answer as a float, or `Wrong` if it is not one finite real number."""
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        raise Wrong("the answer is a number", on, f"got {type(answer).__name__}; assign a float")
    if not math.isfinite(answer):
        raise Wrong("the answer is a finite number", on, f"got {answer}")
    return float(answer)


def _close_number(got: float, want: float, tol: float, prop: str, on: str, hint: str = "", tol_text: str = "") -> None:
    """`Wrong` unless |got - want| <= tol; the message says which way it is off, never by how much.

    A tolerance relative to the answer is named by `tol_text` ("10%"): printing its value would give the answer away.
    """
    if abs(got - want) > tol:
        side = "too large" if got > want else "too small"
        raise Wrong(f"{prop} (your value is {side}, beyond the tolerance {tol_text or format(tol, 'g')})", on, hint)


def _run(fn, on: str, *args, **kwargs):
    """Call the student's function; NotImplementedError passes through, any other error becomes `Wrong`."""
    if not callable(fn):
        raise Wrong("the answer is a function", on, f"got {type(fn).__name__}")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise
    except Exception as err:  # the student's code failed: say how, on what
        raise Wrong("the function runs without an error", on, f"it raised {type(err).__name__}: {err}") from None


def _close_tensor(got, want: torch.Tensor, prop: str, on: str, hint: str = "", rtol=1e-5, atol=1e-6) -> None:
    """`Wrong` unless `got` is a tensor of want's shape, finite, and allclose to it."""
    if not isinstance(got, torch.Tensor):
        raise Wrong("the function returns a tensor", on, f"got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        raise Wrong(f"the output has shape {tuple(want.shape)}", on, f"got {tuple(got.shape)}")
    if not torch.isfinite(got).all():
        raise Wrong("the output is finite", on, "compute in a numerically stable way" if not hint else hint)
    if not torch.allclose(got.double(), want.double(), rtol=rtol, atol=atol):
        raise Wrong(prop, on, hint)


def _gauss_hermite(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of E_{eps ~ N(0, 1)}[g(eps)] = sum_i w_i g(x_i), exact for polynomials of degree < 2n."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / w.sum()


def check(key: str, answer, quiet: bool = False) -> Result:
    """Grade `answer` to exercise `key`; print the result (unless quiet) and return it as a `Result`."""
    if key not in REGISTRY:
        raise ValueError(f"no exercise {key!r}; known keys: {sorted(REGISTRY)}")
    ex = REGISTRY[key]
    if answer is STUB or answer is NotImplemented:
        result = Result(key, "not attempted", "replace the stub with your answer and run the check again")
    else:
        try:
            ex.checker(answer)
            result = Result(key, "correct", f"{ex.title}: every property checked holds")
        except NotImplementedError:
            result = Result(key, "not attempted", "your function still raises NotImplementedError")
        except Wrong as w:
            hint = f" Hint: {w.hint}" if w.hint else ""
            result = Result(key, "not yet right", f"{w.prop} fails on {w.on}.{hint}")
    if not quiet:
        print(result)
    return result


def exercises(chapter: str | None = None) -> list[Exercise]:
    """The registered exercises in key order, all or one chapter's ("01")."""
    return [REGISTRY[k] for k in sorted(REGISTRY) if chapter is None or REGISTRY[k].chapter == chapter]


def show(key: str) -> str:
    """Print and return an exercise's question with its title, kind, difficulty and expected minutes."""
    if key not in REGISTRY:
        raise ValueError(f"no exercise {key!r}; known keys: {sorted(REGISTRY)}")
    ex = REGISTRY[key]
    text = f"{ex.key} {ex.title} ({ex.kind}, difficulty {ex.difficulty}, about {ex.minutes} min)\n{ex.question}"
    print(text)
    return text


def instructor_table(chapter: str | None = None) -> str:
    """A markdown table of the exercises: key, title, kind, difficulty, minutes, what it practises."""
    rows = ["| key | title | kind | difficulty | minutes | practises |", "| --- | --- | --- | --- | --- | --- |"]
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731  (a bar inside a cell, as in KL(q || p))
    for ex in exercises(chapter):
        cells = (ex.key, ex.title, ex.kind, ex.difficulty, ex.minutes, ex.practises)
        rows.append("| " + " | ".join(map(cell, cells)) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# chapter 01: the ELBO
# --------------------------------------------------------------------------------------------


@_register(
    "01.1", "A stable log-mean-exp", 1, "implementation", 10, "the log of an average of weights, without overflow",
    "Write log_mean_exp(log_w) returning log((1/K) sum_k exp(log_w[k])) along dim 0 of a (K, B) tensor, shape (B,), "
    "stable for log-weights of size 1000 (the importance-weighted bound averages weights before the log).",
    "function",
)  # fmt: skip
def _check_01_1(fn):
    g = torch.Generator().manual_seed(11)
    cases = [
        ("log-weights of shape (5, 3) drawn from N(0, 1)", torch.randn(5, 3, generator=g, dtype=torch.float64)),
        ("one sample, shape (1, 4) (K = 1)", torch.randn(1, 4, generator=g, dtype=torch.float64)),
        ("log-weights near +1000, shape (8, 2)", 1000 + torch.randn(8, 2, generator=g, dtype=torch.float64)),
        ("log-weights near -1000, shape (8, 2)", -1000 + torch.randn(8, 2, generator=g, dtype=torch.float64)),
    ]
    for on, log_w in cases:
        got = _run(fn, on, log_w.clone())
        hint = "subtract the largest log-weight before exponentiating" if abs(log_w).max() > 100 else "an average divides by K"
        _close_tensor(got, elbo.log_mean_exp(log_w, 0), "log of the average weight", on, hint, rtol=1e-9, atol=1e-9)


def _tb1_gap_case():
    """TB1 at x = b (its bias) with q = p(z) = N(0, I): the setting of exercise 01.2."""
    model = toys.linear_gaussian()
    k = model.latent_dim
    return model, model.bias[None], torch.zeros(1, k, dtype=torch.float64), torch.eye(k, dtype=torch.float64)


@_register(
    "01.2", "The gap at the prior", 2, "derivation", 20, "the identity log p(x) = ELBO + KL(q || p(z | x))",
    "TB1 is toys.linear_gaussian() (d = 5, k = 2, sigma2 = 0.3). Take x = b (its bias) and q(z) = p(z) = N(0, I). "
    "Derive log p(x) - ELBO(q) in closed form (in terms of M = W^T W / sigma2 + I) and give its value in nats, to 1e-6.",
    "number",
)  # fmt: skip
def _check_01_2(answer):
    on = "TB1 at x = b with q = N(0, I)"
    got = _number(answer, on)
    if got < 0:
        raise Wrong("the gap is >= 0 (Jensen's inequality)", on, "log p(x) is never below the ELBO")
    want = elbo.kl_to_posterior(*_tb1_gap_case())[0].item()
    hint = "the gap is KL(q || p(z | x)); at x = b the posterior mean is 0; check the sign of the log-determinant"
    _close_number(got, want, 1e-6, "log p(x) - ELBO(q)", on, hint)


def iwae_experiment_setting():
    """TB1, its point x = the first of `sample(1)` with seed 0, and the poor q of exercise 01.3:
    N(posterior mean + 1, 2 * posterior covariance). Returns (model, x (1, d), q).

    q has batch shape (1,): to draw n independent bounds in one call, give `elbo.iwae_bound` a q whose mean is
    expanded to (n, k) and x expanded to (n, d); with x alone expanded, all n columns would share one set of z."""
    model = toys.linear_gaussian()
    x, _ = model.sample(1, torch.Generator().manual_seed(0))
    mean, cov = model.posterior(x)
    return model, x, torch.distributions.MultivariateNormal(mean + 1.0, 2.0 * cov)


def _iwae_fraction_reference(num_repeats: int = 40_000, seed: int = 0) -> float:
    model, x, q = iwae_experiment_setting()
    g = torch.Generator().manual_seed(seed)
    many = torch.distributions.MultivariateNormal(q.mean.expand(num_repeats, -1), q.covariance_matrix[0])  # one q per draw
    lk = elbo.iwae_bound(model.log_joint, many, x.expand(num_repeats, -1), 10, g).mean().item()
    log_px = model.log_marginal(x)[0].item()
    elbo_q = elbo.elbo_closed_form(model, x, q.mean, q.covariance_matrix[0])[0].item()
    return (lk - elbo_q) / (log_px - elbo_q)


@_register(
    "01.3", "How much does K = 10 buy?", 2, "experiment", 20, "the importance-weighted bound and its expectation",
    "In exercises.iwae_experiment_setting() (TB1, one point x, a poor q), estimate the expected importance-weighted "
    "bound L_10 (elbo.iwae_bound with K = 10, averaged over at least 10,000 independent draws) and report the fraction "
    "of the gap between the ELBO and log p(x) that it closes, (L_10 - ELBO) / (log p(x) - ELBO), to within 0.03.",
    "number",
)  # fmt: skip
def _check_01_3(answer):
    on = "the setting of exercises.iwae_experiment_setting(), K = 10"
    got = _number(answer, on)
    if not 0 <= got <= 1:
        raise Wrong("the fraction is in [0, 1] (ELBO <= L_K <= log p(x))", on, "measure L_10 - ELBO over log p(x) - ELBO")
    hint = "use K = 10 samples per bound, average the bound (not the weights) over draws, and divide by the whole gap"
    _close_number(got, _iwae_fraction_reference(), 0.03, "the fraction of the gap closed by L_10", on, hint)


@_register(
    "01.4", "The ELBO of a one-dimensional model", 3, "derivation", 30, "the ELBO's three terms in closed form",
    "For z ~ N(0, 1), x | z ~ N(w z + b, sigma2) and q(z) = N(m, s2), derive the ELBO in closed form and write "
    "elbo_1d(x, m, s2, w, b, sigma2) for float64 tensors of one shape (B,), returning the ELBO per element.",
    "function",
)  # fmt: skip
def _check_01_4(fn):
    g = torch.Generator().manual_seed(14)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    const = lambda v: torch.full((4,), v, dtype=torch.float64)  # noqa: E731
    cases = [
        ("q at the prior (m = 0, s2 = 1), w = 0 (x independent of z)",
         (rand(4), const(0.0), const(1.0), const(0.0), rand(4), const(0.5))),
        ("w = 2, b = 0, a narrow q (s2 = 0.1)", (rand(4), rand(4), const(0.1), const(2.0), const(0.0), const(0.3))),
        ("random w, b, m, s2 and sigma2", (rand(6), rand(6), rand(6).exp(), rand(6), rand(6), rand(6).exp())),
    ]  # fmt: skip
    for on, (x, m, s2, w, b, sigma2) in cases:
        got = _run(fn, on, x.clone(), m.clone(), s2.clone(), w.clone(), b.clone(), sigma2.clone())
        want = torch.stack([
            elbo.elbo_closed_form(toys.LinearGaussianLatent(w[i].reshape(1, 1), b[i].reshape(1), sigma2[i].item()),
                                  x[i].reshape(1, 1), m[i].reshape(1, 1), s2[i].reshape(1, 1))[0]
            for i in range(len(x))
        ])  # fmt: skip
        hint = (
            "with w = 0 the likelihood ignores z: check E_q[log p(z)] and the entropy of q, and their signs"
            if on.startswith("q at the prior")
            else "E_q[(x - w z - b)^2] is not (x - w m - b)^2: q's variance enters through w"
        )
        _close_tensor(got, want, "the ELBO equals E_q[log p(x | z)] + E_q[log p(z)] + H[q]", on, hint, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------------------------
# chapter 02: the VAE
# --------------------------------------------------------------------------------------------


@_register(
    "02.1", "The KL of two Gaussians", 1, "derivation", 15, "the closed-form Gaussian KL of the prior-matching term",
    "Derive KL(N(mu_q, sigma_q^2) || N(mu_p, sigma_p^2)) and write kl_diag(mean_q, logvar_q, mean_p, logvar_p) "
    "returning it element-wise (same shape as the inputs), with log-variances as inputs.",
    "function",
)  # fmt: skip
def _check_02_1(fn):
    g = torch.Generator().manual_seed(21)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    z = torch.zeros(3, dtype=torch.float64)
    cases = [
        ("q = p (both N(0.5, e^0.3))", (z + 0.5, z + 0.3, z + 0.5, z + 0.3)),
        ("p standard normal, q with random mean and log-variance", (rand(3), rand(3), z, z)),
        ("q and p both random, shape (2, 3)", (rand(2, 3), rand(2, 3), rand(2, 3), rand(2, 3))),
    ]
    normal = torch.distributions.Normal
    for on, (mq, lq, mp, lp) in cases:
        got = _run(fn, on, mq.clone(), lq.clone(), mp.clone(), lp.clone())
        want = torch.distributions.kl_divergence(normal(mq, (0.5 * lq).exp()), normal(mp, (0.5 * lp).exp()))
        hint = (
            "the KL of a distribution to itself is 0"
            if on.startswith("q = p")
            else "KL is not symmetric: the expectation is under q"
        )
        _close_tensor(got, want, "the KL equals E_q[log q - log p]", on, hint, rtol=1e-8, atol=1e-10)


def _baseline_variance(b: float, x: np.ndarray, w: np.ndarray) -> float:
    """Variance of the score-function estimator (z^2 - b) eps for z = 1 + eps (f(z) = z^2, mu = sigma = 1)."""
    g = ((1 + x) ** 2 - b) * x
    return float((w * g**2).sum() - (w * g).sum() ** 2)


@_register(
    "02.2", "The best baseline", 2, "derivation", 20, "the score-function estimator and variance reduction",
    "For f(z) = z^2 and z ~ N(mu, sigma^2) with mu = sigma = 1, the score-function estimator with a constant "
    "baseline b is (f(z) - b)(z - mu) / sigma^2. Show that it is unbiased for any b and derive the b that "
    "minimises its variance; give that b to 1e-6.",
    "number",
)  # fmt: skip
def _check_02_2(answer):
    on = "f(z) = z^2, mu = sigma = 1"
    b = _number(answer, on)
    x, w = _gauss_hermite()
    grid = np.linspace(-20, 20, 4001)
    best = grid[np.argmin([_baseline_variance(v, x, w) for v in grid])]
    # the variance is a parabola in b: refine by its vertex from three points around the grid minimum
    v0, v1, v2 = (_baseline_variance(best + d, x, w) for d in (-1.0, 0.0, 1.0))
    vertex = best - (v2 - v0) / (2 * (v2 - 2 * v1 + v0))
    hint = "the variance is E[(f(z) - b)^2 eps^2] - (E f'(z))^2, a parabola in b: set its derivative to zero"
    _close_number(b, vertex, 1e-6, "your baseline gives the least variance", on, hint)


@_register(
    "02.3", "The VAE's negative ELBO", 2, "implementation", 25, "reparameterisation, the Gaussian KL and the VAE loss",
    "Write neg_elbo(x_levels, mean, logvar, eps, decode): draw z by reparameterisation from the encoder's mean and "
    "log-variance (B, k) with the noise eps (B, k), score the grey levels x_levels (B, 1, 8, 8) under the "
    "categorical decode(z) -> logits (B, 17, 1, 8, 8), and return -ELBO per image (B,) in nats.",
    "function",
)  # fmt: skip
def _check_02_3(fn):
    g = torch.Generator().manual_seed(23)
    weight = torch.randn(4, 17 * 64, generator=g) * 0.5
    decode = lambda z: (z @ weight).reshape(-1, 17, 1, 8, 8)  # noqa: E731
    x = torch.randint(0, 17, (3, 1, 8, 8), generator=g)
    rand, zeros = (lambda: torch.randn(3, 4, generator=g)), torch.zeros(3, 4)
    cases = [
        ("an encoder at the prior (mean 0, logvar 0) and eps = 0", zeros, zeros, zeros),
        ("random mean, logvar 0, random eps", rand(), zeros, rand()),
        ("random mean, logvar and eps", rand(), rand(), rand()),
    ]  # fmt: skip
    hints = (
        "with q = p(z) the KL is 0: -ELBO is the reconstruction NLL summed over all 64 pixels",
        "-ELBO = KL(q || p) + (-log p(x | z)): both are costs",
        "z is the mean plus the standard deviation times eps: how does the standard deviation follow from logvar?",
    )
    for (on, mean, logvar, eps), hint in zip(cases, hints, strict=True):
        got = _run(fn, on, x.clone(), mean.clone(), logvar.clone(), eps.clone(), decode)
        z = mean + (0.5 * logvar).exp() * eps
        want = distributions.kl_normal_diag(mean, logvar) - distributions.log_categorical_pixels(x, decode(z))
        _close_tensor(got, want, "-ELBO = KL(q(z | x) || N(0, I)) - log p(x | z) per image", on, hint, rtol=1e-4, atol=1e-3)


def score_function_setting() -> tuple[float, float, float]:
    """(mu, sigma, c) of exercise 02.4: f(z) = (z - c)^2 and z ~ N(mu, sigma^2)."""
    return 0.5, 0.5, 2.0


@_register(
    "02.4", "Measure the estimators' variances", 2, "experiment", 20, "why reparameterisation wins",
    "With f(z) = (z - c)^2 and (mu, sigma, c) = exercises.score_function_setting(), draw at least 100,000 "
    "per-sample gradient estimates of d/dmu E[f(z)] with vae.reparam_gradient_samples and "
    "vae.score_function_gradient_samples (no baseline) and report the ratio of their variances, score function "
    "over reparameterisation, to within 10%.",
    "number",
)  # fmt: skip
def _check_02_4(answer):
    on = "f(z) = (z - c)^2 with (mu, sigma, c) = score_function_setting()"
    got = _number(answer, on)
    mu, sigma, c = score_function_setting()
    x, w = _gauss_hermite()
    z = mu + sigma * x
    var = lambda e: float((w * e**2).sum() - (w * e).sum() ** 2)  # noqa: E731
    ratio = var((z - c) ** 2 * x / sigma) / var(2 * (z - c))
    if got < 1:
        raise Wrong("the score-function estimator is the noisier one", on, "divide the score function's variance by the other")
    hint = "a variance, not a standard deviation, of the per-sample estimates (not of their mean)"
    _close_number(got, ratio, 0.1 * ratio, "the ratio of variances", on, hint, tol_text="of 10%")


# --------------------------------------------------------------------------------------------
# chapter 03: hierarchical VAEs
# --------------------------------------------------------------------------------------------


@_register(
    "03.1", "The two-level bound at one draw", 1, "derivation", 15, "the HVAE bound as reconstruction plus a KL per level",
    "For top-down inference, write two_level_neg_elbo(log_lik, m1, lv1, pm1, plv1, m2, lv2): the negative ELBO per "
    "image at one draw, from log p(x | z1, z2) (B,), q(z1 | x, z2) = N(m1, e^lv1), p(z1 | z2) = N(pm1, e^plv1), "
    "q(z2 | x) = N(m2, e^lv2) (each (B, k)) and p(z2) = N(0, I), each level's KL in closed form.",
    "function",
)  # fmt: skip
def _check_03_1(fn):
    g = torch.Generator().manual_seed(31)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    z = torch.zeros(3, 4, dtype=torch.float64)
    cases = [
        ("both posteriors equal to their priors", (rand(3) - 50, z + 0.3, z - 0.2, z + 0.3, z - 0.2, z, z)),
        ("q(z2 | x) at the prior, q(z1 | x, z2) not", (rand(3) - 50, rand(3, 4), rand(3, 4), rand(3, 4), rand(3, 4), z, z)),
        ("every distribution random", (rand(3) - 50, rand(3, 4), rand(3, 4), rand(3, 4), rand(3, 4), rand(3, 4), rand(3, 4))),
    ]  # fmt: skip
    for on, (ll, m1, lv1, pm1, plv1, m2, lv2) in cases:
        got = _run(fn, on, *(t.clone() for t in (ll, m1, lv1, pm1, plv1, m2, lv2)))
        want = distributions.kl_normal_diag(m1, lv1, pm1, plv1) + distributions.kl_normal_diag(m2, lv2) - ll
        hint = "the KL of z1 is to its learned prior p(z1 | z2), not to N(0, I); both KLs are costs added to -log p(x | z)"
        _close_tensor(got, want, "-ELBO = -log p(x | z1, z2) + KL(level 1) + KL(level 2)", on, hint, rtol=1e-8, atol=1e-8)


@_register(
    "03.2", "Warm-up and free bits", 2, "implementation", 20, "the training objective of hvae.training_loss",
    "Write warmup_loss(recon_nll, kl_dims, step, warmup_steps, free_bits): the HVAE's training loss from the "
    "reconstruction costs (B,) and the per-dimension KLs (B, k) of one batch: the mean reconstruction cost plus "
    "kappa * sum_j max(free_bits, mean over the batch of KL_j), with kappa rising linearly to 1 over warmup_steps "
    "(kappa = (step + 1) / warmup_steps until it reaches 1; kappa = 1 when warmup_steps = 0). Return a scalar tensor.",
    "function",
)  # fmt: skip
def _check_03_2(fn):
    g = torch.Generator().manual_seed(32)
    recon = torch.rand(5, generator=g, dtype=torch.float64) * 100
    kl = torch.rand(5, 6, generator=g, dtype=torch.float64) ** 3  # some dimensions near 0, varying across the batch
    cases = [
        ("no warm-up (warmup_steps = 0), no free bits", 0, 0, 0.0),
        ("the first step (step = 0) of a 100-step warm-up", 0, 100, 0.0),
        ("step 49 of a 100-step warm-up", 49, 100, 0.0),
        ("step 500, after a 100-step warm-up", 500, 100, 0.0),
        ("free_bits = 0.1 after warm-up", 500, 100, 0.1),
    ]
    for on, step, warmup, free_bits in cases:
        got = _run(fn, on, recon.clone(), kl.clone(), step, warmup, free_bits)
        kappa = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        want = recon.mean() + kappa * kl.mean(0).clamp(min=free_bits).sum()
        hint = (
            "floor each dimension's batch-mean KL, not each image's KL" if free_bits
            else "kappa = (step + 1) / warmup_steps (step counts from 0) multiplies the KL only" if warmup
            else "the weight multiplies the KL only"
        )  # fmt: skip
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.reshape(())
        _close_tensor(got, want, "the loss equals mean NLL + kappa * floored KL", on, hint, rtol=1e-10, atol=1e-10)


def two_level_setting():
    """TB1's two-level model (`toys.two_level_linear_gaussian()`) and its point x = the first of `sample(1)`
    with seed 0, shape (1, d): the setting of exercises 03.3 and 03.4."""
    model = toys.two_level_linear_gaussian()
    x, _, _ = model.sample(1, torch.Generator().manual_seed(0))
    return model, x


def perturbed_encoder(model, x):
    """The wrong Markov encoder of exercise 03.4 (chapter 03's H3): the exact factors with q(z1 | x)'s mean
    shifted by 0.3 and covariance scaled by 1.7, q(z2 | z1)'s gain scaled by 0.8, offset shifted by 0.2 and
    covariance scaled by 0.6. Returns (q1, q2) as `hvae.markov_elbo_monte_carlo` takes them."""
    (m1, c1), (a, c, c2) = hvae.markov_posterior_factors(model, x)
    return (m1 + 0.3, 1.7 * c1), (0.8 * a, c + 0.2, 0.6 * c2)


@_register(
    "03.3", "A top level that ignores its input", 3, "derivation", 30, "the HVAE bound's gap as a KL between chains",
    "In exercises.two_level_setting(), use the Markov encoder whose first factor is exact, q(z1 | x) = p(z1 | x), "
    "and whose second ignores z1, q(z2 | z1) = N(0, I). Derive the gap log p(x) - bound as an expected KL "
    "(chain rule of the KL) and give its value in nats, to 1e-6.",
    "number",
)  # fmt: skip
def _check_03_3(answer):
    on = "two_level_setting() with q(z1 | x) exact and q(z2 | z1) = N(0, I)"
    got = _number(answer, on)
    if got < 0:
        raise Wrong("the gap is >= 0", on, "the bound never exceeds log p(x)")
    model, x = two_level_setting()
    k2, k1, _ = model.dims
    q1, _ = hvae.markov_posterior_factors(model, x)
    q2 = (torch.zeros(k2, k1, dtype=torch.float64), torch.zeros(k2, dtype=torch.float64), torch.eye(k2, dtype=torch.float64))
    want = (model.log_marginal(x) - hvae.markov_elbo_closed_form(model, x, q1, q2))[0].item()
    hint = "the gap is E_{q(z1|x)}[KL(N(0, I) || p(z2 | z1))]: its mean term depends on z1, so average it over q(z1 | x)"
    _close_number(got, want, 1e-6, "log p(x) - bound", on, hint)


@_register(
    "03.4", "Measure a wrong encoder's gap", 2, "experiment", 15, "estimating the HVAE bound by Monte Carlo",
    "In exercises.two_level_setting(), estimate the bound of the encoder exercises.perturbed_encoder(model, x) with "
    "hvae.markov_elbo_monte_carlo and at least 100,000 draws, and report log p(x) minus it, in nats, to within 0.05.",
    "number",
)  # fmt: skip
def _check_03_4(answer):
    on = "two_level_setting() with perturbed_encoder(model, x)"
    got = _number(answer, on)
    if got < 0:
        raise Wrong("the gap is >= 0", on, "subtract the bound from log p(x)")
    model, x = two_level_setting()
    want = (model.log_marginal(x) - hvae.markov_elbo_closed_form(model, x, *perturbed_encoder(model, x)))[0].item()
    _close_number(got, want, 0.05, "log p(x) - bound", on, "use enough draws; the estimate's standard error is printed too")
