"""Chapter 09's study: the claims the chapter makes from the shipped study runs
(python -m dlearn.studies.dreambooth study), and the study's command line."""

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
# The shipped study: the claims chapter 09 makes from it
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study():
    return dreambooth_study.load_study()


def _mean(study, group, metric):
    return sum(study[f"{group}_seed{s}"]["final"][metric] for s in range(3)) / 3


def test_study_has_every_job(study):
    assert set(study) == set(dreambooth_study.STUDY_JOBS)


def test_check_B1_base_cannot_draw_the_subject(study, subject):
    start = study["ppl_seed0"]["history"][0]  # step 0: the base itself
    mutual = D.feature_similarity(subject.held_out, subject.held_out, centre=D.class_centre(3), exclude_diagonal=True)
    assert start["subject_fidelity"] < mutual - 0.5


def test_check_B4_a_used_word_as_identifier_damages_its_class(study):
    seven = study["identifier_seven"]["final"]
    assert (
        seven["identifier_class_accuracy"] < 0.6 and study["ppl_seed0"]["final"]["subject_fidelity"] > seven["subject_fidelity"]
    )


def test_check_B5_wrong_class_noun_damages_that_class(study):
    assert study["noun_wrong"]["final"]["other_classes_fd"] > 2 * _mean(study, "noppl", "other_classes_fd")


def test_check_B7_B9_language_drift_without_prior_preservation(study):
    base_pres = study["ppl_seed0"]["history"][0]["pres"]
    assert _mean(study, "noppl", "pres") > base_pres + 0.3
    assert _mean(study, "ppl", "pres") < _mean(study, "noppl", "pres") - 0.3
    for s in range(3):  # PRES rises over training without PPL
        h = study[f"noppl_seed{s}"]["history"]
        assert h[-1]["pres"] > h[0]["pres"] + 0.3


def test_check_B8_diversity_as_measured(study):
    """The toy's direction is the opposite of the paper's: prior preservation *lowers* DIV of the subject prompt."""
    assert _mean(study, "ppl", "div") < _mean(study, "noppl", "div")


def test_check_B10_other_classes_change_little_with_prior_preservation(study):
    base_fd = study["embedding_seed0"]["final"]["other_classes_fd"]  # the embedding-only runs leave the other classes as the base
    assert abs(_mean(study, "ppl", "other_classes_fd") - base_fd) / base_fd < 0.10


def test_check_B12_dreambooth_beats_the_embedding_alone(study):
    emb = _mean(study, "embedding", "subject_fidelity")
    assert min(_mean(study, "ppl", "subject_fidelity"), _mean(study, "noppl", "subject_fidelity")) > emb + 0.2


def test_check_B15_copying_grows_with_steps(study):
    base_gap = study["ppl_seed0"]["history"][0]["nn_gap"]
    assert _mean(study, "ppl", "nn_gap") < base_gap and _mean(study, "noppl", "nn_gap") < _mean(study, "ppl", "nn_gap")
    curve = [sum(study[f"ppl_seed{s}"]["history"][i]["nn_gap"] for s in range(3)) / 3 for i in range(7)]
    assert curve[1] > curve[-1]


def test_check_B16_rare_subject_gains_more(study):
    rare, common = study["ppl_seed0"]["history"], study["common_subject"]["history"]
    assert (
        common[-1]["subject_fidelity"] - common[0]["subject_fidelity"]
        < rare[-1]["subject_fidelity"] - rare[0]["subject_fidelity"]
    )


def test_check_B17_number_of_images(study):
    fid = [study[f"n_images{k}"]["final"]["subject_fidelity"] for k in range(1, 5)] + [
        study["ppl_seed0"]["final"]["subject_fidelity"]
    ]
    assert fid[0] < fid[4] - 0.1 and abs(fid[4] - fid[3]) < 0.05
    assert study["n_images1"]["final"]["div"] < 0.05  # one image: the samples collapse onto it
