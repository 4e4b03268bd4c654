"""Chapter 11: the book's algorithms on a diffusers Stable Diffusion pipeline, tested on a tiny random pipeline that is
saved and reloaded from a local folder, as a reader's own weights would be.

Every pipeline here runs on CPU in float32 (`device="cpu"`), where the exact comparisons (`torch.equal`) are the claim:
same kernels, same inputs, same bits. Notebook 11 states the tolerances the same comparisons need on a GPU (TF32 and
kernel choice change the last bits)."""

import pytest
import torch

from dlearn import inversion as I
from dlearn import sd


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    sd.quiet()
    d = tmp_path_factory.mktemp("tiny-sd")
    sd.tiny_pipeline().save_pretrained(d)
    return d


@pytest.fixture
def pipe(folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = sd.load_pipeline(folder, device="cpu")
    with torch.no_grad():  # tame the random UNet so that reconstructions mean something (a random UNet's eps is large)
        p.unet.conv_out.weight.mul_(0.1)
        p.unet.conv_out.bias.mul_(0.1)
    return p.to("cpu")


@pytest.fixture
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_load_from_a_local_folder_only_with_clear_errors(folder, tmp_path, monkeypatch):
    monkeypatch.delenv(sd.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=f"set {sd.ENV_VAR}"):
        sd.load_pipeline()
    with pytest.raises(FileNotFoundError, match="not a directory"):
        sd.load_pipeline(tmp_path / "nowhere")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"missing \['unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'\]"):
        sd.load_pipeline(tmp_path)
    monkeypatch.setenv(sd.ENV_VAR, str(folder))
    assert sd.resolve_path() == folder
    with pytest.raises(FileNotFoundError, match="ControlNet folder"):
        sd.load_pipeline(folder, controlnet=tmp_path, device="cpu")


def test_reloaded_pipeline_is_the_saved_one(folder):
    original = sd.tiny_pipeline()
    reloaded = sd.load_pipeline(folder, device="cpu")
    kw = {"num_inference_steps": 2, "output_type": "latent", "height": 32, "width": 32}
    a = original("a photo of sks dog", generator=torch.Generator().manual_seed(0), **kw).images
    b = reloaded("a photo of sks dog", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(a, b)
    ids = reloaded.tokenizer("a photo of sks dog").input_ids
    assert len(ids) == 7  # <bos>, five one-token words, <eos>: the in-code vocabulary survived the round trip


def test_null_text_inversion_through_the_pipeline_loop(pipe, images):
    world = sd.PipelineWorld(pipe, ["a photo of sks dog", "a digit three"])
    z0 = sd.encode_images(pipe, images)
    inv = I.ddim_invert(world, z0, 4)
    assert inv.timesteps == [751, 501, 251, 1]  # the pipeline scheduler's own, with steps_offset = 1
    before = I.weights_fingerprint(pipe.unet, pipe.text_encoder, world.cond_init(2))
    nt = I.null_text_optimisation(world, inv, 7.5)
    assert I.weights_fingerprint(pipe.unet, pipe.text_encoder, world.cond_init(2)) == before
    plain = I.mse(I.reconstruct(world, inv, 7.5), z0).mean()
    fixed = I.reconstruct(world, nt, 7.5)
    assert I.mse(fixed, z0).mean() < plain
    through_pipe = sd.pipeline_reconstruct(pipe, world, nt, 7.5)
    # the pipeline's own loop with per-step nulls = the manual loop, up to float32 rounding (it batches null and prompt
    # in one UNet call, the manual loop makes two); 4 steps on CPU stay far below 1e-3
    assert (through_pipe - fixed).abs().max() < 1e-3
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="do not match the inversion's"):
        sd.pipeline_reconstruct(pipe, world, nt, 7.5)


def test_pipeline_world_needs_ddim(pipe):
    from diffusers import PNDMScheduler

    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(TypeError, match="DDIMScheduler"):
        sd.PipelineWorld(pipe, ["a dog"])


def test_quiet_sets_the_loggers_to_errors():
    import diffusers
    import transformers

    sd.quiet()
    assert transformers.logging.get_verbosity() == transformers.logging.ERROR
    assert diffusers.utils.logging.get_verbosity() == diffusers.utils.logging.ERROR


def test_null_text_inversion_leaves_no_parameter_gradients_and_keeps_the_flags(pipe, images):
    modules = (pipe.unet, pipe.text_encoder, pipe.vae)
    pipe.vae.requires_grad_(False)  # a mixed state a reader may have set: it must come back as it was
    flags = [[q.requires_grad for q in m.parameters()] for m in modules]
    assert any(flags[0]) and not any(flags[2])
    world = sd.PipelineWorld(pipe, ["a photo of sks dog"])
    inv = I.ddim_invert(world, sd.encode_images(pipe, images[:1]), 2)
    nt = I.null_text_optimisation(world, inv, 7.5, inner_steps=2)
    assert nt.stats["optimiser_calls"] > 0  # backward passes did run
    for m in modules:
        assert all(q.grad is None for q in m.parameters()), type(m).__name__
    assert [[q.requires_grad for q in m.parameters()] for m in modules] == flags
    with pytest.raises(RuntimeError, match="boom"), sd.frozen(pipe.unet):  # flags come back after an error too
        raise RuntimeError("boom")
    assert [q.requires_grad for q in pipe.unet.parameters()] == flags[0]


def test_fp16_variant_folder_loads_with_variant_and_torch_dtype(tmp_path):
    sd.quiet()
    d = tmp_path / "fp16-only"
    sd.tiny_pipeline().to(torch.float16).save_pretrained(d, variant="fp16")
    assert list(d.glob("unet/*.fp16.safetensors")) and not list(d.glob("unet/diffusion_pytorch_model.safetensors"))
    pipe = sd.load_pipeline(d, variant="fp16", torch_dtype=torch.float16, device="cpu")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float16
    with pytest.raises(FileNotFoundError, match=r"only the \['fp16'\] weight variant.*variant='fp16'.*got variant=None"):
        sd.load_pipeline(d, device="cpu")  # diffusers itself would say only "no file named diffusion_pytorch_model.bin"
    with pytest.raises(TypeError, match=r"torch_dtype must be a torch.dtype .* got str"):
        sd.load_pipeline(d, torch_dtype="float16")
    with pytest.raises(TypeError, match=r"variant must be a non-empty str .* got int"):
        sd.load_pipeline(d, variant=16)
    with pytest.raises(ValueError, match="expected one or equal values"):
        sd.load_pipeline(d, dtype=torch.float32, torch_dtype=torch.float16)
    # null-text inversion on the half-precision UNet: the null and the predictions stay float32
    world = sd.PipelineWorld(pipe, ["a photo of sks dog"])
    z0 = sd.encode_images(pipe, torch.zeros(1, 3, 64, 64))
    assert z0.dtype == torch.float32
    nt = I.null_text_optimisation(world, I.ddim_invert(world, z0, 2), 7.5, inner_steps=2)
    assert all(n.dtype == torch.float32 and bool(torch.isfinite(n).all()) for n in nt.nulls)
    assert sd.pipeline_reconstruct(pipe, world, nt, 7.5).dtype == torch.float32


def test_load_image_centre_crops_resizes_and_scales(tmp_path):
    from PIL import Image

    # 40 x 24 (w x h): red outside the centred 24 x 24 square, blue inside it, a white 4 x 4 block at its centre
    a = torch.zeros(24, 40, 3, dtype=torch.uint8)
    a[:, :, 0] = 255
    a[:, 8:32] = torch.tensor([0, 0, 255], dtype=torch.uint8)
    a[10:14, 18:22] = 255
    path = tmp_path / "photo.png"
    Image.fromarray(a.numpy()).save(path)
    x = sd.load_image(path, 48)
    assert x.shape == (1, 3, 48, 48) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    blue = torch.tensor([-1.0, -1.0, 1.0])
    for i, j in ((0, 0), (0, 47), (47, 0), (47, 47)):  # a crop off centre would put red in two corners
        assert torch.allclose(x[0, :, i, j], blue, atol=1e-6), (i, j, x[0, :, i, j])
    assert torch.allclose(x[0, :, 23:25, 23:25], torch.ones(3, 2, 2), atol=0.05)  # the white centre survived
    assert x.shape[-1] % 2 == 0 and sd.encode_images(sd.tiny_pipeline(), x).shape == (1, 4, 24, 24)
    with pytest.raises(FileNotFoundError, match="expected an image file"):
        sd.load_image(tmp_path / "missing.png", 48)
    with pytest.raises(TypeError, match="size must be an int"):
        sd.load_image(path, 48.0)
    with pytest.raises(ValueError, match="size must be a positive int"):
        sd.load_image(path, 0)


@pytest.fixture
def v_pipe(pipe):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe


def test_v_prediction_world_steps_as_diffusers_does(v_pipe, images):
    """The world turns the UNet's v into eps (eps = sqrt(a) v + sqrt(1 - a) x_t); the book's DDIM step with that eps
    must land where diffusers' own DDIMScheduler, told the UNet predicts v, lands from the same output."""
    world = sd.PipelineWorld(v_pipe, ["a photo of sks dog", "a digit three"])
    assert world.kind == "v_prediction"
    z = sd.encode_images(v_pipe, images) + 0.3 * torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    ts = world.timesteps(4)
    cond = world.cond_init(2)
    with torch.no_grad():
        v = v_pipe.unet(z, ts[1], encoder_hidden_states=cond).sample
    ours = I.denoise_step(world, z, ts[1], ts[2], world.eps(z, ts[1], cond))
    theirs = v_pipe.scheduler.step(v, ts[1], z).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5), (ours - theirs).abs().max()
    # read as eps, the same output steps elsewhere: the conversion is what makes them agree
    as_if_eps = I.denoise_step(world, z, ts[1], ts[2], v)
    assert (as_if_eps - theirs).abs().max() > 1e-2


def test_v_prediction_null_text_inversion_through_the_pipeline_loop(v_pipe, images):
    world = sd.PipelineWorld(v_pipe, ["a photo of sks dog", "a digit three"])
    z0 = sd.encode_images(v_pipe, images)
    inv = I.ddim_invert(world, z0, 4)
    nt = I.null_text_optimisation(world, inv, 7.5, inner_steps=3)
    fixed = I.reconstruct(world, nt, 7.5)
    assert I.mse(fixed, z0).mean() < I.mse(I.reconstruct(world, inv, 7.5), z0).mean()
    # the pipeline's own v-prediction loop with the per-step nulls = the book's loop with the world's eps
    assert (sd.pipeline_reconstruct(v_pipe, world, nt, 7.5) - fixed).abs().max() < 1e-3


def test_other_prediction_types_are_refused(pipe):
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
    with pytest.raises(ValueError, match=r"prediction_type in \('epsilon', 'v_prediction'\), got 'sample'"):
        sd.PipelineWorld(pipe, ["a dog"])
    with pytest.raises(ValueError, match="expected kind"):
        sd.as_eps(torch.zeros(1), torch.zeros(1), 0.5, "sample")


def test_guidance_below_one_is_refused_and_w1_runs_without_nulls(pipe, images):
    world = sd.PipelineWorld(pipe, ["a photo of sks dog", "a digit three"])
    z0 = sd.encode_images(pipe, images)
    inv = I.ddim_invert(world, z0, 3)
    with pytest.raises(ValueError, match="expected guidance_scale >= 1"):
        sd.pipeline_reconstruct(pipe, world, inv, 0.5)
    # at w = 1 the pipeline runs the prompt alone: its loop equals the book's unguided reconstruction
    assert (sd.pipeline_reconstruct(pipe, world, inv, 1.0) - I.reconstruct(world, inv, 1.0)).abs().max() < 1e-4
