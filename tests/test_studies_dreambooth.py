"""Chapter 09's study (python -m dlearn.studies.dreambooth study): its command line, and B1, the shipped study's
step-0 fidelity against the subject's own images measured here. The claims the chapter makes from the shipped
study's numbers alone are checked in tests/test_records.py."""

import pytest

from dlearn import dreambooth as D
from dlearn.studies import dreambooth as dreambooth_study


@pytest.fixture(scope="module")
def subject():
    return D.make_subject(**dreambooth_study.MAIN_SUBJECT)


def test_unknown_study_job_and_cli(capsys):
    with pytest.raises(ValueError, match="no study job"):
        dreambooth_study.run_study_job("nope")
    with pytest.raises(SystemExit):
        dreambooth_study.main(["--help"])
    assert "python -m dlearn.studies.dreambooth" in capsys.readouterr().out
    assert dreambooth_study.STUDY_PATH.name == "dreambooth_study.json" and dreambooth_study.STUDY_PATH.exists()


# --------------------------------------------------------------------------------------------
# The shipped study against a live measurement (the record-only claims: tests/test_records.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study():
    return dreambooth_study.load_study()


def test_check_B1_base_cannot_draw_the_subject(study, subject):
    start = study["ppl_seed0"]["history"][0]  # step 0: the base itself
    mutual = D.feature_similarity(subject.held_out, subject.held_out, centre=D.class_centre(3), exclude_diagonal=True)
    assert start["subject_fidelity"] < mutual - 0.5


def test_arm_seeds_names_three_seeds_of_every_arm():
    arms = ("ppl", "noppl", "embedding", "identifier_seven", "noun_wrong", "noun_none", "common_subject",
            *(f"n_images{k}" for k in range(1, 5)))  # fmt: skip
    named = [job for arm in arms for job in dreambooth_study.arm_seeds(arm)]
    assert sorted(named) == sorted(dreambooth_study.STUDY_JOBS)  # every job in exactly one arm
    for arm in arms:
        seeds = [dreambooth_study.STUDY_JOBS[job].get("seed", 0) for job in dreambooth_study.arm_seeds(arm)]
        assert seeds == [0, 1, 2]
        jobs = [dreambooth_study.STUDY_JOBS[job] for job in dreambooth_study.arm_seeds(arm)]
        rest = [{k: v for k, v in cfg.items() if k != "seed"} for cfg in jobs]
        assert rest[0] == rest[1] == rest[2]  # one setting per arm
    with pytest.raises(ValueError, match="no study arm"):
        dreambooth_study.arm_seeds("nope")
