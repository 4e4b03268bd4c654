"""The digits of the book's protocol (TB4), their augmentation and stratified labels."""

import math

import numpy as np
import pytest
import torch

from dlearn import datasets


def test_digits_split_is_intro_dgm_and_ordered():
    sizes = {s: len(datasets.digits(s)[0]) for s in ("train", "val", "test", "all")}
    assert sizes == {"train": 1000, "val": 350, "test": 447, "all": 1797}
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x_test, y_test = datasets.digits("test")
    assert torch.equal(x_test[:, 0], torch.as_tensor(bunch.images[1350:], dtype=torch.int64))
    assert torch.equal(y_test, torch.as_tensor(bunch.target[1350:]))


def test_digits_forms():
    levels, labels = datasets.digits("val", "levels")
    unit, _ = datasets.digits("val", "unit")
    assert levels.dtype == torch.int64 and levels.shape == (350, 1, 8, 8) and labels.shape == (350,)
    assert levels.min() == 0 and levels.max() == 16
    assert unit.dtype == torch.float32 and unit.min() == -1 and unit.max() == 1
    torch.testing.assert_close(unit, levels.float() / 8 - 1)
    levels[0] = 99  # callers get fresh tensors
    assert datasets.digits("val")[0].max() == 16


@pytest.mark.parametrize("split,form", [("validation", "levels"), ("train", "float")])
def test_digits_bad_arguments(split, form):
    with pytest.raises(ValueError, match="must be one of"):
        datasets.digits(split, form)


def _transform_by_hand(img, dx, dy, flip, transpose, fill):
    """The oracle for one image: numpy, one step at a time, written independently of augment_digits."""
    a = img[0].double().numpy()
    if flip:
        a = a[:, ::-1]
    if transpose:
        a = a.T
    out = np.full((8, 8), float(fill))
    for i in range(8):
        for j in range(8):
            if 0 <= i - dy < 8 and 0 <= j - dx < 8:
                out[i, j] = a[i - dy, j - dx]
    return out


@pytest.mark.parametrize("form", ["levels", "unit"])
def test_augment_digits_does_what_its_labels_say(form, gen):
    x, _ = datasets.digits("val", form=form)
    out, labels = datasets.augment_digits(x, 1.0, gen)
    assert out.dtype == x.dtype and out.shape == x.shape and labels.shape == (len(x), 4)
    fill = -1.0 if form == "unit" else 0
    for img, new, (dx, dy, flip, transpose) in zip(x, out, labels.tolist(), strict=True):
        np.testing.assert_array_equal(new[0].double().numpy(), _transform_by_hand(img, int(dx), int(dy), flip, transpose, fill))
    # every transform occurs: 9 shifts x 4 mirror/transpose combinations, each about 1/36 of 350 images
    combos = {tuple(row) for row in labels.tolist()}
    assert len(combos) == 36


def test_augment_digits_transforms_a_share_p_and_p_zero_is_the_identity(gen):
    x, _ = datasets.digits("train")
    same, labels = datasets.augment_digits(x, 0.0, gen)
    assert torch.equal(same, x) and not labels.any()
    _, labels = datasets.augment_digits(x, 0.3, gen)
    # an image is labelled non-zero when it was drawn (0.3) and its draw is not the identity (35/36)
    share = labels.any(1).double().mean().item()
    expected = 0.3 * 35 / 36
    assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / len(x))


def test_augment_digits_rejects_bad_input():
    x, _ = datasets.digits("val")
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\], got 1.5"):
        datasets.augment_digits(x, 1.5)
    with pytest.raises(ValueError, match="probability"):
        datasets.augment_digits(x, True)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\), got torch.Size\(\[350, 8, 8\]\)"):
        datasets.augment_digits(x[:, 0], 0.5)


@pytest.mark.parametrize("n", [1, 7, 37, 450, 1000, 2001])
def test_stratified_labels_keep_the_train_proportions(n):
    _, y = datasets.digits("train")
    share = torch.bincount(y, minlength=10).double() * n / len(y)
    labels = datasets.stratified_labels(n, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(labels, minlength=10)
    assert labels.dtype == torch.int64 and labels.shape == (n,) and counts.sum() == n
    assert ((counts - share).abs() < 1).all()  # each class gets floor or ceil of its share
    up, down = counts > share.floor(), counts == share.floor()
    if up.any() and down.any():  # the classes rounded up have the largest remainders
        rem = share - share.floor()
        assert rem[up].min() >= rem[down].max()
    if n == 1000:
        assert torch.equal(counts, torch.bincount(y, minlength=10))
    again = datasets.stratified_labels(n, generator=torch.Generator().manual_seed(0))
    assert torch.equal(labels, again)


def test_stratified_labels_are_shuffled_and_reject_bad_input():
    a = datasets.stratified_labels(1000, generator=torch.Generator().manual_seed(0))
    b = datasets.stratified_labels(1000, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, b) and torch.equal(a.sort().values, b.sort().values)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            datasets.stratified_labels(bad)
    with pytest.raises(ValueError, match="split"):
        datasets.stratified_labels(10, "holdout")
