"""Chapter 11's training on the pipeline (`dlearn.sd_train`), on the tiny random pipeline at 16x16 (latents 8x8), on CPU.

The oracles are equal-by-construction comparisons: two processes on halves of each batch against one process on the
whole batch, k micro-batches against one batch of k x b, checkpointed against plain, an interrupted and resumed run
against an uninterrupted one, diffusers' own `get_velocity` for the v target. Tolerances are stated where float
reduction order differs; where the same operations run on the same numbers the comparison is exact (`torch.equal`).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sd_train_worker as W
import torch
from safetensors.torch import load_file

from dlearn import sd, sd_train

ROOT = Path(__file__).resolve().parents[1]
# float32 sums in another order (one process reduces 4 examples' gradients, two reduce 2 each and all-reduce the two)
# differ by a few units in the last place: float32's eps is 1.2e-7, the parameters are of order 1 and below
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state, fixed by the first Accelerator (mixed precision included); reset it
    around each test as accelerate's own AccelerateTestCase does, so that tests may use different settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def setup():
    pipe, controlnet = W.setup()
    images, controls, prompts = W.data()
    return pipe, controlnet, images, controls, prompts


def _params(*modules) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=RTOL, atol=ATOL) for k in a)


SGD = {"optimizer": torch.optim.SGD, "lr": W.LR, "progress": False}  # see tests/sd_train_worker.py for why not Adam here


def test_two_processes_train_exactly_alike_and_like_one_process_on_the_whole_batch(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # `accelerate launch --cpu --num_processes 2` starts one process unless mpirun is installed; torchrun starts two,
    # and accelerate reads its RANK / WORLD_SIZE / MASTER_ADDR and joins them with the gloo backend
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "sd_train_worker.py"), str(two), "2"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    W.run(one, 4)  # this process, the whole batch of 4 each step
    r0, r1, ref = load_file(two / "rank0.safetensors"), load_file(two / "rank1.safetensors"), load_file(one / "rank0.safetensors")
    logs = [json.loads((d / f"rank{r}.json").read_text()) for d, r in ((two, 0), (two, 1), (one, 0))]
    for name in ("controlnet", "dreambooth"):
        assert [lg[name]["num_processes"] for lg in logs] == [2, 2, 1]
        assert [lg[name]["total_batch_size"] for lg in logs] == [4, 4, 4]
        assert logs[0][name]["losses"] == logs[1][name]["losses"]  # gathered over both processes
        assert torch.allclose(torch.tensor(logs[0][name]["losses"]), torch.tensor(logs[2][name]["losses"]), rtol=RTOL)
    assert r0.keys() == r1.keys() == ref.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # the all-reduced gradients are the same bits on both
    pipe, controlnet = W.setup()
    init = {f"controlnet.{k}": v for k, v in controlnet.state_dict().items()}
    init |= {f"{n}.{k}": v for n in ("unet", "text_encoder") for k, v in getattr(pipe, n).state_dict().items()}
    diffs = {}
    for prefix in ("controlnet.", "unet.", "text_encoder."):
        got, want, start = ({k: v for k, v in d.items() if k.startswith(prefix)} for d in (r0, ref, init))
        moved, diffs[prefix] = _max_diff(got, start), _max_diff(got, want)
        assert moved > 1000 * ATOL, prefix  # training moved it, far beyond the tolerance
        assert _close(got, want), (prefix, diffs[prefix])
    print(f"two processes: {wall:.1f} s; max |two - one| {diffs}")


@pytest.mark.parametrize("kind", ["controlnet", "dreambooth"])
def test_gradient_accumulation_of_k_micro_batches_equals_one_batch_of_k_b(kind):
    def train(batch_size, grad_accum):
        pipe, controlnet = W.setup()
        images, controls, prompts = W.data()
        kw = {"steps": 2, "batch_size": batch_size, "grad_accum": grad_accum, **SGD}
        if kind == "controlnet":
            out = sd_train.train_controlnet(pipe, controlnet, images, prompts, controls, **kw)
            return out, _params(controlnet)
        out = sd_train.train_dreambooth(pipe, images[:2], "a sks dog", images[2:], "a dog", **kw)  # UNet and text encoder
        return out, _params(pipe.unet, pipe.text_encoder)

    (whole, p_whole), (accum, p_accum), (_, p_half) = train(4, 1), train(2, 2), train(2, 1)
    assert whole["total_batch_size"] == accum["total_batch_size"] == 4 and len(accum["losses"]) == 2
    assert torch.allclose(torch.tensor(accum["losses"]), torch.tensor(whole["losses"]), rtol=RTOL)
    print(f"{kind}: max |accumulated - whole| {_max_diff(p_accum, p_whole):.1e}, |half - whole| {_max_diff(p_half, p_whole):.1e}")
    assert _close(p_accum, p_whole), _max_diff(p_accum, p_whole)
    assert not _close(p_half, p_whole)  # a step on half the examples is another step: the comparison can fail


def test_bf16_autocast_on_cpu_runs_close_to_float32(setup):
    pipe, controlnet, images, controls, prompts = setup
    losses = {}
    for mp in ("no", "bf16"):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)  # one mixed-precision setting per accelerate state
        cn = W.setup()[1]
        losses[mp] = sd_train.train_controlnet(pipe, cn, images, prompts, controls, steps=1, batch_size=4,
                                               mixed_precision=mp, progress=False)["losses"][0]  # fmt: skip
        assert "_original_forward" not in vars(cn)  # accelerate's autocast wrapper is taken off the module afterwards
    rel = abs(losses["bf16"] - losses["no"]) / losses["no"]
    print(f"loss float32 {losses['no']:.6f}, bf16 autocast {losses['bf16']:.6f}, relative difference {rel:.2e}")
    assert losses["bf16"] != losses["no"]  # bf16 did run (8 significand bits: relative rounding 2^-8 = 4e-3 per op)
    assert rel < 1e-2  # a few bf16 roundings of the loss's inputs, averaged over 4 x 4 x 8 x 8 elements


@pytest.mark.parametrize("kind", ["controlnet", "dreambooth"])
def test_gradient_checkpointing_gives_the_same_training_and_is_switched_off_after(kind, monkeypatch):
    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)

    def train(on):
        pipe, controlnet = W.setup()
        images, controls, prompts = W.data()
        kw = {"steps": 2, "batch_size": 2, "gradient_checkpointing": on, **SGD}
        if kind == "controlnet":
            sd_train.train_controlnet(pipe, controlnet, images, prompts, controls, **kw)
            modules = (controlnet, pipe.unet)
        else:
            sd_train.train_dreambooth(pipe, images[:2], "a sks dog", images[2:], "a dog", **kw)
            modules = (pipe.unet, pipe.text_encoder)
        assert not any(getattr(x, "gradient_checkpointing", False) for m in modules for x in m.modules())  # off again
        return _params(*modules)

    plain = train(False)
    assert not calls
    checkpointed = train(True)
    assert calls  # activations were recomputed
    print(f"{kind}: {len(calls)} checkpointed calls; max |checkpointed - plain| {_max_diff(checkpointed, plain):.1e}")
    assert _close(checkpointed, plain)


def test_save_state_and_resume_continue_exactly_as_an_uninterrupted_run(tmp_path):
    images, _, _ = W.data()
    kw = {"lr": 1e-3, "batch_size": 2, "progress": False}  # AdamW: its moments must be restored too

    def dreambooth(pipe, steps, **more):
        return sd_train.train_dreambooth(pipe, images[:2], "a sks dog", images[2:], "a dog", steps=steps, **kw, **more)

    pipe = W.setup()[0]
    straight = dreambooth(pipe, 3)
    expected = _params(pipe.unet, pipe.text_encoder)
    first = W.setup()[0]
    dreambooth(first, 2, checkpoint_dir=tmp_path)
    assert (tmp_path / "step-2" / "model.safetensors").exists()  # the weights as safetensors
    resumed_pipe, other = W.setup()[0], sd.tiny_pipeline(seed=1)
    resumed_pipe.unet.load_state_dict(other.unet.state_dict())  # other weights: only load_state can make them right
    resumed_pipe.text_encoder.load_state_dict(other.text_encoder.state_dict())
    resumed = dreambooth(resumed_pipe, 3, checkpoint_dir=tmp_path, resume=True)
    assert resumed["start"] == 2 and resumed["steps"] == 3 and resumed["losses"] == straight["losses"][2:]
    got = _params(resumed_pipe.unet, resumed_pipe.text_encoder)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (tmp_path / "step-3").is_dir()
    with pytest.raises(ValueError, match="past the requested steps=2"):
        dreambooth(W.setup()[0], 2, checkpoint_dir=tmp_path, resume=True)


def test_lora_trains_only_the_adapters_and_starts_equal_to_the_base(setup):
    pipe, _, images, _, _ = setup
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = sd.encode_prompts(pipe, ["a sks dog", "a dog"])
    base_out = pipe.unet(z, 500, encoder_hidden_states=text).sample
    base = _params(pipe.unet, pipe.text_encoder)
    sd_train._add_lora(pipe.unet, 4, sd_train.LORA_UNET_TARGETS, seed=0)  # what train_dreambooth(lora_rank=4) adds
    assert torch.equal(pipe.unet(z, 500, encoder_hidden_states=text).sample, base_out)  # B = 0 at init ("gaussian")
    out = sd_train.train_dreambooth(pipe, images[:2], "a sks dog", images[2:], "a dog", steps=2, batch_size=2, lr=1e-2,
                                    lora_rank=4, progress=False)  # fmt: skip
    after = _params(pipe.unet, pipe.text_encoder)
    lora = {k: v for k, v in after.items() if "lora_" in k}
    assert any(".lora_B." in k for k in lora) and any(k.startswith("1.") for k in lora)  # UNet and text encoder
    assert all(lora[k].abs().sum() > 0 for k in lora if ".lora_B." in k)  # B left zero: the adapters trained
    base_after = {k.replace("base_layer.", ""): v for k, v in after.items() if "lora_" not in k}
    assert base_after.keys() == base.keys() and all(torch.equal(base_after[k], base[k]) for k in base)
    trained = sum(q.numel() for m in (pipe.unet, pipe.text_encoder) for n, q in m.named_parameters() if "lora_" in n)
    print(f"LoRA rank 4: {trained} trained parameters of {sum(v.numel() for v in base.values())}; losses {out['losses']}")
    adapted = pipe.unet(z, 500, encoder_hidden_states=text).sample
    assert not torch.allclose(adapted, base_out)
    pipe.unet.disable_adapters()
    assert torch.equal(pipe.unet(z, 500, encoder_hidden_states=text).sample, base_out)


def test_frozen_modules_hold_no_gradients_and_flags_and_modes_come_back(setup):
    pipe, controlnet, images, controls, prompts = setup
    pipe.unet.eval()
    flags = {m: [q.requires_grad for q in m.parameters()] for m in (pipe.unet, pipe.vae, pipe.text_encoder)}
    sd_train.train_controlnet(pipe, controlnet, images, prompts, controls, steps=2, batch_size=2, progress=False)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert all(q.grad is None for q in m.parameters()), type(m).__name__
    before = _params(pipe.text_encoder, pipe.vae)
    sd_train.train_dreambooth(pipe, images[:2], "a sks dog", images[2:], "a dog", steps=2, batch_size=2,
                              train_text_encoder=False, progress=False)  # fmt: skip
    for m in (pipe.vae, pipe.text_encoder):
        assert all(q.grad is None for q in m.parameters()), type(m).__name__
    assert all(torch.equal(v, before[k]) for k, v in _params(pipe.text_encoder, pipe.vae).items())
    assert {m: [q.requires_grad for q in m.parameters()] for m in flags} == flags and not pipe.unet.training


def _oracle_dreambooth(pipe, instance, cls, prompts, seed, target_of):
    """dreambooth_loss written out with the scheduler's own add_noise and the target `target_of(z0, eps, t)`."""
    g = torch.Generator().manual_seed(seed)
    zt, ts, targets = [], [], []
    for x in (instance, cls):
        lat = sd.encode_images(pipe, x)
        t = torch.randint(0, 1000, (len(x),), generator=g)
        eps = torch.randn(lat.shape, generator=g)
        zt.append(pipe.scheduler.add_noise(lat, eps, t))
        ts.append(t)
        targets.append(target_of(lat, eps, t))
    pred = pipe.unet(torch.cat(zt), torch.cat(ts), encoder_hidden_states=sd.encode_prompts(pipe, prompts)).sample
    err = ((pred - torch.cat(targets)) ** 2).flatten(1).mean(1)
    return err[: len(instance)].mean() + err[len(instance) :].mean()


def test_losses_regress_on_v_for_a_v_prediction_scheduler_and_refuse_sample(setup):
    from diffusers import DDIMScheduler

    pipe, controlnet, images, controls, prompts = setup
    args = (pipe, images[:2], "a sks dog", images[2:], "a dog")
    prompts2 = ["a sks dog"] * 2 + ["a dog"] * 2
    with torch.no_grad():
        eps_loss = sd_train.dreambooth_loss(*args, torch.Generator().manual_seed(3))
        assert torch.allclose(eps_loss, _oracle_dreambooth(pipe, images[:2], images[2:], prompts2, 3, lambda z, e, t: e))
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
        v_loss = sd_train.dreambooth_loss(*args, torch.Generator().manual_seed(3))
        oracle = _oracle_dreambooth(pipe, images[:2], images[2:], prompts2, 3, pipe.scheduler.get_velocity)
        print(f"eps-target loss {eps_loss:.6f}, v-target loss {v_loss:.6f}, oracle {oracle:.6f}")
        assert torch.allclose(v_loss, oracle, rtol=RTOL) and not torch.allclose(v_loss, eps_loss, rtol=1e-3)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match=r"prediction_type in \('epsilon', 'v_prediction'\), got 'sample'"):
        sd_train.dreambooth_loss(*args, torch.Generator())
    with pytest.raises(ValueError, match="got 'sample'"):
        sd_train.controlnet_loss(pipe, controlnet, images, prompts, controls, torch.Generator())
    with pytest.raises(ValueError, match="got 'sample'"):
        sd_train.train_controlnet(pipe, controlnet, images, prompts, controls, steps=1, batch_size=2, progress=False)


def test_embed_prompts_is_the_pipelines_encode_prompt(setup):
    pipe = setup[0]
    prompts = ["a photo of sks dog", "", "an unknown word"]
    assert torch.equal(sd_train.embed_prompts(pipe, prompts), sd.encode_prompts(pipe, prompts))


def test_bad_training_arguments_raise_naming_what_was_expected(setup, tmp_path):
    pipe, controlnet, images, controls, prompts = setup
    run = lambda **kw: sd_train.train_controlnet(pipe, controlnet, images, prompts, controls,  # noqa: E731
                                                 **{"steps": 1, "batch_size": 2, "progress": False, **kw})  # fmt: skip
    for kw, match in (({"steps": 0}, "steps must be a positive int, got 0"),
                      ({"batch_size": 1.5}, "batch_size must be a positive int, got 1.5"),
                      ({"grad_accum": True}, "grad_accum must be a positive int"),
                      ({"mixed_precision": "fp8"}, r"mixed_precision must be one of \('no', 'fp16', 'bf16'\), got 'fp8'"),
                      ({"lr": 0.0}, "lr must be a positive number"),
                      ({"mixed_precision": "fp16"}, "'fp16' needs a GPU: expected 'bf16' or 'no' on CPU"),
                      ({"resume": True}, "resume=True needs the checkpoint_dir")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            run(**kw)
    from accelerate import Accelerator

    with pytest.raises(ValueError, match="gradient_accumulation_steps=1, mixed_precision='no', got 2, 'no'"):
        run(accelerator=Accelerator(gradient_accumulation_steps=2, cpu=True))
    with pytest.raises(ValueError, match="one prompt and one control per image"):
        sd_train.train_controlnet(pipe, controlnet, images, prompts[:3], controls, steps=1, batch_size=2)
    with pytest.raises(ValueError, match="prior_weight must be a finite number >= 0"):
        sd_train.train_dreambooth(pipe, images, "a sks dog", images, "a dog", steps=1, batch_size=2, prior_weight=-1.0)
    with pytest.raises(ValueError, match="lora_rank must be a positive int, got 0"):
        sd_train.train_dreambooth(pipe, images, "a sks dog", None, "a dog", steps=1, batch_size=2, lora_rank=0)


# ---- moved from tests/test_sd.py (chapter 08's and 09's objectives on the pipeline), at the pipeline's 64x64 size ----


@pytest.fixture
def images64():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_controlnet_on_the_pipeline_unet(images64):
    from diffusers import StableDiffusionControlNetPipeline

    pipe = W.setup()[0]
    cn = sd_train.controlnet_for(pipe)
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    text = sd.encode_prompts(pipe, ["a dog", "a dog"])
    control = (images64 > 0).float()
    down, mid = cn(z, 500, encoder_hidden_states=text, controlnet_cond=control, return_dict=False)
    plain = pipe.unet(z, 500, encoder_hidden_states=text).sample
    with_cn = pipe.unet(z, 500, encoder_hidden_states=text, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample  # fmt: skip
    assert torch.equal(plain, with_cn)  # zero convolutions: the ControlNet starts as a no-op
    cpipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=cn)
    cpipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 2, "output_type": "latent"}
    a = pipe("a dog", generator=torch.Generator().manual_seed(0), **kw).images
    b = cpipe("a dog", image=control[:1], generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)
    # chapter 08's training: only the ControlNet moves
    unet_before, cn_before = _params(pipe.unet), _params(cn)
    sd_train.train_controlnet(pipe, cn, images64, ["a photo of sks dog"] * 2, control, steps=1, batch_size=2, lr=1e-3,
                              progress=False)  # fmt: skip
    assert all(torch.equal(v, unet_before[k]) for k, v in _params(pipe.unet).items())
    assert cn.controlnet_mid_block.weight.abs().sum() > 0 and not _close(_params(cn), cn_before)
    with pytest.raises(ValueError, match="image-sized control"):
        sd_train.controlnet_loss(pipe, cn, images64, ["a"] * 2, control[:, :, :32], torch.Generator())


def test_dreambooth_with_prior_preservation_trains_the_unet_and_the_text_encoder(images64):
    pipe = W.setup()[0]
    cls = sd_train.class_images(pipe, "a dog", 2, steps=2)
    assert cls.shape == images64.shape and cls.min() >= -1 and cls.max() <= 1
    unet0, text0 = pipe.unet.conv_out.weight.clone(), pipe.text_encoder.get_input_embeddings().weight.clone()
    out = sd_train.train_dreambooth(pipe, images64, "a sks dog", cls, "a dog", steps=1, batch_size=2, lr=1e-4,
                                    progress=False)  # fmt: skip
    assert out["losses"][0] > 0
    assert not torch.equal(pipe.unet.conv_out.weight, unet0)
    assert not torch.equal(pipe.text_encoder.get_input_embeddings().weight, text0)  # the text encoder too
    with pytest.raises(ValueError, match="multiples of 2"):
        sd.encode_images(pipe, images64[:, :, :63, :63])
    for bad in (float("nan"), -1.0):  # NaN used to switch prior preservation off silently
        with pytest.raises(ValueError, match="prior_weight must be a finite number >= 0"):
            sd_train.dreambooth_loss(pipe, images64, "a sks dog", cls, "a dog", torch.Generator(), prior_weight=bad)


# ---- a half-precision pipeline (bfloat16, float16 on CPU): frozen modules in half, what trains in float32 ----

HALF = [torch.bfloat16, torch.float16]
FROZEN = ("unet", "vae", "text_encoder")


def _half_setup(dtype):
    pipe, controlnet = W.setup()  # the ControlNet stays float32, as diffusers' train_controlnet.py keeps it
    pipe.to(dtype)
    return pipe, controlnet, *W.data()


@pytest.mark.parametrize("dtype", HALF)
def test_a_float32_controlnet_trains_on_a_half_precision_pipeline(dtype):
    pipe, cn, images, controls, prompts = _half_setup(dtype)
    frozen, cn0 = _params(*(getattr(pipe, n) for n in FROZEN)), _params(cn)
    # the first loss, before any step, against the same weights all in float32: only the frozen modules' rounding differs
    ref_pipe, ref_cn = W.setup()
    ref_pipe.unet.load_state_dict({k: v.float() for k, v in pipe.unet.state_dict().items()})  # the rounded UNet, float32
    g = [torch.Generator().manual_seed(s) for s in range(4)]
    loss = sd_train.controlnet_loss(pipe, cn, images, prompts, controls, g).item()
    g = [torch.Generator().manual_seed(s) for s in range(4)]
    ref = sd_train.controlnet_loss(ref_pipe, ref_cn, images, prompts, controls, g).item()
    print(f"{dtype}: first loss {loss:.6f}, all-float32 {ref:.6f}, relative difference {abs(loss - ref) / ref:.1e}")
    assert abs(loss - ref) < 2e-3 * ref  # half activations (2^-8 or 2^-11 relative rounding per op), float32 error
    out = sd_train.train_controlnet(pipe, cn, images, prompts, controls, steps=2, batch_size=2, lr=1e-3, progress=False)
    assert all(v == v for v in out["losses"])  # finite, not NaN
    assert all(q.dtype == torch.float32 for q in cn.parameters())
    assert not _close(_params(cn), cn0) and cn.controlnet_mid_block.weight.abs().sum() > 0  # gradients reached it
    after = _params(*(getattr(pipe, n) for n in FROZEN))
    assert all(v.dtype == dtype and torch.equal(v, frozen[k]) for k, v in after.items() if v.is_floating_point())


@pytest.mark.parametrize("dtype", HALF)
def test_dreambooth_lora_on_a_half_precision_pipeline_trains_float32_adapters(dtype):
    pipe, _, images, _, _ = _half_setup(dtype)
    base = _params(pipe.unet, pipe.text_encoder)
    out = sd_train.train_dreambooth(pipe, images[:2], "a sks dog", images[2:], "a dog", steps=2, batch_size=2, lr=1e-2,
                                    lora_rank=4, progress=False)  # fmt: skip
    assert all(v == v for v in out["losses"])
    after = _params(pipe.unet, pipe.text_encoder)
    lora = {k: v for k, v in after.items() if "lora_" in k}
    assert any(k.startswith("0.") for k in lora) and any(k.startswith("1.") for k in lora)  # UNet and text encoder
    assert all(v.dtype == torch.float32 for v in lora.values())  # upcast, as diffusers' cast_training_params does
    assert all(lora[k].abs().sum() > 0 for k in lora if ".lora_B." in k)  # B starts at 0: the adapters trained
    base_after = {k.replace("base_layer.", ""): v for k, v in after.items() if "lora_" not in k}
    assert base_after.keys() == base.keys()
    assert all(torch.equal(base_after[k], base[k]) and base_after[k].dtype == base[k].dtype for k in base)
    z = pipe("a sks dog", num_inference_steps=2, height=16, width=16, output_type="latent").images  # samples with them
    assert z.dtype == dtype and torch.isfinite(z.float()).all()


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_trained_parameters_are_refused_naming_the_fix(dtype):
    pipe, _, images, controls, prompts = _half_setup(dtype)
    before = _params(*(getattr(pipe, n) for n in FROZEN))
    flags = [q.requires_grad for n in FROZEN for q in getattr(pipe, n).parameters()]
    msg = rf"must be float32: load the pipeline in float32, or train LoRA .* got {dtype} in unet\."
    with pytest.raises(ValueError, match=msg):  # a full fine-tune of half weights
        sd_train.train_dreambooth(pipe, images[:2], "a sks dog", None, "a dog", steps=1, batch_size=2, progress=False)
    half_cn = sd_train.controlnet_for(pipe)
    assert all(q.dtype == torch.float32 for q in half_cn.parameters())  # from_unet builds it in float32
    half_cn.to(dtype)  # moved to the UNet's dtype, as the smoke test used to do
    with pytest.raises(ValueError, match=rf"a ControlNet: controlnet.float\(\)\); got {dtype} in controlnet\."):
        sd_train.train_controlnet(pipe, half_cn, images, prompts, controls, steps=1, batch_size=2, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in _params(*(getattr(pipe, n) for n in FROZEN)).items())
    assert [q.requires_grad for n in FROZEN for q in getattr(pipe, n).parameters()] == flags  # flags came back
    out = sd_train.train_controlnet(pipe, half_cn.float(), images, prompts, controls, steps=1, batch_size=2, progress=False)
    assert len(out["losses"]) == 1  # the fix the message names works
