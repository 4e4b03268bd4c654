"""`python -m dlearn.smoke`: chapter 11's path on a pipeline folder, run on the book's tiny pipelines (what CI runs;
on a GPU with real weights it is the first command a reader runs)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlearn import sd, smoke

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["load", "vae", "ddim_inversion", "null_text", "prompt_to_prompt", "controlnet", "dreambooth"]


@pytest.fixture(scope="module")
def v_folder(tmp_path_factory):
    """The random tiny pipeline saved as a v-prediction checkpoint (as SD 2.x at 768 px is)."""
    from diffusers import DDIMScheduler

    sd.quiet()
    pipe = sd.tiny_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    d = tmp_path_factory.mktemp("tiny-v")
    pipe.save_pretrained(d)
    return d


def _check_report(rep: dict, out: Path, train_steps: int) -> None:
    assert list(rep["stages"]) == STAGES
    for name, st in rep["stages"].items():
        assert st["seconds"] >= 0 and st["peak_memory_mb"] > 0, name
    assert all(math.isfinite(v) for v in rep["psnr_db"].values())
    assert len(rep["controlnet_losses"]) == len(rep["dreambooth_losses"]) == train_steps
    assert all(math.isfinite(v) and v > 0 for v in rep["controlnet_losses"] + rep["dreambooth_losses"])
    assert json.loads((out / "report.json").read_text()) == rep
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_on_a_v_prediction_folder_with_lora(v_folder, tmp_path):
    rep = smoke.main(["--path", str(v_folder), "--out", str(tmp_path), "--steps", "3", "--inner-steps", "2",
                      "--train-steps", "2", "--lora-rank", "2", "--device", "cpu"])  # fmt: skip
    assert rep["prediction_type"] == "v_prediction" and rep["options"]["lora_rank"] == 2 and rep["size"] == 64
    _check_report(rep, tmp_path, 2)


def test_smoke_command_on_the_trained_tiny_pipeline(tmp_path):
    """The command line, in a fresh process, on the shipped trained pipeline (the GPU check's input too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dlearn.smoke", "--path", "dlearn/weights/tiny_sd", "--out", str(tmp_path),
           "--train-steps", "3", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads((tmp_path / "report.json").read_text())
    _check_report(rep, tmp_path, 3)
    psnr = rep["psnr_db"]
    # on a trained pipeline null-text inversion brings the guided reconstruction back above the guided DDIM one
    assert psnr["null_text_w4 (pipeline loop)"] > psnr["ddim_w4"], psnr
    assert "wrote" in proc.stdout


def test_smoke_refuses_bad_options(v_folder, tmp_path):
    with pytest.raises(ValueError, match="equal token length"):
        smoke.run(v_folder, tmp_path, prompt="a seven", edit="a photo of one", device="cpu")
    with pytest.raises(ValueError, match="expected dtype in"):
        smoke.run(v_folder, tmp_path, dtype="float8", device="cpu")


def test_edge_map_and_default_image():
    x = smoke.default_image(16)
    assert x.shape == (1, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[..., ::2, ::2], x[..., 1::2, 1::2])  # nearest-neighbour: each 8x8 cell is a 2x2 block
    e = smoke.edge_map(x)
    assert e.shape == x.shape and float(e.max()) == 1.0 and float(e.min()) == 0.0
    flat = torch.zeros(1, 3, 8, 8)
    assert float(smoke.edge_map(flat).abs().max()) == 0.0  # no edges in a flat image, and no division by zero


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_smoke_in_half_precision_on_the_trained_tiny_pipeline(dtype, tmp_path):
    """The GPU command's path (`--dtype float16`), on CPU: half-precision frozen modules, float32 ControlNet and LoRA."""
    rep = smoke.main(["--path", str(ROOT / "dlearn/weights/tiny_sd"), "--out", str(tmp_path), "--dtype", dtype,
                      "--steps", "5", "--inner-steps", "2", "--train-steps", "2", "--device", "cpu"])  # fmt: skip
    assert rep["options"]["dtype"] == dtype and rep["options"]["lora_rank"] == 4
    _check_report(rep, tmp_path, 2)
