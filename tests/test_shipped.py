"""The shipped weights are what they claim: every file carries a digest that verifies, and a damaged copy,
a file of NaNs or a file without a digest is refused with a message that names it and says how to restore it."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlearn import metrics, shipped, train
from dlearn.train import DIGEST_KEY, WeightsFileError

SHIPPED = sorted(shipped.WEIGHTS_DIR.glob("*.safetensors"))
RESTORE = r"python -m dlearn\.zoo train digits_classifier.*git checkout -- dlearn/weights"


def _header(path):
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return size, json.loads(data[8 : 8 + size])


def test_the_weights_folder_ships_files():
    assert len(SHIPPED) >= 10 and "digits_classifier" in {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_file_carries_a_digest_that_verifies(path):
    _, header = _header(path)
    meta = header["__metadata__"]
    assert set(meta) == {"dlearn", DIGEST_KEY}
    tensors, metadata = train.load_safetensors(path, require_digest=True)  # raises on a mismatch or a NaN
    assert meta[DIGEST_KEY] == train.tensors_digest(tensors, meta["dlearn"]) and metadata == json.loads(meta["dlearn"])
    assert all(torch.isfinite(t).all() for t in tensors.values())


def _copy(tmp_path, name="digits_classifier"):
    copy = tmp_path / f"{name}.safetensors"
    shutil.copyfile(shipped.path(name), copy)
    return copy


def test_overwritten_tensor_bytes_are_refused_naming_the_file(tmp_path, monkeypatch):
    copy = _copy(tmp_path)
    size, _ = _header(copy)
    data = bytearray(copy.read_bytes())
    start = 8 + size + 1000  # inside the tensors, the header intact
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    data[start : start + 4096] = noise.numpy().tobytes()
    copy.write_bytes(bytes(data))
    # the oracle: safetensors itself reads the damaged file without complaint, and its tensors differ
    damaged, intact = load_file(copy), load_file(shipped.path("digits_classifier"))
    assert damaged.keys() == intact.keys() and any(not torch.equal(damaged[k], intact[k]) for k in intact)
    with pytest.raises(WeightsFileError, match=rf"{re.escape(str(copy))}.*corrupted.*digest.*{RESTORE}"):
        train.load_safetensors(copy, hint=shipped.hint("digits_classifier"))
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)  # the book's own loader, pointed at the damaged copy
    with pytest.raises(WeightsFileError, match=rf"digits_classifier.safetensors is corrupted.*{RESTORE}"):
        shipped.load(metrics.DigitClassifier(), "digits_classifier")


def test_changed_metadata_is_refused(tmp_path):
    """The digest covers the metadata too: a recorded metric edited in place no longer verifies."""
    copy = _copy(tmp_path)
    tensors = load_file(copy)
    _, header = _header(copy)
    meta = header["__metadata__"]
    edited = json.loads(meta["dlearn"])
    edited["metrics"]["test_accuracy"] = 0.999
    save_file(tensors, str(copy), metadata={"dlearn": json.dumps(edited, sort_keys=True), DIGEST_KEY: meta[DIGEST_KEY]})
    with pytest.raises(WeightsFileError, match="no longer match the digest"):
        train.load_safetensors(copy)


def test_a_file_of_nans_is_refused_even_with_a_valid_digest(tmp_path, monkeypatch):
    copy = _copy(tmp_path)
    nans = {k: torch.full_like(v, float("nan")) for k, v in load_file(copy).items()}
    meta_json = json.dumps({"name": "digits_classifier"})
    save_file(nans, str(copy), metadata={"dlearn": meta_json, DIGEST_KEY: train.tensors_digest(nans, meta_json)})
    with pytest.raises(WeightsFileError, match=rf"{re.escape(str(copy))} holds non-finite values.*{RESTORE}"):
        train.load_safetensors(copy, hint=shipped.hint("digits_classifier"))
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsFileError, match="non-finite"):
        shipped.load(metrics.DigitClassifier(), "digits_classifier")
    one_inf = load_file(shipped.path("digits_classifier"))
    next(iter(one_inf.values())).view(-1)[3] = float("inf")
    with pytest.raises(ValueError, match="refusing to write.*non-finite"):  # and none is written in the first place
        train.save_safetensors(tmp_path / "x.safetensors", one_inf)
    assert not (tmp_path / "x.safetensors").exists()


def test_a_file_without_a_digest_is_refused_for_the_shipped_weights_and_read_with_a_warning_otherwise(tmp_path, monkeypatch):
    copy = _copy(tmp_path)
    tensors = load_file(copy)
    _, header = _header(copy)
    save_file(tensors, str(copy), metadata={"dlearn": header["__metadata__"]["dlearn"]})  # as an older dlearn wrote it
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsFileError, match=rf"carries no digest.*{RESTORE}"):
        shipped.load(metrics.DigitClassifier(), "digits_classifier")
    with pytest.raises(WeightsFileError, match="carries no digest"):
        train.load_safetensors(copy)  # the default: refused
    with pytest.warns(UserWarning, match="read unverified"):
        read, meta = train.load_safetensors(copy, require_digest=False)  # a reader's old checkpoint, say
    assert all(torch.equal(read[k], tensors[k]) for k in tensors) and meta["name"] == "digits_classifier"
    train.save_safetensors(copy, read, meta)  # saving again adds the digest
    assert train.load_safetensors(copy)[1] == meta
