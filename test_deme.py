"""The specification of this project, as tests: each test is a sentence about the method or its code.

Sections follow the code: the UNet and its checkpoints (ddpm_unet.py), the diffusion core, data, training and
decoupled finetuning, merging, evaluation, analysis, scale-out, Stable Diffusion, and bad input. Nothing here
downloads: fake datasets and random weights in the real formats are made by the tests themselves.
"""
import argparse
import ast
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import ddpm_unet  # noqa: E402
import deme  # noqa: E402
from ddpm_unet import UNet, UserError  # noqa: E402
from deme import *  # noqa: E402,F401,F403  (the tests speak the code's own names)

torch.set_num_threads(min(2, torch.get_num_threads()))


class RunsCode:
    """A pickle that creates a file when loaded: what a malicious checkpoint does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def run_cli(*args, timeout=600):
    """`python deme.py ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "deme.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def _n_params(model):
    return sum(v.numel() for v in model.state_dict().values())


def _perturbed(model, seed=0):
    """Re-randomise biases and norm affine parameters so that zero- and one-initialised tensors are not trivially
    equal between two implementations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _diffusers_unet(config, seed=0):
    """diffusers UNet2DModel with the DDPM config and random (perturbed) weights; no download."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    model = _perturbed(diffusers.UNet2DModel.from_config(ddpm_unet.diffusers_config(config)), seed)
    # Same embedding as ours: diffusers computes (-ln(1e4) k) / (half - 1), the original k * (ln(1e4) / (half - 1));
    # the two differ by up to 3e-5 in float32 (test_timestep_embedding_is_the_original_formula).
    model.time_proj.forward = lambda t: ddpm_unet.timestep_embedding(t, config["ch"])
    return model


def _ours_from(diffusers_model):
    return ddpm_unet.model_from_state_dict(diffusers_model.state_dict()).eval()


def _ours_and_diffusers(preset):
    """Our UNet of a preset and diffusers' UNet2DModel, holding the same random weights."""
    theirs = _diffusers_unet(dict(ddpm_unet.PRESETS[preset]))
    return _ours_from(theirs), theirs


@pytest.mark.part1
def test_parameter_counts_match_the_published_models():
    with torch.device("meta"):
        cifar, lsun = UNet.from_preset("cifar10"), UNet.from_preset("lsun256")
    assert (_n_params(cifar), len(cifar.state_dict())) == (35_746_307, 328)
    assert (_n_params(lsun), len(lsun.state_dict())) == (113_673_219, 450)
    assert not cifar.has_projections
    assert json.loads(json.dumps(cifar.config)) == cifar.config


@pytest.mark.part2
def test_the_projections_add_9_and_13_convs_to_the_published_models():
    with torch.device("meta"):
        cifar, lsun = UNet.from_preset("cifar10"), UNet.from_preset("lsun256")
    ddpm_unet.add_channel_projections(cifar)
    ddpm_unet.add_channel_projections(lsun)
    assert cifar.has_projections
    assert _n_params(cifar) - 35_746_307 == 491_520 and len(cifar.state_dict()) == 328 + 9
    assert _n_params(lsun) - 113_673_219 == 1_638_400 and len(lsun.state_dict()) == 450 + 13
    assert json.loads(json.dumps(cifar.config)) == cifar.config


@pytest.mark.part1
@pytest.mark.extras
def test_timestep_embedding_is_the_original_formula():
    import math
    t = torch.arange(1000)
    half = 64
    original = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    original = t.float()[:, None] * original[None]
    assert torch.equal(ddpm_unet.timestep_embedding(t, 128), torch.cat([original.sin(), original.cos()], 1))
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.models.embeddings.get_timestep_embedding(t, 128, flip_sin_to_cos=False,
                                                                downscale_freq_shift=1)
    assert (ddpm_unet.timestep_embedding(t, 128) - theirs).abs().max() < 1e-4


@pytest.mark.part1
@pytest.mark.extras
def test_cifar10_unet_equals_diffusers_on_the_same_weights():
    ours, theirs = _ours_and_diffusers("cifar10")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 437, 999])
    with torch.no_grad():  # float64 convolutions are slow on CPU: that check runs at 16x16
        for dtype, tol, size in ((torch.float64, 1e-10, 16), (torch.float32, 1e-4, 32)):
            a = ours.to(dtype)(x[..., :size, :size].to(dtype), t)
            b = theirs.to(dtype)(x[..., :size, :size].to(dtype), t).sample
            assert a.dtype == dtype and a.abs().mean() > 0.1
            assert (a - b).abs().max() < tol, dtype


@pytest.mark.part1
@pytest.mark.extras
def test_lsun256_unet_equals_diffusers_at_reduced_size():
    ours, theirs = _ours_and_diffusers("lsun256")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(x, torch.tensor([321])), theirs(x, torch.tensor([321])).sample
    assert a.abs().mean() > 0.1 and (a - b).abs().max() < 1e-4


@pytest.mark.machinery
@pytest.mark.extras
def test_legacy_diffusers_attention_names_load():
    theirs = _diffusers_unet(dict(ddpm_unet.PRESETS["tiny"]))
    legacy = {}
    for key, value in theirs.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 900])
    with torch.no_grad():
        assert torch.equal(ddpm_unet.model_from_state_dict(legacy)(x, t), _ours_from(theirs)(x, t))


@pytest.mark.machinery
@pytest.mark.extras
def test_export_diffusers_round_trip(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ours = _perturbed(UNet.from_preset("cifar10"))
    ddpm_unet.export_diffusers(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    theirs, info = diffusers.UNet2DModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info.values()), info
    theirs.time_proj.forward = lambda t: ddpm_unet.timestep_embedding(t, 128)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 777])
    with torch.no_grad():
        assert (ours(x, t) - theirs.eval()(x, t).sample).abs().max() < 1e-4
    back = ddpm_unet.load_pretrained(str(tmp_path))
    assert back.config == ours.config and not back.training
    mine, loaded = ours.state_dict(), back.state_dict()
    assert mine.keys() == loaded.keys() and all(torch.equal(mine[k], loaded[k]) for k in mine)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    del config["freq_shift"]  # diffusers' default 0 is not the DDPM embedding
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(UserError, match="freq_shift"):
        ddpm_unet.load_pretrained(tmp_path)


@pytest.mark.machinery
def test_export_refuses_projections_that_are_not_the_identity(tmp_path):
    model = ddpm_unet.add_channel_projections(UNet.from_preset("tiny"))
    ddpm_unet.export_diffusers(model, str(tmp_path / "identity"))  # identity projections change nothing: dropped
    with torch.no_grad():
        model.down[0].proj.weight.mul_(2)
    with pytest.raises(UserError, match="down.0"):
        ddpm_unet.export_diffusers(model, str(tmp_path / "trained"))


@pytest.mark.machinery
def test_wrapped_state_dict_prefixes_are_stripped(tmp_path):
    model = UNet.from_preset("tiny")
    path = str(tmp_path / "wrapped.pt")
    ddpm_unet.atomic_save({f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}, path)
    assert os.listdir(tmp_path) == ["wrapped.pt"]  # no temporary file left beside it
    loaded = ddpm_unet.load_pretrained(path).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())


@pytest.mark.machinery
def test_training_checkpoint_gives_its_ema_weights(tmp_path):
    model, ema = UNet.from_preset("tiny"), UNet.from_preset("tiny")
    path = str(tmp_path / "ckpt.pt")
    ddpm_unet.atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "step": 3}, path)
    assert torch.equal(ddpm_unet.load_state_dict_file(path)["conv_in.weight"], ema.conv_in.weight)
    assert torch.equal(ddpm_unet.load_state_dict_file(path, key="model")["conv_in.weight"], model.conv_in.weight)


@pytest.mark.machinery
def test_user_mistakes_get_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="cifar10, lsun256, tiny"):
        UNet.from_preset("imagenet")
    with pytest.raises(UserError, match="no such file"):
        ddpm_unet.load_pretrained(str(tmp_path / "missing.ckpt"))
    path = str(tmp_path / "tiny.pt")
    torch.save(UNet.from_preset("tiny").state_dict(), path)
    with pytest.raises(UserError, match=r"temb.dense.0.weight: checkpoint \(128, 32\) vs model \(512, 128\)"):
        ddpm_unet.load_pretrained(path, preset="cifar10")
    grey = UNet.from_preset("tiny", in_channels=1).state_dict()
    with pytest.raises(UserError, match=r"tiny: conv_in.weight: checkpoint \(32, 1, 3, 3\) vs model \(32, 3, 3, 3\)"):
        ddpm_unet.model_from_state_dict(grey, "tiny")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        ddpm_unet.load_pretrained(path)
    with pytest.raises(AssertionError, match="multiples of 4"):  # the network asserts; users' sizes: check_config
        UNet.from_preset("tiny")(torch.randn(1, 3, 18, 18), 0)


class _Payload:
    """A pickle that creates a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.machinery
def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker, path = str(tmp_path / "marker"), str(tmp_path / "evil.ckpt")
    torch.save({"conv_in.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(UserError, match="refused for safety"):
        ddpm_unet.load_state_dict_file(path)
    assert not os.path.exists(marker)


@pytest.mark.part1
def test_forward_takes_int_and_scalar_timesteps():
    model = UNet.from_preset("tiny").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x, torch.tensor([7, 7]))
        assert out.shape == x.shape
        assert torch.equal(model(x, 7), out) and torch.equal(model(x, torch.tensor(7)), out)


def _skips_consumed_by_up_path(model, x, t):
    """The skip tensors produced on the way down and the ones the up blocks receive, in order."""
    produced, consumed = [], []
    hooks = [model.conv_in.register_forward_hook(lambda m, i, o: produced.append(o))]
    for level in model.down:
        last = [level.attn[j] if len(level.attn) else b for j, b in enumerate(level.block)]
        last += [level.downsample] if hasattr(level, "downsample") else []
        hooks += [m.register_forward_hook(lambda m, i, o: produced.append(o)) for m in last]
    for level in model.up:
        hooks += [b.register_forward_pre_hook(lambda m, i: consumed.append(i[0])) for b in level.block]
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return produced, consumed


@pytest.mark.part2
def test_channel_projections_start_as_identity_on_the_main_path_only():
    torch.manual_seed(0)
    model = _perturbed(UNet.from_preset("tiny"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 600])
    with torch.no_grad():
        before = model(x, t)
        assert ddpm_unet.add_channel_projections(model) is model
        ddpm_unet.add_channel_projections(model)  # a second call is a no-op
        assert len(model.state_dict()) == 182 + 7
        assert (model(x, t) - before).abs().max() < 1e-6
        for _, level in ddpm_unet.projection_places(model):
            level.proj.weight.add_(0.05 * torch.randn_like(level.proj.weight))
        assert (model(x, t) - before).abs().max() > 1e-3
    produced, consumed = _skips_consumed_by_up_path(model, x, t)
    assert len(produced) == len(consumed) == 1 + 3 * 1 + 2  # conv_in, one block per level, two downsamples
    for skip, block_input in zip(reversed(produced), consumed):  # the skips are the un-projected tensors
        assert torch.equal(block_input[:, -skip.shape[1]:], skip)


@pytest.mark.part2
def test_folding_projections_into_upsample_convs_keeps_the_output():
    torch.manual_seed(0)
    model = ddpm_unet.add_channel_projections(_perturbed(UNet.from_preset("cifar10")))
    with torch.no_grad():
        for _, level in ddpm_unet.projection_places(model):
            level.proj.weight.add_(0.05 * torch.randn_like(level.proj.weight))
        x, t = torch.randn(1, 3, 16, 16), torch.tensor([250])
        before = model(x, t)
        assert ddpm_unet.fold_channel_projections(model) == 3
        assert (model(x, t) - before).abs().max() < 1e-5
        assert sorted(k for k in model.state_dict() if k.endswith(".proj.weight")) == [
            "down.0.proj.weight", "down.1.proj.weight", "down.2.proj.weight", "down.3.proj.weight",
            "mid.proj.weight", "up.0.proj.weight"]
        reloaded = ddpm_unet.model_from_state_dict(model.state_dict()).eval()  # preset inferred, places detected
        assert torch.equal(reloaded(x, t), model(x, t))


@pytest.mark.machinery
def test_pretrained_offline_error_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored after the test
    torch.hub.set_dir(str(tmp_path))

    def offline(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = os.path.join(str(tmp_path), "checkpoints", "ema_diffusion_cifar10_model-790000.ckpt")
    with pytest.raises(UserError) as err:
        ddpm_unet.load_pretrained("cifar10")
    assert ddpm_unet.PRETRAINED["cifar10"]["url"] in str(err.value) and expected in str(err.value)

    def wrong_file(url, dst, *args, **kwargs):
        with open(dst, "wb") as f:
            f.write(b"not the checkpoint")

    monkeypatch.setattr(torch.hub, "download_url_to_file", wrong_file)
    with pytest.raises(UserError, match="MD5"):
        ddpm_unet.load_pretrained("cifar10")
    assert os.listdir(os.path.dirname(expected)) == []


@pytest.mark.machinery
def test_pretrained_file_already_in_the_hub_cache_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)
    torch.hub.set_dir(str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    model = UNet.from_preset("cifar10")
    ddpm_unet.atomic_save(model.state_dict(),
                          os.path.join(str(tmp_path), "checkpoints", "ema_diffusion_cifar10_model-790000.ckpt"))
    loaded = ddpm_unet.load_pretrained("cifar10")  # a present file is trusted: its MD5 is not checked
    assert loaded.config == model.config and torch.equal(loaded.conv_out.weight, model.conv_out.weight)


# ======================================================================================================================
# Diffusion core: schedule, samplers against diffusers, EMA
# ======================================================================================================================

@pytest.mark.part1
def test_linear_schedule_matches_the_ddpm_paper():
    d = deme.GaussianDiffusion()
    assert d.betas.dtype == torch.float64 and d.alphas_bar.dtype == torch.float64 and len(d.betas) == 1000
    assert d.alphas_bar[0].item() == pytest.approx(0.9999, abs=1e-12)
    assert d.alphas_bar[999].item() == pytest.approx(4.0358e-5, rel=1e-4)


@pytest.mark.part1
def test_q_sample_is_the_closed_form_of_t_noising_steps():
    d = deme.GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 3, 8, 8, generator=g,
                                                                                         dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    ab = torch.tensor([math.prod(1 - d.betas[s].item() for s in range(ti + 1)) for ti in t.tolist()],
                      dtype=torch.float64).view(-1, 1, 1, 1)
    assert torch.allclose(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-12)


def _ddim_scheduler(clip):
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")


@pytest.mark.part1
@pytest.mark.extras
@pytest.mark.parametrize("steps", [50, 100])
@pytest.mark.parametrize("clip", [True, False])
def test_ddim_visits_diffusers_timesteps_and_every_update_matches_its_step(steps, clip):
    d = deme.GaussianDiffusion()
    sched = _ddim_scheduler(clip)
    sched.set_timesteps(steps)
    ours = d.ddim_timesteps(steps)
    assert ours == sched.timesteps.tolist()
    g = torch.Generator().manual_seed(steps)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    clipped = 0
    for t, t_prev in zip(ours, ours[1:] + [-1]):  # every update from the same realistic x_t
        noise = torch.randn(x0.shape, generator=g)
        x = d.q_sample(x0, torch.tensor(t), noise)
        eps = noise + 0.3 * torch.randn(x0.shape, generator=g)  # an imperfect model, so clipping has work to do
        clipped += int((d.predict_x0(x, t, eps).abs() > 1).any())
        mine = d.ddim_step(x, eps, t, t_prev, eta=0.0, clip_denoised=clip)
        theirs = sched.step(eps, t, x, eta=0.0).prev_sample
        assert (mine - theirs).abs().max() < 1e-5, t
    assert clipped > steps // 2


@pytest.mark.part1
@pytest.mark.extras
def test_ddim_with_eta_matches_diffusers_given_the_same_noise():
    d, sched = deme.GaussianDiffusion(), _ddim_scheduler(True)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    mine = d.ddim_step(x, eps, 500, 450, eta=0.7, noise=z)
    theirs = sched.step(eps, 500, x, eta=0.7, variance_noise=z).prev_sample
    assert (mine - theirs).abs().max() < 1e-5


@pytest.mark.part1
@pytest.mark.extras
@pytest.mark.parametrize("variance,theirs_name", [("fixedlarge", "fixed_large"), ("fixedsmall", "fixed_small")])
def test_one_ddpm_step_matches_diffusers_for_both_variances(variance, theirs_name):
    from diffusers import DDPMScheduler
    d = deme.GaussianDiffusion()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          variance_type=theirs_name, clip_sample=True)
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t in (999, 500, 100, 10, 1, 0):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        mine = d.ddpm_step(x, eps, t, variance, clip_denoised=True, noise=noise)
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        # diffusers derives β_t and 1 - ᾱ_t from float32 ᾱ: near t = 0 that cancellation costs it ~3e-4 relative
        assert (mine - theirs).abs().max() < (1e-5 if t >= 100 else 1e-4), t


@pytest.mark.part1
def test_a_seed_fixes_every_sample_of_both_samplers():
    d, model = deme.GaussianDiffusion(T=1000), UNet.from_preset("tiny").eval()
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    run = lambda: d.ddim_sample(model, x_T, 5, eta=1.0, noise=deme.SampleNoise(3, range(2), (3, 16, 16)))
    a, b = run(), run()
    assert torch.equal(a, b) and a.abs().max() <= 1
    short = deme.GaussianDiffusion(T=5, beta_start=0.1, beta_end=0.2)  # 5 ancestral steps keep the test fast
    run = lambda: short.ddpm_sample(model, x_T, noise=deme.SampleNoise(3, range(2), (3, 16, 16)))
    assert torch.equal(run(), run())


@pytest.mark.part1
def test_ema_decay_warms_up_as_one_minus_k_to_the_minus_three_quarters():
    model = nn.Linear(3, 3)
    ema = deme.EMA(model, max_decay=0.9999)
    ema.update()
    assert ema.decay() == 0.0 or ema.step == 1
    assert all(torch.equal(ema.state[k], v) for k, v in model.state_dict().items())  # k = 1: a copy
    ema.update()
    assert ema.decay() == pytest.approx(1 - 2 ** -0.75)
    ema.step = 10 ** 9
    assert ema.decay() == 0.9999


@pytest.mark.part1
def test_ema_averages_the_weights_with_that_decay():
    model = nn.Linear(2, 1, bias=False)
    ema = deme.EMA(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update()  # k = 1: copy
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update()  # k = 2
    d = 1 - 2 ** -0.75
    assert torch.allclose(ema.state["weight"], torch.full((1, 2), d * 1.0 + (1 - d) * 3.0))


# ======================================================================================================================
# Data
# ======================================================================================================================

def write_fake_cifar10(root, n=20):
    """CIFAR-10 in its real on-disk format (python pickles of uint8 rows), with a few images per batch file."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)], b"data": data,
                         b"filenames": [b"x.png"] * n}, f, protocol=2)
        batches[name] = data
    return batches


@pytest.mark.machinery
def test_a_fake_cifar10_in_the_real_format_loads_through_the_cifar10_path(tmp_path):
    batches = write_fake_cifar10(tmp_path)
    cfg = deme.resolve_config(dict(dataset="cifar10", preset="tiny", image_size=32, data_dir=str(tmp_path),
                                   out=str(tmp_path / "run")))
    ds = deme.make_dataset(cfg)
    assert len(ds) == 100 and ds[0].shape == (3, 32, 32)
    first = torch.from_numpy(batches["data_batch_1"][0].reshape(3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(ds[0], first) and ds[0].min() >= -1 and ds[0].max() <= 1
    assert len(deme.heldout_images(cfg, 7, "report")) == 7  # the test split


@pytest.mark.machinery
def test_cifar10_batch_files_that_run_code_are_refused(tmp_path):
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump(RunsCode(str(marker)), f)
    with pytest.raises(UserError, match="not a CIFAR-10 batch file"):
        deme.cifar10_images(tmp_path)
    assert not marker.exists()


@pytest.mark.machinery
def test_missing_cifar10_without_download_names_the_folder(tmp_path):
    with pytest.raises(UserError, match="--download"):
        deme.cifar10_images(tmp_path)


@pytest.mark.machinery
def test_a_folder_of_pngs_loads_through_folder_and_skips_what_is_not_an_image(tmp_path, capsys):
    from PIL import Image
    (tmp_path / "sub").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 24), (i * 80, 0, 255)).save(tmp_path / "sub" / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    cfg = deme.Config(dataset="folder", data_dir=str(tmp_path), out=str(tmp_path / "run"))  # (too few for a run)
    train, report = deme.make_dataset(cfg), deme.make_dataset(cfg, "report")  # sub/2.png is held out (heldout_role)
    assert [p.name for p in train.paths] == ["0.png", "1.png"] and [p.name for p in report.paths] == ["2.png"]
    assert train[1].shape == (3, 16, 16)
    assert report[0][0, 0, 0].item() == pytest.approx(160 / 255 * 2 - 1, abs=1e-6) and report[0][2].max() == 1
    assert "skipped 2 file(s)" in capsys.readouterr().err


@pytest.mark.machinery
def test_an_empty_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(UserError, match="no readable images"):
        deme.image_files(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        deme.image_files(tmp_path / "missing")


@pytest.mark.part1
def test_the_synthetic_set_is_identical_for_the_same_seed():
    a, b, c = deme.synthetic_images(16, 16, seed=5), deme.synthetic_images(16, 16, seed=5), deme.synthetic_images(16, 16, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 3, 16, 16) and a.min() >= -1 and a.max() <= 1 and a.std() > 0.3


@pytest.mark.machinery
def test_batches_resume_where_they_stopped_and_ranks_split_each_global_batch():
    ds = deme.TensorImages(torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1))
    full = [b.flatten().tolist() for b in itertools.islice(deme.batches(ds, 4, seed=1), 25)]
    resumed = [b.flatten().tolist() for b in itertools.islice(deme.batches(ds, 4, seed=1, start=13), 12)]
    assert resumed == full[13:]  # crosses an epoch boundary (10 batches per epoch)
    r0 = [b.flatten().tolist() for b in itertools.islice(deme.batches(ds, 2, seed=1, rank=0, world=2), 10)]
    r1 = [b.flatten().tolist() for b in itertools.islice(deme.batches(ds, 2, seed=1, rank=1, world=2), 10)]
    for k in range(10):
        assert sorted(r0[k] + r1[k]) == sorted(full[k]) and not set(r0[k]) & set(r1[k])


# ======================================================================================================================
# Training, decoupled finetuning, resume
# ======================================================================================================================

def tiny_cfg(tmp_path, **kw):
    """A config for runs that take seconds: tiny model, small batches, few steps."""
    base = dict(out=str(tmp_path / "run"), device="cpu", pretrained="", batch_size=8, steps=4, train_steps=4,
                ckpt_every=2, n_samples=32, eval_batch=32, sample_steps=5, search_images=32, search_evals=4)
    return deme.resolve_config({**base, **kw})


@pytest.mark.part2
def test_training_on_the_synthetic_set_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, batch_size=32)
    env, d = deme.setup_env(cfg), deme.GaussianDiffusion()
    model = UNet.from_preset("tiny")
    images = deme.heldout_images(cfg, 128, "select")
    before = deme.heldout_loss(model, d, images, env)[0]
    uniform = lambda b, g: torch.randint(0, 1000, (b,), generator=g)
    deme.train_loop(cfg, env, tmp_path / "train", model, deme.make_dataset(cfg), d, steps=40, lr=1e-3, warmup=5,
                    timesteps=uniform, identity={}, seed=0)
    after = deme.heldout_loss(model, d, images, env)[0]
    assert after < 0.6 * before, (before, after)
    assert (tmp_path / "train" / "ckpt.pt").exists() and (tmp_path / "train" / "grid_000040.png").exists()


@pytest.mark.machinery
def test_the_consistency_loss_is_zero_at_step_zero_and_projections_change_nothing():
    theta0 = UNet.from_preset("tiny").eval()
    student = deme.add_channel_projections(copy.deepcopy(theta0)).eval()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([3, 300, 600, 990])
    assert F.mse_loss(student(x, t), deme.frozen(theta0)(x, t)).item() == 0.0


@pytest.mark.part2
def test_finetuning_never_changes_the_frozen_teacher(tmp_path):
    cfg = tiny_cfg(tmp_path, ranges="3", steps=3)
    env, d = deme.setup_env(cfg), deme.GaussianDiffusion()
    theta0 = UNet.from_preset("tiny")
    teacher = deme.frozen(theta0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    timesteps = lambda b, g: deme.sample_timesteps(b, 750, 1000, generator=g)
    deme.train_loop(cfg, env, tmp_path / "ft", deme.add_channel_projections(copy.deepcopy(theta0)),
                    deme.make_dataset(cfg), d, steps=3, lr=1e-3, warmup=0, timesteps=timesteps, identity={},
                    teacher=teacher, lam=1.0)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(torch.equal(v, theta0.state_dict()[k]) for k, v in teacher.state_dict().items())


@pytest.mark.part2
def test_a_finetuned_range_starts_from_theta0_and_learns_only_its_projections_and_weights(tmp_path):
    cfg = tiny_cfg(tmp_path, ranges="1", steps=2)
    env, d = deme.setup_env(cfg), deme.GaussianDiffusion()
    theta0 = UNet.from_preset("tiny").eval()
    deme.stage_finetune(cfg, env, d, theta0)
    ck = deme.load_checkpoint(tmp_path / "run" / "range_1" / "ckpt.pt")
    assert ck["step"] == 2 and ck["identity"]["range"] == [250, 500] and ck["identity"]["p_global"] == 0.3
    assert sum(k.endswith(".proj.weight") for k in ck["ema"]) == 7  # 3 down levels, mid, 3 up levels
    assert not (tmp_path / "run" / "range_0").exists()  # --ranges 1 runs that range alone


def interrupt_after(monkeypatch, n):
    """Makes the training loop die (KeyboardInterrupt) right after its n-th optimizer step."""
    real = deme.EMA.update

    def update(self):
        real(self)
        if self.step == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(deme.EMA, "update", update)


@pytest.mark.machinery
def test_an_interrupted_then_resumed_finetune_ends_with_exactly_the_same_weights(tmp_path, monkeypatch):
    theta0 = UNet.from_preset("tiny").eval()
    settings = dict(ranges="2", steps=6, ckpt_every=2, p_global=0.5, flip=True, grad_accum=2)
    cfg = tiny_cfg(tmp_path / "a", **settings)
    deme.stage_finetune(cfg, deme.setup_env(cfg), deme.GaussianDiffusion(), theta0)
    whole = deme.load_checkpoint(tmp_path / "a" / "run" / "range_2" / "ckpt.pt")

    cfg = tiny_cfg(tmp_path / "b", **settings)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)  # dies after step 3; the last checkpoint is step 2
        with pytest.raises(KeyboardInterrupt):
            deme.stage_finetune(cfg, deme.setup_env(cfg), deme.GaussianDiffusion(), theta0)
    assert deme.load_checkpoint(tmp_path / "b" / "run" / "range_2" / "ckpt.pt")["step"] == 2
    with pytest.raises(UserError, match="--resume"):
        deme.stage_finetune(cfg, deme.setup_env(cfg), deme.GaussianDiffusion(), theta0)
    cfg = dataclasses.replace(cfg, resume=True)
    torch.manual_seed(12345)  # the global RNG state must come from the checkpoint, not from here
    deme.stage_finetune(cfg, deme.setup_env(cfg), deme.GaussianDiffusion(), theta0)
    resumed = deme.load_checkpoint(tmp_path / "b" / "run" / "range_2" / "ckpt.pt")
    assert resumed["step"] == whole["step"] == 6
    for part in ("model", "ema"):
        assert all(torch.equal(whole[part][k], resumed[part][k]) for k in whole[part]), part


@pytest.mark.machinery
def test_a_finished_stage_is_reused_but_never_silently_replaced_by_other_settings(tmp_path):
    theta0 = UNet.from_preset("tiny").eval()
    cfg = tiny_cfg(tmp_path, ranges="0", steps=2)
    env, d = deme.setup_env(cfg), deme.GaussianDiffusion()
    deme.stage_finetune(cfg, env, d, theta0)
    path = tmp_path / "run" / "range_0" / "ckpt.pt"
    stamp = path.stat().st_mtime_ns
    deme.stage_finetune(cfg, env, d, theta0)  # finished: reused
    assert path.stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="other settings.*--overwrite"):
        deme.stage_finetune(dataclasses.replace(cfg, p_global=0.9), env, d, theta0)
    deme.stage_finetune(dataclasses.replace(cfg, p_global=0.9, overwrite=True), env, d, theta0)
    assert deme.load_checkpoint(path)["identity"]["p_global"] == 0.9


@pytest.mark.machinery
def test_a_non_finite_loss_stops_the_stage_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, steps=5, ckpt_every=1)
    env, d = deme.setup_env(cfg), deme.GaussianDiffusion()
    model = UNet.from_preset("tiny")
    calls = {"n": 0}
    real_forward = UNet.forward

    def forward(self, x, t):  # the 4th forward (step 4) blows up
        calls["n"] += 1
        out = real_forward(self, x, t)
        return out * float("nan") if calls["n"] == 4 else out

    monkeypatch.setattr(UNet, "forward", forward)
    uniform = lambda b, g: torch.randint(0, 1000, (b,), generator=g)
    with pytest.raises(UserError, match="at step 4"):
        deme.train_loop(cfg, env, tmp_path / "t", model, deme.make_dataset(cfg), d, steps=5, lr=1e-3, warmup=0,
                        timesteps=uniform, identity={})
    ck = deme.load_checkpoint(tmp_path / "t" / "ckpt.pt")
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["model"].values())


KILL_DURING_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import deme, ddpm_unet
real_save, calls = torch.save, [0]
def dying_save(obj, f, *a, **k):
    calls[0] += 1
    if calls[0] == 2:  # the second checkpoint: write half of it, then die like a killed process
        import io
        buf = io.BytesIO(); real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
torch.save = dying_save
deme.main(["train", "--out", {out!r}, "--device", "cpu", "--train-steps", "4", "--ckpt-every", "2",
           "--batch-size", "8"])
"""


@pytest.mark.machinery
def test_a_run_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(root=str(ROOT), out=str(out))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "pretrain" / "ckpt.tmp.pt").exists()  # the half-written file never replaced the good one
    ck = deme.load_checkpoint(out / "pretrain" / "ckpt.pt")
    assert ck["step"] == 2
    proc = run_cli("train", "--out", str(out), "--device", "cpu", "--train-steps", "4", "--ckpt-every", "2",
                   "--batch-size", "8", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert deme.load_checkpoint(out / "pretrain" / "ckpt.pt")["step"] == 4


@pytest.mark.machinery
def test_checkpoints_that_run_code_are_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": RunsCode(str(marker))}, path)
    with pytest.raises(UserError, match="cannot be read"):
        deme.load_checkpoint(path)
    proc = run_cli("evaluate", "--out", str(tmp_path / "run"), "--models", str(path), "--device", "cpu")
    assert proc.returncode != 0 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


# ======================================================================================================================
# The whole pipeline, as a user runs it
# ======================================================================================================================

FAST = ["--device", "cpu", "--pretrained", "", "--train-steps", "10", "--steps", "2", "--batch-size", "8", "--n-samples", "64",
        "--sample-steps", "4", "--eval-batch", "64", "--search-images", "32", "--search-evals", "5",
        "--report-images", "32"]


@pytest.mark.machinery
def test_the_pipeline_runs_every_stage_and_writes_its_table_and_grids(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--out", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["theta0", "baseline", "ensemble", "merged"]
    assert all(math.isfinite(r["value"]) and math.isfinite(r["heldout_loss"]) for r in results["rows"])
    assert results["metric"].startswith("pixel Fréchet distance (not FID)") and results["real_vs_real"] >= 0
    # the floor beside the table: two disjoint sets of real images at the samples' N, pooled as the samples are
    real_a, real_b = (synthetic_images(64, 16, seed=s) for s in SYNTHETIC_SEEDS["real"])
    assert results["pixel_pool"] == pixel_pool(16, 3, 64)
    assert results["real_vs_real"] == pytest.approx(pixel_frechet(real_b, real_a, results["pixel_pool"]), rel=1e-9)
    assert "| merged |" in (out / "results.md").read_text() and (out / "models.png").exists()
    search = json.loads((out / "merge" / "search.json").read_text())
    assert len(search["weights"]) == 4 and search["search"]["evals"] == len(search["search"]["path"]) <= 5
    merged = deme.load_model(out / "merge" / "merged.pt")
    assert merged.has_projections
    # every stage is cached: the same command reuses them all and reproduces the table exactly
    again = run_cli("--out", str(out), *FAST)
    assert again.returncode == 0 and "reusing the finished stage" in again.stdout
    assert [r["value"] for r in json.loads((out / "results.json").read_text())["rows"]] == \
        [r["value"] for r in results["rows"]]
    # merging with w = 0 gives θ0 (with identity projections); TIES and DARE run on the same ranges
    assert run_cli("merge", "--out", str(out), *FAST, "--merge-weights", "0,0,0,0").returncode == 0
    theta0 = deme.load_model(out / "pretrain" / "ckpt.pt")
    base = deme.merge_base(theta0, True)
    zero = deme.load_checkpoint(out / "merge" / "merged.pt")["ema"]  # saved with the foldable projections folded
    assert zero.keys() < base.keys() and all(k.endswith(".proj.weight") for k in base.keys() - zero.keys())
    assert all(torch.equal(v, base[k]) for k, v in zero.items())  # folding an identity projection changes nothing
    for method in ("ties", "dare", "average"):
        proc = run_cli("merge", "--out", str(out), *FAST, "--merge-method", method)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((out / "merge" / "search.json").read_text())["method"] == method
        if method != "average":  # the search's cache holds scores of this method only: others' are never reused
            cache = json.loads((out / "merge" / "search_cache.json").read_text())
            assert cache["scored_with"]["method"] == method
            assert len([k for k in cache["values"] if k.startswith("loss")]) <= 5


@pytest.mark.machinery
def test_the_paper_path_runs_end_to_end_on_a_fake_cifar10_with_fid(tmp_path, monkeypatch, capsys):
    # The CIFAR-10 recipe with the paper's model at its real size, shrunk only in steps and samples: a fake CIFAR-10
    # in its real format, θ0 as a file in the original checkpoint layout, and a random-weight FID Inception (the real
    # weights cannot be downloaded here). FID values from random Inception weights mean nothing; the flow is the test.
    from torchvision.models.inception import Inception3
    write_fake_cifar10(tmp_path / "data", n=8)
    torch.manual_seed(0)
    torch.save(UNet.from_preset("cifar10").state_dict(), tmp_path / "theta0.ckpt")
    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=True).state_dict(), tmp_path / "inc.pth")
    real_inception = deme.FIDInception
    monkeypatch.setattr(deme, "FIDInception", lambda path=None, check_hash=True: real_inception(
        str(tmp_path / "inc.pth"), check_hash=False))
    out = tmp_path / "run"
    deme.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--pretrained",
               str(tmp_path / "theta0.ckpt"), "--out", str(out), "--device", "cpu", "--steps", "1", "--batch-size",
               "2", "--no-baseline", "--models", "theta0,ensemble,merged", "--n-samples", "4", "--sample-steps", "2",
               "--eval-batch", "4", "--search-evals", "3", "--search-images", "4", "--report-images", "4",
               "--search-objective", "samples", "--search-samples", "4", "--search-candidates", "2"])
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "FID, 4 samples" and results["sampler"] == "DDIM 2 steps, eta 0.0"
    assert [r["model"] for r in results["rows"]] == ["theta0", "ensemble", "merged"]
    assert (out / "fid_stats_cifar10.npz").exists()  # the training set's statistics, cached for the next run
    assert (out / "fid_stats_cifar10_select.npz").exists()  # the selection split's, which the samples objective uses
    for name in ("theta0", "ensemble", "merged"):
        assert sorted(p.name for p in (out / "samples" / name).glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    merged = deme.load_model(out / "merge" / "merged.pt")
    assert sum(k.endswith(".proj.weight") for k in merged.state_dict()) == 6  # 3 of 9 projections folded
    assert json.loads((out / "merge" / "search.json").read_text())["folded_projections"] == 3


# ======================================================================================================================
# Bad input: one clear line, a non-zero exit, no traceback
# ======================================================================================================================

def cli_error(capsys, *argv):
    """Runs deme.main in-process and returns its one error line (asserting exit code 2 and no traceback)."""
    with pytest.raises(SystemExit) as exit:
        deme.main(list(argv))
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.machinery
def test_bad_numbers_get_one_line_each(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run"), "--device", "cpu"]
    assert "--n-ranges 0" in cli_error(capsys, "finetune", "--n-ranges", "0", *out)
    assert "indices must lie in 0..3" in cli_error(capsys, "finetune", "--ranges", "7", *out)
    assert "not a probability" in cli_error(capsys, "finetune", "--p-global", "1.5", *out)
    assert "one per range" in cli_error(capsys, "merge", "--merge-weights", "0.1,0.2", *out)
    assert "invalid choice: 'huge'" in cli_error(capsys, "train", "--preset", "huge", *out)
    assert "invalid choice: 'imagenet'" in cli_error(capsys, "train", "--dataset", "imagenet", *out)
    assert "multiple of 4" in cli_error(capsys, "train", "--image-size", "18", *out)
    assert "--batch-size" in cli_error(capsys, "train", "--batch-size", "6", "--grad-accum", "4", *out)
    assert "--ckpt-every must be at least 1" in cli_error(capsys, "train", "--ckpt-every", "0", *out)
    assert "--landscape-points must be at least 2" in cli_error(capsys, "analyze", "--landscape-points", "1", *out)
    assert "--adam-betas" in cli_error(capsys, "train", "--adam-betas", "0.9", *out)
    assert "runs as one command" in cli_error(capsys, "merge", "--model", "sd", "--dataset", "folder", "--pretrained",
                                              str(tmp_path), "--data-dir", str(tmp_path), *out)
    assert "never trained" in cli_error(capsys, "evaluate", "--pretrained", "", *out)


@pytest.mark.machinery
def test_missing_or_empty_data_is_a_clear_error(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run"), "--device", "cpu"]
    assert "does not exist" in cli_error(capsys, "train", "--dataset", "folder", "--data-dir",
                                         str(tmp_path / "nowhere"), *out)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("text")
    assert "no readable images" in cli_error(capsys, "train", "--dataset", "folder", "--data-dir",
                                             str(tmp_path / "junk"), *out)
    assert "--download" in cli_error(capsys, "train", "--dataset", "cifar10", "--preset", "tiny", "--image-size", "32",
                                     "--data-dir", str(tmp_path), *out)


@pytest.mark.machinery
def test_bad_checkpoints_are_a_clear_error(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run"), "--device", "cpu", "--steps", "1"]
    assert "no such file" in cli_error(capsys, "finetune", "--pretrained", str(tmp_path / "none.pt"), *out)
    good = tmp_path / "good.pt"
    torch.save(UNet.from_preset("tiny").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    assert "truncated.pt" in cli_error(capsys, "finetune", "--pretrained", str(truncated), *out)
    other = tmp_path / "other.pt"
    torch.save(UNet.from_preset("tiny", ch=64).state_dict(), other)
    line = cli_error(capsys, "finetune", "--pretrained", str(other), "--preset", "tiny", *out)
    assert "conv_in.weight" in line or "preset" in line


@pytest.mark.machinery
def test_an_unwritable_run_folder_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    assert "cannot write to the run folder" in cli_error(capsys, "train", "--out", str(tmp_path / "file" / "run"))


@pytest.mark.machinery
def test_an_inception_file_with_the_wrong_hash_is_refused(capsys, tmp_path):
    from PIL import Image
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    bad = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    line = cli_error(capsys, "fid", str(tmp_path / "a"), str(tmp_path / "b"), "--inception-weights", str(bad),
                     "--device", "cpu")
    assert "6726825d" in line


@pytest.mark.machinery
def test_errors_reach_the_shell_as_one_line_and_exit_code_2(tmp_path):
    proc = run_cli("finetune", "--p-global", "2", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --p-global 2.0 is not a probability; give a value in [0, 1]"]


# Tests for decoupled timesteps and merge (DeMe Eqs. 6-8).



def make_state_dicts(n=4, seed=0, half=True):
    """A base state dict θ0 (mixed shapes, a float16 tensor, an int64 buffer) and n finetuned copies."""
    g = torch.Generator().manual_seed(seed)
    base = {"conv.weight": torch.randn(8, 3, 3, 3, generator=g), "conv.bias": torch.randn(8, generator=g),
            "proj.weight": torch.randn(16, 8, generator=g), "scale": torch.randn((), generator=g),
            "bn.num_batches_tracked": torch.tensor(100)}
    if half:
        base["attn.weight"] = torch.randn(32, 32, generator=g).half()
    finetuned = []
    for i in range(n):
        sd = {k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v + 7 * (i + 1)
              for k, v in base.items()}
        finetuned.append(sd)
    return base, finetuned


def assert_state_dicts_close(a, b, atol=1e-6, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 3, 1))


# ----------------------------------------------------------------------------- merges

@pytest.mark.part3
def test_all_zero_weights_give_the_base_model_exactly():
    base, finetuned = make_state_dicts()
    merged = merge(base, finetuned, weights=[0.0] * 4)
    assert all(torch.equal(merged[k], base[k]) and merged[k].dtype == base[k].dtype for k in base)


@pytest.mark.part3
def test_one_model_with_weight_one_gives_that_model():
    base, finetuned = make_state_dicts(n=1)
    merged = merge(base, finetuned, weights=[1.0])
    assert_state_dicts_close({k: v for k, v in merged.items() if v.is_floating_point()},
                             {k: v for k, v in finetuned[0].items() if v.is_floating_point()})


@pytest.mark.part3
def test_average_is_the_mean_of_the_finetuned_models_and_ignores_weights():
    base, finetuned = make_state_dicts(half=False)
    merged = merge(base, finetuned, weights=[5.0, 0.0, 0.0, 0.0], method="average")
    mean = {k: torch.stack([sd[k] for sd in finetuned]).mean(0) for k in base if base[k].is_floating_point()}
    assert_state_dicts_close({k: merged[k] for k in mean}, mean)


@pytest.mark.part3
def test_task_arithmetic_with_uniform_weights_equals_the_average():
    base, finetuned = make_state_dicts()
    average = merge(base, finetuned, method="average")
    assert_state_dicts_close(merge(base, finetuned, weights=[0.25] * 4), average)
    assert_state_dicts_close(merge(base, finetuned), average)  # default weights are 1/N


@pytest.mark.part3
def test_task_arithmetic_is_theta0_plus_the_weighted_sum_of_task_vectors():
    base, finetuned = make_state_dicts(half=False)
    w = [0.1, 0.1, 0.2, 0.5]  # the official LSUN-Church weights
    merged, taus = merge(base, finetuned, weights=w), task_vectors(base, finetuned)
    assert set(taus[0]) == {k for k in base if base[k].is_floating_point()}  # integer buffers have no τ
    for k in taus[0]:
        torch.testing.assert_close(merged[k], base[k] + sum(w_i * tau[k] for w_i, tau in zip(w, taus)))


@pytest.mark.part3
def test_ties_with_k100_and_agreeing_signs_is_the_mean_task_vector():
    base, _ = make_state_dicts(half=False)
    g = torch.Generator().manual_seed(1)
    signs = {k: torch.randn(v.shape, generator=g).sign() for k, v in base.items() if v.is_floating_point()}
    finetuned = [{k: base[k] + signs[k] * torch.rand(base[k].shape, generator=g) if k in signs else base[k]
                  for k in base} for _ in range(3)]
    merged = merge(base, finetuned, method="ties", k=100, lam=1.0)
    for k in signs:
        torch.testing.assert_close(merged[k], torch.stack([sd[k] for sd in finetuned]).mean(0))


@pytest.mark.part3
def test_ties_keeps_only_the_top_k_percent_of_each_task_vector():
    base, finetuned = make_state_dicts(n=1)
    merged = merge(base, finetuned, method="ties", k=20)
    for k, v in base.items():
        if not v.is_floating_point():
            continue
        tau = (finetuned[0][k].float() - v.float()).flatten()
        changed = (merged[k] != v).flatten()
        assert changed.sum() == max(1, round(0.2 * v.numel())), k
        if not changed.all():
            assert tau[changed].abs().min() >= tau[~changed].abs().max(), k  # the largest magnitudes survive


@pytest.mark.part3
def test_ties_drops_the_entries_that_disagree_with_the_elected_sign():
    base = {"w": torch.zeros(10)}
    finetuned = [{"w": torch.full((10,), 1.0)}, {"w": torch.full((10,), 2.0)}, {"w": torch.full((10,), -4.0)}]
    merged = merge(base, finetuned, method="ties", k=100, lam=0.5)
    torch.testing.assert_close(merged["w"], torch.full((10,), 0.5 * -4.0))  # Σ = -1 elects "-": only -4 survives


@pytest.mark.part3
def test_dare_with_p0_is_task_arithmetic():
    base, finetuned = make_state_dicts()
    w = [0.1, 0.1, 0.2, 0.5]
    assert_state_dicts_close(merge(base, finetuned, w, method="dare", p=0.0), merge(base, finetuned, w))


@pytest.mark.part3
def test_dare_is_reproducible_by_seed_and_unbiased_over_seeds():
    base, finetuned = make_state_dicts(n=2, half=False)
    w = [0.5, 1.0]
    target = merge(base, finetuned, w)
    assert_state_dicts_close(merge(base, finetuned, w, "dare", p=0.5, seed=3),
                             merge(base, finetuned, w, "dare", p=0.5, seed=3))
    assert not torch.equal(merge(base, finetuned, w, "dare", p=0.5, seed=3)["proj.weight"],
                           merge(base, finetuned, w, "dare", p=0.5, seed=4)["proj.weight"])
    merges = [merge(base, finetuned, w, "dare", p=0.5, seed=s) for s in range(400)]
    for k in ["conv.weight", "proj.weight"]:
        tau_m = target[k] - base[k]
        mean = torch.stack([m[k] for m in merges]).mean(0) - base[k]
        assert (mean - tau_m).norm() / tau_m.norm() < 0.1, k


@pytest.mark.part3
@pytest.mark.parametrize("method", ["task_arithmetic", "average", "ties", "dare"])
def test_integer_buffers_pass_through_from_the_base_untouched(method):
    base, finetuned = make_state_dicts()
    merged = merge(base, finetuned, method=method)
    assert merged["bn.num_batches_tracked"].dtype == torch.int64 and merged["bn.num_batches_tracked"].item() == 100
    assert merged["attn.weight"].dtype == torch.float16


@pytest.mark.part3
def test_float16_weights_come_back_float16_and_are_computed_in_float32():
    base, finetuned = make_state_dicts()
    w = [0.1, 0.1, 0.2, 0.5]
    merged = merge(base, finetuned, w)["attn.weight"]
    theta = [sd["attn.weight"] for sd in finetuned]
    exact = (base["attn.weight"].double() + sum(w_i * (t.double() - base["attn.weight"].double())
                                               for w_i, t in zip(w, theta))).half()
    in_fp16 = base["attn.weight"] + sum(torch.tensor(w_i).half() * (t - base["attn.weight"])
                                        for w_i, t in zip(w, theta))
    assert merged.dtype == torch.float16 and torch.equal(merged, exact)
    assert not torch.equal(in_fp16, exact)  # fp16 arithmetic would have rounded differently


@pytest.mark.part3
def test_a_merged_state_dict_loads_into_a_real_network_and_w0_reproduces_theta0():
    torch.manual_seed(0)
    nets = [small_net() for _ in range(4)]
    x = torch.randn(2, 3, 8, 8)
    base, finetuned = nets[0].state_dict(), [n.state_dict() for n in nets[1:]]
    merged_net = small_net()
    merged_net.load_state_dict(merge(base, finetuned, weights=[0.0, 0.0, 0.0]))
    torch.testing.assert_close(merged_net(x), nets[0](x), atol=0, rtol=0)
    merged_net.load_state_dict(merge(base, finetuned, weights=[0.0, 1.0, 0.0]))
    torch.testing.assert_close(merged_net(x), nets[2](x))


@pytest.mark.part3
def test_merge_mistakes_raise_user_errors():
    base, finetuned = make_state_dicts()
    renamed = dict(finetuned[1])
    renamed["conv.weights"] = renamed.pop("conv.weight")
    with pytest.raises(AssertionError, match="keys"):
        merge(base, [finetuned[0], renamed])
    with pytest.raises(AssertionError, match="weights"):
        merge(base, finetuned, weights=[0.5, 0.5])
    with pytest.raises(AssertionError, match="soup"):
        merge(base, finetuned, method="soup")
    with pytest.raises(AssertionError, match="'p'"):
        merge(base, finetuned, method="ties", p=0.5)
    # the user's values are checked where they enter, before any work (check_config)
    for given in (dict(merge_method="ties", ties_k=0.0), dict(merge_method="dare", dare_p=1.0)):
        with pytest.raises(UserError, match="--ties-k 0.0 must|--dare-p 1.0 must"):
            deme.resolve_config(given)


# ----------------------------------------------------------------------------- timestep ranges and sampling

@pytest.mark.part2
def test_timestep_ranges_split_0_to_T_into_n_equal_contiguous_ranges():
    assert timestep_ranges(4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    eight = timestep_ranges(8)
    assert len(eight) == 8 and eight[0][0] == 0 and eight[-1][1] == 1000
    assert all(hi - lo == 125 for lo, hi in eight) and all(a[1] == b[0] for a, b in zip(eight, eight[1:]))
    for n in (3, 7):  # when n does not divide T, range i is exactly the t that Eq. 7 routes to model i
        for i, (lo, hi) in enumerate(timestep_ranges(n)):
            assert all(t * n // 1000 == i for t in range(lo, hi))
    for bad in (0, 1001, 2.5):
        with pytest.raises(AssertionError):
            timestep_ranges(bad)


@pytest.mark.part2
def test_sampled_timesteps_stay_in_their_range_when_p_is_0():
    g = torch.Generator().manual_seed(0)
    for lo, hi in timestep_ranges(4):
        for per_batch in (True, False):
            t = sample_timesteps(63, lo, hi, p=0.0, per_batch=per_batch, generator=g)
            assert t.dtype == torch.int64 and t.shape == (63,) and t.min() >= lo and t.max() < hi


@pytest.mark.part2
def test_sampled_timesteps_cover_all_of_0_to_T_when_p_is_1():
    g = torch.Generator().manual_seed(0)
    t = torch.cat([sample_timesteps(64, 0, 250, p=1.0, generator=g) for _ in range(200)])
    assert set(t.tolist()) == set(range(1000))


@pytest.mark.part2
def test_a_fraction_p_of_batches_is_drawn_from_all_timesteps():
    g = torch.Generator().manual_seed(0)
    batches = [sample_timesteps(16, 0, 250, p=0.3, generator=g) for _ in range(2000)]
    frac_global = sum(bool((b >= 250).any()) for b in batches) / 2000  # a global antithetic pair always leaves [0,250)
    assert abs(frac_global - 0.3) < 0.04


@pytest.mark.part2
def test_per_sample_coins_draw_a_fraction_p_of_samples_from_all_timesteps():
    g = torch.Generator().manual_seed(0)
    t = torch.cat([sample_timesteps(16, 0, 250, p=0.3, per_batch=False, antithetic=False, generator=g)
                   for _ in range(2000)])
    assert abs((t >= 250).float().mean().item() - 0.3 * 0.75) < 0.02  # a global draw lands outside w.p. 0.75


@pytest.mark.part2
def test_antithetic_pairs_sum_to_a_plus_b_minus_1_of_their_interval():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(9, 250, 500, p=0.0, generator=g)
    assert t.shape == (9,) and (t[:4] + t[5:9] == 749).all()
    t = sample_timesteps(8, 250, 500, p=1.0, generator=g)
    assert (t[:4] + t[4:] == 999).all()
    for _ in range(50):  # per-sample coins: each pair shares its own interval
        t = sample_timesteps(16, 250, 500, p=0.5, per_batch=False, generator=g)
        assert set((t[:8] + t[8:]).tolist()) <= {749, 999}


@pytest.mark.part2
def test_the_same_generator_seed_gives_the_same_timesteps():
    a = sample_timesteps(32, 500, 750, generator=torch.Generator().manual_seed(7))
    b = sample_timesteps(32, 500, 750, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.part2
def test_invalid_sampling_arguments_fail_an_assertion_and_reach_users_as_one_line():
    for kwargs in (dict(p=-0.1), dict(p=1.5), dict(lo=250, hi=250), dict(lo=900, hi=1100), dict(lo=-1, hi=10)):
        with pytest.raises(AssertionError):
            sample_timesteps(8, **{"lo": 0, "hi": 250, **kwargs})
    with pytest.raises(UserError, match="--p-global 1.5"):
        deme.resolve_config(dict(p_global=1.5))


# ----------------------------------------------------------------------------- ensemble

class TaggedModel(nn.Module):
    """A stand-in denoiser that adds 1000 * its index and records the timesteps it was given."""

    def __init__(self, index):
        super().__init__()
        self.index = nn.Parameter(torch.tensor(float(index)))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return x + 1000 * self.index


@pytest.mark.part3
def test_range_ensemble_routes_every_timestep_to_its_model_and_keeps_batch_order():
    models = [TaggedModel(i) for i in range(4)]
    ensemble = RangeEnsemble(models)
    assert len(list(ensemble.parameters())) == 4  # registered as submodules
    t = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    x = torch.arange(1000.0).view(1000, 1, 1, 1)  # x encodes the sample's position in the batch
    with torch.no_grad():
        out = ensemble(x, t)
    assert torch.equal(out.flatten(), torch.arange(1000.0) + 1000 * (t * 4 // 1000).float())
    for i, m in enumerate(models):
        assert all((s * 4 // 1000 == i).all() for s in m.seen)
    with torch.no_grad():
        assert torch.equal(ensemble(x[:3], 600).flatten(), torch.arange(3.0) + 2000)  # an int t: one model


# ----------------------------------------------------------------------------- merge-weight search

def quadratic(w_star, curvature):
    def objective(w):
        calls.append(tuple(w))
        d = torch.tensor(w, dtype=torch.float64) - torch.tensor(w_star, dtype=torch.float64)
        return float(d @ curvature @ d)
    calls = []
    return objective, calls


@pytest.mark.part3
def test_search_finds_an_interior_optimum_without_repeating_evaluations():
    w_star = (0.1, 0.1, 0.2, 0.5)  # like the official LSUN-Church weights
    curvature = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)) + 0.3
    objective, calls = quadratic(w_star, curvature)
    result = search_merge_weights(objective, 4, progress=False)
    assert all(abs(a - b) <= 0.05 for a, b in zip(result["weights"], w_star)), result["weights"]
    assert result["evals"] == len(calls) == len(result["path"]) <= 60
    assert len(set(calls)) == len(calls)  # no point scored twice
    assert [tuple(p["w"]) for p in result["path"]] == calls  # the path is in evaluation order
    assert result["value"] == min(p["value"] for p in result["path"]) == objective(tuple(result["weights"]))


@pytest.mark.part3
def test_search_is_deterministic_respects_max_evals_and_clips_weights():
    objective, _ = quadratic((2.0, -1.0), torch.eye(2, dtype=torch.float64))
    assert search_merge_weights(objective, 2, progress=False) == search_merge_weights(objective, 2, progress=False)
    assert search_merge_weights(objective, 2, progress=False)["weights"] == [1.5, 0.0]  # w clipped to [0, 1.5]
    assert search_merge_weights(objective, 2, max_evals=4, progress=False)["evals"] == 4


@pytest.mark.part3
def test_the_samples_objective_ranks_theta0_the_loss_optimum_and_the_grids_shapes():
    path = [dict(w=[0.1, 0.2], value=3.0), dict(w=[0.5, 0.5], value=1.0), dict(w=[0.3, 0.0], value=2.0)]
    candidates = sample_candidates(path, 2, 10)
    assert candidates[:2] == [[0.0, 0.0], [0.5, 0.5]]  # θ0, and the loss search's optimum
    # then the shapes: shared scales and weights rising with t, each once (the optimum is the shape s = 0.5 here)
    assert candidates[2:] == [[0.25, 0.5], [0.25, 0.25], [0.5, 1.0], [0.75, 0.75], [1.0, 1.0]]
    assert sample_candidates(path, 2, 3) == candidates[:3]
    assert sample_candidates(path, 4, 8)[3] == [0.125, 0.25, 0.375, 0.5]  # the official LSUN-Church weights' shape


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: Fréchet distance, FID Inception, statistics files, sample generation, pixel Fréchet distance
# ---------------------------------------------------------------------------------------------------------------------

def _random_spd(d, rng, rank=None):
    """A random symmetric PSD matrix (d, d) of the given rank (full by default)."""
    A = rng.standard_normal((d, rank or d))
    return A @ A.T / (rank or d)


@pytest.mark.part4
def test_frechet_with_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    mu1, mu2, sigma = rng.standard_normal(32), rng.standard_normal(32), _random_spd(32, rng)
    expected = np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@pytest.mark.part4
def test_frechet_with_commuting_covariances_is_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2, a, b = rng.standard_normal(16), rng.standard_normal(16), rng.uniform(0.1, 3, 16), rng.uniform(0, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    Q, _ = np.linalg.qr(rng.standard_normal((16, 16)))  # same in any rotated basis, even with zero eigenvalues
    a[:5], b[3:8] = 0, 0
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(Q @ mu1, Q @ np.diag(a) @ Q.T, Q @ mu2, Q @ np.diag(b) @ Q.T)
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.part4
def test_frechet_of_a_sample_against_itself_is_zero():
    features = np.random.default_rng(2).standard_normal((300, 64)) * np.linspace(0.1, 5, 64)
    mu, sigma = feature_stats(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


@pytest.mark.part4
def test_frechet_with_singular_covariances_equals_nuclear_norm_reference():
    # 50 samples in 100 dims: S = A A^T, so tr (S1 S2)^(1/2) is the nuclear norm of A1^T A2 (exact, well conditioned).
    rng = np.random.default_rng(3)
    x1, x2 = rng.standard_normal((50, 100)), 0.5 + 2 * rng.standard_normal((50, 100)) @ _random_spd(100, rng)
    (mu1, sigma1), (mu2, sigma2) = feature_stats(x1), feature_stats(x2)
    A1, A2 = (x1 - mu1).T / np.sqrt(49), (x2 - mu2).T / np.sqrt(49)  # (100, 50)
    nuclear = np.linalg.svd(A1.T @ A2, compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * nuclear
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-9)


@pytest.mark.part4
@pytest.mark.extras
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy.linalg.sqrtm's `disp`, used by pytorch-fid
def test_frechet_matches_pytorch_fid_on_full_rank_statistics():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(4)
    (mu1, sigma1), (mu2, sigma2) = feature_stats(rng.standard_normal((400, 24))), feature_stats(
        1 + rng.standard_normal((400, 24)) @ _random_spd(24, rng))
    reference = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)  # scipy.linalg.sqrtm
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-8)


@pytest.mark.part4
def test_frechet_of_mismatched_shapes_is_a_user_error_at_the_edge_and_an_assertion_inside(tmp_path):
    save_stats(tmp_path / "a.npz", np.zeros(3), np.eye(3))
    save_stats(tmp_path / "b.npz", np.zeros(4), np.eye(4))
    with pytest.raises(UserError, match="do not match"):
        fid_command(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    save_stats(tmp_path / "c.npz", np.zeros(3), np.full((3, 3), np.nan))
    with pytest.raises(UserError, match="no finite Gaussian statistics"):
        load_stats(tmp_path / "c.npz")
    with pytest.raises(AssertionError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _smooth_images(n, size, seed):
    """n images (n, 3, size, size) in [0, 1] that differ in colour and layout, not just in noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def calibrated_weights(tmp_path_factory):
    """A random FID-Inception state dict whose BatchNorm statistics are calibrated on a batch: with default init the features barely depend
    on the input, and any comparison would pass."""
    from torchvision.models.inception import Inception3
    folder = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    torch.save(Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict(), folder / "raw.pth")
    model = FIDInception(folder / "raw.pth", check_hash=False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: running stats = this batch's stats
    model.train()
    with torch.no_grad():
        model(_smooth_images(8, 32, seed=0))
    torch.save(model.state_dict(), folder / "calibrated.pth")
    return folder / "calibrated.pth"


def _pytorch_fid_inception(weights, monkeypatch):
    """pytorch-fid's InceptionV3([3]) with the given weights instead of the downloaded ones."""
    inception = pytest.importorskip("pytorch_fid.inception")
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *args, **kwargs: torch.load(weights))
    return inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()


@pytest.mark.part4
@pytest.mark.extras
def test_fid_inception_equals_pytorch_fid_with_the_same_weights(calibrated_weights, monkeypatch):
    ours = FIDInception(calibrated_weights, check_hash=False)
    theirs = _pytorch_fid_inception(calibrated_weights, monkeypatch)
    for size in (32, 64):
        x = _smooth_images(4, size, seed=size)
        with torch.no_grad():
            f_ours, f_theirs = ours(x), theirs(x)[0].flatten(1)  # (4, 2048)
        assert f_ours.shape == (4, 2048) and f_ours.dtype == torch.float32
        assert (f_ours.std(0).mean() / f_ours.abs().mean()) > 1e-2, "features do not depend on the input"
        assert ((f_ours - f_theirs).abs().max() / f_theirs.abs().max()) < 1e-4


@pytest.mark.part4
@pytest.mark.extras
def test_the_comparison_detects_a_missing_tensorflow_pooling_patch(calibrated_weights, monkeypatch):
    from torchvision.models.inception import InceptionA, InceptionE
    ours = FIDInception(calibrated_weights, check_hash=False)
    theirs = _pytorch_fid_inception(calibrated_weights, monkeypatch)
    x = _smooth_images(2, 32, seed=5)
    with torch.no_grad():
        f_ours = ours(x)
    mixed_5b, mixed_7c = theirs.blocks[2][0], theirs.blocks[3][2]
    for block, unpatched in ((mixed_5b, InceptionA), (mixed_7c, InceptionE)):  # padded avg pool; avg instead of max
        patched, block.__class__ = block.__class__, unpatched  # torchvision's forward, same weights
        with torch.no_grad():
            f_unpatched = theirs(x)[0].flatten(1)
        block.__class__ = patched
        assert ((f_ours - f_unpatched).abs().max() / f_ours.abs().max()) > 1e-2


@pytest.mark.part4
def test_weights_with_a_wrong_sha256_are_refused_unless_unchecked(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"not": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="SHA-256 [0-9a-f]{64}"):
        FIDInception(path)
    with pytest.raises(UserError, match="does not hold the FID Inception"):  # unchecked: architecture still checked
        FIDInception(path, check_hash=False)
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read"):
        FIDInception(path, check_hash=False)


@pytest.mark.part4
def test_missing_weights_offline_name_the_url_and_the_destination(tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        open(dst, "wb").write(b"half a file")
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    destination = tmp_path / "checkpoints" / FID_WEIGHTS_NAME
    with pytest.raises(UserError) as error:
        FIDInception()
    assert FID_WEIGHTS_URL in str(error.value) and str(destination) in str(error.value) and "\n" not in str(error.value)
    assert os.listdir(tmp_path / "checkpoints") == []  # nothing half-written left behind
    with pytest.raises(UserError, match="does not exist"):
        FIDInception(tmp_path / "elsewhere.pth")


@pytest.mark.part4
@pytest.mark.extras
def test_missing_weights_are_downloaded_once_into_the_hub_cache(calibrated_weights, tmp_path, monkeypatch):
    calls = []
    def download(url, dst, *args, **kwargs):
        calls.append(url)
        open(dst, "wb").write(calibrated_weights.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    FIDInception(check_hash=False)
    FIDInception(check_hash=False)
    assert calls == [FID_WEIGHTS_URL] and os.listdir(tmp_path / "checkpoints") == [FID_WEIGHTS_NAME]


@pytest.mark.part4
@pytest.mark.extras
def test_stats_npz_round_trip_is_readable_by_pytorch_fid(tmp_path):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    mu, sigma = feature_stats(np.random.default_rng(5).standard_normal((20, 6)))
    save_stats(tmp_path / "stats.npz", mu, sigma)
    assert sorted(os.listdir(tmp_path)) == ["stats.npz"]
    m, s = fid_score.compute_statistics_of_path(str(tmp_path / "stats.npz"), None, 1, 2048, "cpu")
    assert np.array_equal(m, mu) and np.array_equal(s, sigma)
    assert all(np.array_equal(a, b) for a, b in zip(load_stats(tmp_path / "stats.npz"), (mu, sigma)))


@pytest.mark.part4
def test_fid_command_on_two_npz_files_is_their_frechet_distance(tmp_path, capsys):
    rng = np.random.default_rng(6)
    stats_a, stats_b = feature_stats(rng.standard_normal((30, 8))), feature_stats(1 + rng.standard_normal((30, 8)))
    save_stats(tmp_path / "a.npz", *stats_a)
    save_stats(tmp_path / "b.npz", *stats_b)
    fid = fid_command(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))  # needs no Inception weights
    assert fid == frechet_distance(*stats_a, *stats_b)
    assert capsys.readouterr().out.strip() == f"FID:  {fid}"


def _write_pngs(folder, n, seed):
    from PIL import Image
    folder.mkdir(parents=True)
    for i, pixels in enumerate(images_to_uint8(_smooth_images(n, 32, seed) * 2 - 1)):
        Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.mark.part4
@pytest.mark.extras
def test_fid_command_on_image_folders_and_on_their_saved_statistics(calibrated_weights, tmp_path, capsys):
    _write_pngs(tmp_path / "a", 3, seed=7)
    _write_pngs(tmp_path / "b", 3, seed=8)
    fid = fid_command(tmp_path / "a", tmp_path / "b", batch_size=3, inception_weights=calibrated_weights,
                      check_hash=False)
    assert np.isfinite(fid) and fid > 0
    model = FIDInception(calibrated_weights, check_hash=False)
    stats = inception_statistics(png_batches(image_files(tmp_path / "a")), 3, model, Env(torch.device("cpu")))
    save_stats(tmp_path / "a.npz", *stats)  # an .npz in place of folder a gives the same FID
    assert fid_command(tmp_path / "a.npz", tmp_path / "b", batch_size=3, inception_weights=calibrated_weights,
                       check_hash=False) == pytest.approx(fid, rel=1e-6)


@pytest.mark.machinery
def test_image_files_are_recursive_sorted_and_skip_unreadable_files(tmp_path, capsys):
    _write_pngs(tmp_path / "imgs" / "sub", 2, seed=9)
    _write_pngs(tmp_path / "imgs" / "a", 1, seed=10)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    names = [p.relative_to(tmp_path / "imgs").as_posix() for p in image_files(tmp_path / "imgs")]
    assert names == ["a/0.png", "sub/0.png", "sub/1.png"]
    assert "broken.png" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserError):
            image_files(folder)


@pytest.mark.part4
def test_uint8_conversion_matches_torchvision_save_image(tmp_path):
    from PIL import Image
    from torchvision.utils import save_image
    x = torch.linspace(-1.2, 1.2, 3 * 8 * 8).reshape(1, 3, 8, 8)
    save_image(x[0] * 0.5 + 0.5, tmp_path / "tv.png")
    assert np.array_equal(images_to_uint8(x)[0], np.array(Image.open(tmp_path / "tv.png")))


@pytest.mark.part4
def test_written_samples_do_not_depend_on_batch_size_processes_or_resume(tmp_path, monkeypatch):
    from PIL import Image
    def read(folder):
        return {p.name: np.array(Image.open(p)) for p in sorted(folder.iterdir())}
    made = []
    def sample_batch(cfg, env, diffusion, model, indices, seed, shape):  # a deterministic stand-in for a sampler
        made.append(len(indices))
        return torch.tanh(SampleNoise(seed, indices, shape)())
    monkeypatch.setattr(deme, "sample_batch", sample_batch)
    monkeypatch.setattr(deme.Env, "barrier", lambda self: None)  # the ranks of a world of 2, one after the other
    model = tiny_theta0()
    def write(run, eval_batch, rank=0, world=1):
        cfg = tiny_cfg(tmp_path / run, n_samples=10, eval_batch=eval_batch)
        return write_samples(cfg, dataclasses.replace(setup_env(cfg), rank=rank, world=world), None, model, "m")
    for rank in (0, 1):
        two = write("two", 4, rank, world=2)
    one = write("one", 3)
    two, one = read(two), read(one)
    assert list(two) == [f"{i:06d}.png" for i in range(10)] and list(one) == list(two)
    assert all(np.array_equal(two[k], one[k]) for k in two) and two["000000.png"].shape == (16, 16, 3)
    (tmp_path / "one" / "run" / "samples" / "m" / "000002.png").unlink()
    (tmp_path / "one" / "run" / "samples" / "m" / "000007.png").unlink()
    made.clear()
    again = read(write("one", 4))
    assert made == [2] and list(again) == list(one) and all(np.array_equal(v, one[k]) for k, v in again.items())
    write("one", 3)
    assert made == [2]  # nothing left to make


@pytest.mark.part4
def test_pixel_frechet_is_zero_for_identical_sets_and_dims_c2_for_a_shift(capsys):
    x = torch.rand(500, 3, 4, 4, generator=torch.Generator().manual_seed(11)) * 2 - 1  # N = 500 >= 10 x 48 dims
    assert abs(pixel_frechet(x, x)) < 1e-9
    assert pixel_frechet(x, x + 0.25) == pytest.approx(48 * 0.25 ** 2, rel=1e-9)
    assert pixel_frechet(x, x + 0.25, pool=2) == pytest.approx(12 * 0.25 ** 2, rel=1e-9)
    assert capsys.readouterr().err == ""
    pixel_frechet(x[:100], x[100:200])
    assert "N=100 < 10 x 48" in capsys.readouterr().err


# ----------------------------------------------------------------------------- analysis figures (Fig. 1a, 6a, 6b)

def tiny_theta0(seed=0, projections=False):
    torch.manual_seed(seed)
    model = UNet.from_preset("tiny").eval()
    return deme.add_channel_projections(model) if projections else model


def perturbed(state_dict, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state_dict.items()}


@pytest.mark.part4
def test_gradient_conflict_is_a_symmetric_cosine_matrix_with_ones_on_the_diagonal():
    cos = deme.gradient_conflict(tiny_theta0(), deme.GaussianDiffusion(), deme.synthetic_images(8, 16),
                                 [50, 500, 950], deme.Env(torch.device("cpu")), batch=4)
    assert cos.shape == (3, 3)
    assert np.array_equal(cos, cos.T)
    np.testing.assert_allclose(np.diag(cos), 1.0, atol=1e-6)
    assert (cos >= -1).all() and (cos <= 1).all()
    assert not np.allclose(cos, 1.0, atol=1e-3)  # a real UNet's gradients do differ between timesteps


@pytest.mark.part4
def test_gradient_conflict_batches_only_for_memory():
    args = (tiny_theta0(), deme.GaussianDiffusion(), deme.synthetic_images(8, 16), [100, 900],
            deme.Env(torch.device("cpu")))
    np.testing.assert_allclose(deme.gradient_conflict(*args, batch=2), deme.gradient_conflict(*args, batch=8),
                               atol=1e-5)


@pytest.mark.part4
def test_a_model_whose_loss_gradient_is_the_same_at_every_t_shows_no_conflict():
    class BiasOnly(nn.Module):
        """ε_θ(x_t, t) = b: with the same noise at every t (common random numbers), ∇_b of the loss ignores t."""

        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.full((3, 1, 1), 0.5))

        def forward(self, x, t):
            return self.b.expand_as(x)

    cos = deme.gradient_conflict(BiasOnly(), deme.GaussianDiffusion(), deme.synthetic_images(8, 16),
                                 [100, 300, 500, 700, 900], deme.Env(torch.device("cpu")), batch=3)
    np.testing.assert_allclose(cos, np.ones((5, 5)), atol=1e-6)


@pytest.mark.machinery
def test_the_merge_landscape_passes_through_theta0_and_both_finetuned_models():
    base = tiny_theta0().state_dict()
    finetuned = [perturbed(base, 0.01 * (r + 1), seed=r) for r in range(3)]
    diffusion, env, images = deme.GaussianDiffusion(), deme.Env(torch.device("cpu")), deme.synthetic_images(8, 16)
    model = UNet.from_preset("tiny")

    def loss(state_dict):
        model.load_state_dict(state_dict)
        return deme.heldout_loss(model, diffusion, images, env)[0]

    values = deme.merge_landscape(base, finetuned, 0, 2, loss, grid=[0.0, 0.5, 1.0])
    assert values.shape == (3, 3)
    assert values[0, 0] == pytest.approx(loss(base), rel=1e-6)                    # (0, 0) is θ0
    assert values[2, 0] == pytest.approx(loss(finetuned[0]), rel=1e-5)            # (1, 0) is θ_i
    assert values[0, 2] == pytest.approx(loss(finetuned[2]), rel=1e-5)            # (0, 1) is θ_j
    assert values[1, 2] == pytest.approx(loss(deme.merge(base, finetuned, [0.5, 0.0, 1.0])), rel=1e-6)  # Eq. 8


@pytest.mark.machinery
def test_a_zero_task_vector_has_zero_norm_in_every_layer():
    base = tiny_theta0(projections=True).state_dict()
    norms = deme.task_vector_norms(base, [{k: v.clone() for k, v in base.items()}, perturbed(base, 0.01, seed=1)])
    assert (norms["norms"][0] == 0).all() and norms["total"][0] == 0
    assert (norms["norms"][1] > 0).all() and norms["total"][1] > 0


@pytest.mark.part4
def test_per_layer_squared_norms_sum_to_the_total_squared_norm():
    base = tiny_theta0(projections=True).state_dict()
    norms = deme.task_vector_norms(base, [perturbed(base, 0.01 * (r + 1), seed=r) for r in range(3)])
    assert norms["layers"] == ["temb", "conv_in", "down.0", "down.1", "down.2", "mid", "up.2", "up.1", "up.0", "out",
                               "projections"]  # every key in one layer, in the order of the forward pass
    assert norms["norms"].shape == (3, 11)
    np.testing.assert_allclose((norms["norms"] ** 2).sum(1), norms["total"] ** 2, rtol=1e-10)
    flat = lambda sd: torch.cat([v.double().flatten() for v in sd.values()])
    np.testing.assert_allclose(np.sqrt((norms["base"] ** 2).sum()), flat(base).norm().item(), rtol=1e-10)


@pytest.mark.part4
def test_a_task_vector_inside_one_layer_shows_only_in_that_layer():
    base = tiny_theta0().state_dict()
    theta = {k: v.clone() for k, v in base.items()}
    theta["mid.attn_1.q.weight"] += 0.5
    norms = deme.task_vector_norms(base, [theta])
    (nonzero,) = np.flatnonzero(norms["norms"][0])
    assert norms["layers"][nonzero] == "mid"
    assert norms["total"][0] == pytest.approx(0.5 * base["mid.attn_1.q.weight"].numel() ** 0.5)


@pytest.fixture(scope="module")
def analysis_run(tmp_path_factory):
    """A run folder with θ0 and two finished "finetuned" ranges (θ0 plus noise, in train_loop's checkpoint format)
    and a merge record; θ0 itself is handed to the stage, as the pipeline does."""
    out = tmp_path_factory.mktemp("analysis_run")
    theta0 = tiny_theta0()
    base = deme.merge_base(theta0, with_projections=True)
    for r in range(2):
        sd = perturbed(base, 0.01 * (r + 1), seed=r)
        (out / f"range_{r}").mkdir()
        deme.atomic_save(dict(model=sd, ema=sd, step=2, identity=dict(steps=2), model_config=theta0.config),
                         out / f"range_{r}" / "ckpt.pt")
    (out / "merge").mkdir()
    (out / "merge" / "search.json").write_text(json.dumps(dict(method="task_arithmetic", weights=[0.3, 0.6])))
    cfg = deme.Config(out=str(out), n_ranges=2, search_images=8, conflict_timesteps=4, landscape_points=8, batch_size=4,
                      device="cpu", search_samples=8, sample_steps=2)
    return cfg, theta0


class _SignedConstant(nn.Module):
    """ε_θ(x_t, t) = w for t < T/2 and -w after: each half of [0, T) pulls w towards the noise's mean with its own
    sign, so their gradients conflict and cancel at w = 0, the stationary point of the loss with t uniform."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.full((3, 1, 1), float(w)))

    def forward(self, x, t):
        return self.w * torch.where(t < 500, 1.0, -1.0).view(-1, 1, 1, 1).expand_as(x)


@pytest.mark.part4
def test_per_range_gradients_cancel_at_a_stationary_point_and_not_elsewhere():
    images, env, d = synthetic_images(16, 8, seed=0), Env(torch.device("cpu")), GaussianDiffusion()
    at = range_gradients(_SignedConstant(0.0), d, images, env, n_ranges=4, batch=5, seed=1)
    assert at.shape == (2, 4, 3) and not torch.allclose(at[0], at[1])  # the two halves of the images
    st = stationarity(at.sum(0))
    # each range pulls, and together they cancel (exactly only with the same noise in every range)
    assert st["ratio"] < 1e-6 and min(st["norms"]) > 1e-3
    assert st["cos"][0, 1] == pytest.approx(1.0) and st["cos"][0, 3] == pytest.approx(-1.0)
    off = stationarity(range_gradients(_SignedConstant(0.5), d, images, env, n_ranges=4, seed=1).sum(0))
    assert off["ratio"] > 0.5  # away from it, the sum no longer cancels


@pytest.mark.part4
def test_task_vectors_of_seeds_agree_where_they_are_the_same_and_not_where_they_are_noise(tmp_path):
    base, _ = make_state_dicts(n=1, seed=0, half=False)
    g = torch.Generator().manual_seed(1)
    noise = lambda: {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
    shared = [noise(), noise()]
    deme.analyze_seeds(argparse.Namespace(base=base, by_seed=[shared, shared, [noise(), noise()]], folder=tmp_path,
                                          cfg=Config(seeds="0,1,2", n_ranges=2), names=["range 0", "range 1"]))
    # per range: norm_seed0..2, cos_seeds_0-1, _0-2, _1-2, cos_with_range0..1
    rows = np.loadtxt(tmp_path / "seed_agreement.csv", delimiter=",", skiprows=1, usecols=range(1, 9))
    norms, seeds, ranges = rows[:, :3], rows[:, 3:6], rows[:, 6:]
    assert rows.shape == (2, 8) and np.allclose(seeds[:, 0], 1.0)  # seeds 0 and 1: the same τ
    assert np.abs(seeds[:, 1:]).max() < 0.3  # independent noise: nearly orthogonal
    tau = torch.cat([(shared[1][k] - base[k]).flatten() for k in base if base[k].is_floating_point()])
    assert norms[1, 0] == pytest.approx(tau.norm().item(), rel=1e-6)
    assert np.allclose(np.diag(ranges), 1.0)


@pytest.mark.part4
def test_interference_is_each_ranges_loss_change_under_one_scaled_task_vector():
    base = {"a": torch.zeros(2), "b": torch.zeros(1)}
    finetuned = [{"a": torch.tensor([1.0, 1.0]), "b": torch.zeros(1)}, {"a": torch.zeros(2), "b": torch.tensor([2.0])}]
    loss = lambda sd: [1.0 + sd["a"].sum().item(), 4.0 + sd["a"].sum().item() - sd["b"].item()]
    change = interference(loss, base, finetuned, scales=(0.0, 0.5, 1.0))
    assert change.shape == (2, 3, 2) and np.allclose(change[:, 0], 0.0)  # scale 0 is θ0
    assert np.allclose(change[0, 2], [200.0, 50.0]) and np.allclose(change[1, 1], [0.0, -25.0])


@pytest.mark.part3
def test_a_partial_ensemble_serves_one_range_with_its_model_and_the_rest_with_theta0():
    theta0, other = tiny_theta0(0), tiny_theta0(1)
    parts = partial_ensembles(theta0, [theta0, other])
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([10, 400, 600, 990])
    with torch.no_grad():
        assert torch.allclose(parts[0](x, t), theta0(x, t), atol=1e-6)  # whose range model is θ0: θ0 itself
        want = torch.cat([theta0(x[:2], t[:2]), other(x[2:], t[2:])])
        assert torch.allclose(parts[1](x, t), want)
    cfg, env, d = Config(sample_steps=3, eval_batch=4), Env(torch.device("cpu")), GaussianDiffusion()
    assert torch.equal(sample_in_memory(cfg, env, d, parts[0], 4, seed=2), sample_in_memory(cfg, env, d, theta0, 4, 2))


@pytest.mark.part4
def test_analyze_writes_each_figure_as_png_and_csv(analysis_run):
    cfg, theta0 = analysis_run
    written = deme.stage_analyze(cfg, deme.Env(torch.device("cpu")), theta0=theta0)
    folder = deme.run_dir(cfg, "analysis")
    for name in ("gradient_conflict", "merge_landscape", "task_vector_norms"):
        assert folder / f"{name}.png" in written
        assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    conflict = np.loadtxt(folder / "gradient_conflict.csv", delimiter=",", skiprows=1)[:, 1:]
    assert conflict.shape == (4, 4) and np.allclose(np.diag(conflict), 1.0)
    assert (folder / "gradient_conflict.csv").read_text().startswith("t,125,375,625,875\n")  # centres of 4 bins
    landscape = np.loadtxt(folder / "merge_landscape.csv", delimiter=",", skiprows=1)
    assert landscape.shape == (8 * 8, 3) and {0.0, 1.0} <= set(landscape[:, 0])
    norms = (folder / "task_vector_norms.csv").read_text().splitlines()
    assert norms[0] == "layer,theta0,tau_range0,tau_range1" and norms[-1].startswith("total,") and len(norms) == 13
    for name in ("stationarity", "interference", "partial_ensembles"):  # the merge's diagnostics, seeds aside
        assert folder / f"{name}.png" in written and (folder / f"{name}.csv").exists()
    assert not (folder / "seed_agreement.csv").exists()  # one seed: nothing to compare
    assert len((folder / "stationarity.csv").read_text().splitlines()) == 1 + 2 + 1  # header, 2 ranges, the sum
    interference = np.loadtxt(folder / "interference.csv", delimiter=",", skiprows=1)
    assert interference.shape == (2 * 3, 2 + 2) and set(interference[:, 1]) == {0.5, 1.0, 1.5}
    partial = (folder / "partial_ensembles.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in partial[1:]] == ["theta0", "range 0 alone", "range 1 alone", "ensemble"]
    assert not list(folder.glob("*.tmp*"))


@pytest.mark.part4
def test_analyze_without_matplotlib_still_writes_the_csv(analysis_run, monkeypatch):
    cfg, theta0 = analysis_run
    cfg = dataclasses.replace(cfg, figures="norms")
    (deme.run_dir(cfg, "analysis", "task_vector_norms.csv")).unlink(missing_ok=True)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(UserError, match="pip install matplotlib"):
        deme.stage_analyze(cfg, deme.Env(torch.device("cpu")), theta0=theta0)
    assert deme.run_dir(cfg, "analysis", "task_vector_norms.csv").exists()


@pytest.mark.part4
@pytest.mark.parametrize("figures, settings, message", [
    ("landscape", {}, "landscape figure needs finished ranges.*python deme.py finetune"),
    ("norms", {}, "norms figure needs finished ranges"),
    ("conflict", {}, "needs θ0.*python deme.py train"),
    ("conflict,fig9", {}, "choose among conflict, landscape, norms, stationarity"),
    ("seeds", {}, "pass --seeds"),
    ("interference,partial", {}, "interference and partial figures need finished ranges"),
    ("landscape", {"landscape_ranges": "0,0"}, "two different indices"),
    ("landscape", {"landscape_ranges": "first,last"}, "not a list of integers"),
])
def test_analyze_says_which_input_is_missing(tmp_path, figures, settings, message):
    cfg = deme.Config(out=str(tmp_path), n_ranges=2, figures=figures, device="cpu", **settings)
    with pytest.raises(UserError, match=message):
        deme.stage_analyze(cfg, deme.Env(torch.device("cpu")))


@pytest.mark.part4
def test_analyze_refuses_an_unfinished_range(tmp_path):
    theta0 = tiny_theta0()
    sd = deme.merge_base(theta0, with_projections=True)
    for r in range(2):
        (tmp_path / f"range_{r}").mkdir()
        deme.atomic_save(dict(model=sd, ema=sd, step=1 + r, identity=dict(steps=2), model_config=theta0.config),
                         tmp_path / f"range_{r}" / "ckpt.pt")
    cfg = deme.Config(out=str(tmp_path), n_ranges=2, figures="norms", device="cpu")
    with pytest.raises(UserError, match="range 0 is unfinished"):
        deme.stage_analyze(cfg, deme.Env(torch.device("cpu")), theta0=theta0)


# Scale-out: torchrun with two processes trains, merges and samples what one process does; only rank 0 writes and
# logs; checkpoints carry no wrapper prefixes; folding projections is exact; the benchmark stage runs.
# Uses test_deme.py's imports: copy, json, os, subprocess, sys, Path, np, pytest, torch, nn, and from deme import *.


DEME = sys.modules[Config.__module__]  # the deme module, to run its main() and patch its sample grids

# The smallest run that still goes through every stage: θ0 pretraining, 2 ranges, merge-weight search, evaluation.
TINY_RUN = ["--device", "cpu", "--pretrained", "", "--preset", "tiny", "--train-steps", "3", "--steps", "2", "--n-ranges", "2",
            "--batch-size", "4", "--no-baseline", "--models", "theta0,merged", "--search-images", "16",
            "--search-evals", "3", "--n-samples", "8", "--sample-steps", "2", "--eval-batch", "4", "--eta", "0",
            "--report-images", "16"]
NO_GRIDS = "save_grid = lambda *args, **kwargs: None  # sample grids are not under test and cost seconds on a CPU"


def run_one_process(*argv):
    """deme.py's main in this process (one process, no torch.distributed), without sample grids."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DEME, "save_grid", lambda *args, **kwargs: None)
        DEME.main(list(argv))


def torchrun_env() -> dict:
    """This process's environment without torchrun's own variables (a nested torchrun sets them anew), one thread
    per process."""
    skip = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in skip}, "OMP_NUM_THREADS": "1"}


def start_torchrun(tmp, *argv, nproc=2):
    """deme.py under torchrun with nproc CPU processes (gloo), started; finish_torchrun waits for it."""
    script, logs = tmp / "run_deme.py", tmp / f"logs_{argv[0]}"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(DEME.__file__).parent)!r})\nimport deme\n"
                      f"deme.{NO_GRIDS}\ndeme.main()\n")
    env = torchrun_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--redirects", "3", "--log-dir", str(logs), str(script), *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), logs, nproc


def finish_torchrun(job) -> dict:
    """{rank: (stdout, stderr)} of a torchrun job started by start_torchrun, once it succeeded."""
    proc, logs, nproc = job
    output, _ = proc.communicate(timeout=600)
    out = {}
    for rank in range(nproc):
        files = {p.name: p.read_text() for p in logs.rglob(f"attempt_0/{rank}/*.log")}
        out[rank] = (files.get("stdout.log", ""), files.get("stderr.log", ""))
    assert proc.returncode == 0, f"torchrun failed:\n{output[-2000:]}\n" + "\n".join(
        f"rank {r}:\n{err[-2000:]}" for r, (_, err) in out.items())
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny pipeline and sampling job, once in one process and once under torchrun with two (the two
    runs side by side, to save time)."""
    tmp = tmp_path_factory.mktemp("scale")
    one, two = tmp / "one", tmp / "two"
    logs = {}
    # eta 1 for the sample job: the per-step noise, too, depends only on the seed and the sample's index
    for stage, extra in (("pipeline", []), ("sample", ["--models", str(one / "pretrain" / "ckpt.pt"), "--eta", "1"])):
        job = start_torchrun(tmp, stage, "--out", str(two), *TINY_RUN, *extra)  # both sample the very same θ0
        try:
            run_one_process(stage, "--out", str(one), *TINY_RUN, *extra)
        except BaseException:
            job[0].kill()
            raise
        logs[stage] = finish_torchrun(job)
    return one, two, logs


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.machinery
def test_two_processes_train_the_models_one_process_trains(runs):
    # Each rank takes half of every global batch and the same slice of the global batch's timesteps and noise, and
    # DDP averages the gradients: the weights differ from one process's by float rounding (which Adam amplifies
    # where a gradient is near 0), a thousandth of what finetuning changed.
    one, two, _ = runs
    theta0 = merge_base(load_model(one / "pretrain" / "ckpt.pt"), with_projections=True)
    distance = lambda a, b: torch.cat([(a[k] - b[k]).flatten() for k in a]).norm().item()
    for stage in ("pretrain", "range_0", "range_1"):
        a, b = _load(one / stage / "ckpt.pt"), _load(two / stage / "ckpt.pt")
        assert a["step"] == b["step"] == a["identity"]["steps"]
        assert a["ema"].keys() == b["ema"].keys()
        if stage == "pretrain":
            assert max((a["ema"][k] - b["ema"][k]).abs().max().item() for k in a["ema"]) < 1e-4
        else:
            assert distance(a["ema"], b["ema"]) < distance(a["ema"], theta0) / 100, stage


@pytest.mark.machinery
def test_two_processes_merge_and_evaluate_like_one_process(runs):
    one, two, _ = runs
    search_a = json.loads((one / "merge" / "search.json").read_text())
    search_b = json.loads((two / "merge" / "search.json").read_text())
    assert search_a["weights"] == search_b["weights"]  # the search ran once, on rank 0, with the same outcome
    a, b = _load(one / "merge" / "merged.pt")["ema"], _load(two / "merge" / "merged.pt")["ema"]
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    rows_a = json.loads((one / "results.json").read_text())["rows"]
    rows_b = json.loads((two / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows_a] == [r["model"] for r in rows_b] == ["theta0", "merged"]
    for ra, rb in zip(rows_a, rows_b):  # the pixel metric of the samples split over two ranks and gathered
        assert ra["value"] == pytest.approx(rb["value"], rel=1e-3)
        assert ra["heldout_loss"] == pytest.approx(rb["heldout_loss"], rel=1e-4)


@pytest.mark.machinery
def test_the_saved_merged_model_is_the_merge_with_projections_folded(runs):
    one, _, _ = runs
    record = json.loads((one / "merge" / "search.json").read_text())
    merged = load_model(one / "merge" / "merged.pt").eval()
    ranges = [_load(one / f"range_{i}" / "ckpt.pt")["ema"] for i in range(2)]
    theta0 = load_model(one / "pretrain" / "ckpt.pt")
    unfolded = build_model(theta0.config, merge(merge_base(theta0, True), ranges, record["weights"])).eval()
    n_proj = lambda m: sum(k.endswith(".proj.weight") for k in m.state_dict())
    assert record["folded_projections"] >= 2  # tiny: at least the projections after its 2 upsampling convs
    assert n_proj(unfolded) - n_proj(merged) == record["folded_projections"]
    x, t = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 250, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t), unfolded(x, t), atol=1e-5, rtol=1e-5)


@pytest.mark.machinery
def test_only_rank_0_logs_and_checkpoints_carry_no_wrapper_prefixes(runs):
    _, two, logs = runs
    for stage, ranks in logs.items():
        assert ranks[1][0] == "", f"rank 1 printed during {stage}: {ranks[1][0][:200]}"
        assert "it/s" not in ranks[1][1] and "%|" not in ranks[1][1], f"rank 1 showed progress during {stage}"
        assert "warning:" not in ranks[1][1], f"rank 1 warned during {stage}: {ranks[1][1][:300]}"
        assert ranks[0][0].count(f"deme.py {stage}:") == 1
    for path in list(two.rglob("*.pt")):
        ck = _load(path)
        for key in ("model", "ema"):
            if key in ck:
                assert not [k for k in ck[key] if k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k]
    assert not list(two.rglob("*.tmp*")) and not list(two.rglob(".write_test*"))


@pytest.mark.machinery
def test_two_processes_write_every_sample_once_as_one_process_does(runs):
    # Sample i starts from noise fixed by (seed, i) and DDIM with eta = 0 is deterministic, so splitting the indices
    # over ranks gives the same images; only batch composition differs, so allow one 8-bit level.
    from PIL import Image
    one, two, _ = runs
    files_a = sorted(p.name for p in (one / "samples" / "ckpt").glob("*.png"))
    files_b = sorted(p.name for p in (two / "samples" / "ckpt").glob("*.png"))
    assert files_a == files_b == [f"{i:06d}.png" for i in range(8)]
    for name in files_a:
        a = np.asarray(Image.open(one / "samples" / "ckpt" / name), dtype=np.int16)
        b = np.asarray(Image.open(two / "samples" / "ckpt" / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1, name


def _perturbed_projections(model, seed=0):
    """Projections W = I + noise and non-zero biases, so that folding has something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k.endswith(".proj.weight") or k.endswith(".bias"):
                v.add_(0.1 * torch.randn(v.shape, generator=g))
    return model.eval()


# tiny, and the CIFAR-10 UNet's layout (4 levels, attention at 16x16) at a quarter of its width
@pytest.mark.part2
@pytest.mark.parametrize("config", [PRESETS["tiny"], dict(PRESETS["cifar10"], ch=32, num_res_blocks=1)])
def test_folding_projections_changes_no_output(config):
    torch.manual_seed(0)
    model = _perturbed_projections(add_channel_projections(UNet(**config)))
    folded = copy.deepcopy(model)
    n = fold_channel_projections(folded)
    assert n >= len(config["ch_mult"]) - 1  # at least the projection after each upsampling conv
    res = config["resolution"]
    x, t = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    reloaded = build_model(model.config, folded.state_dict()).eval()  # loads with some projections gone
    with torch.no_grad():
        want = model(x, t)
        torch.testing.assert_close(folded(x, t), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(x, t), want, atol=1e-5, rtol=1e-5)


class CompiledStandIn(nn.Module):
    """What torch.compile returns, as far as checkpoints can tell: the model under `_orig_mod` (state-dict keys
    gain "_orig_mod."); no tracing, so the test takes no time. (Real torch.compile on a CPU: see the benchmark.)"""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


@pytest.mark.machinery
@pytest.mark.parametrize("precision,compiled", [("bf16", True), ("fp16", False)])
def test_mixed_precision_and_compile_train_on_cpu_and_save_plain_weights(tmp_path, monkeypatch, precision, compiled):
    monkeypatch.setattr(torch, "compile", CompiledStandIn)
    cfg = resolve_config(dict(out=str(tmp_path), preset="tiny", batch_size=4, precision=precision))
    env = Env(torch.device("cpu"), precision=precision, compile=compiled, channels_last=compiled)
    model = add_channel_projections(UNet.from_preset("tiny"))
    data = TensorImages(synthetic_images(16, 16))
    uniform = lambda b, g: torch.randint(0, 1000, (b,), generator=g)
    ema = train_loop(cfg, env, tmp_path / "stage", model, data, GaussianDiffusion(), steps=2, lr=1e-4, warmup=0,
                     timesteps=uniform, identity={}, teacher=UNet.from_preset("tiny"), lam=1.0,
                     grid=lambda state, path: None)
    ck = _load(tmp_path / "stage" / "ckpt.pt")
    assert ck["step"] == 2 and ck["model"].keys() == ck["ema"].keys() == ema.keys() == model.state_dict().keys()
    assert not [k for k in ck["model"] if "_orig_mod" in k or k.startswith("module.")]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ck["ema"].values())
    load_model(tmp_path / "stage" / "ckpt.pt")  # loads strictly into a plain UNet


@pytest.mark.machinery
def test_bench_stage_measures_and_writes_bench_json(tmp_path, capsys):
    DEME.main(["bench", "--preset", "tiny", "--device", "cpu", "--bench-batch", "2", "--bench-iters", "1",
               "--out", str(tmp_path)])
    r = json.loads((tmp_path / "bench.json").read_text())
    for key in ("train_plain_img_s", "train_deme_img_s", "sampling_img_s", "forward_img_s"):
        assert r[key] > 0, key
    assert r["projected"][-1][0] == "total" and r["projected"][-1][1] > 0
    printed = capsys.readouterr().out
    assert "| training, DeMe finetuning (CP + frozen θ0 + CL) |" in printed and "x plain |" in printed
    assert "| DDIM-20 sampling, θ0 |" in printed and "| total |" in printed


# ----------------------------------------------------------------------------------------------------------------------
# Stable Diffusion path: tiny random SD components built offline from configs


def _byte_alphabet():
    """GPT-2/CLIP byte-level BPE alphabet: 256 printable stand-ins for the 256 bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tiny_pipeline(folder):
    """A Stable-Diffusion-shaped pipeline folder with tiny random weights: 3-level UNet, 2-level VAE, 1-layer CLIP."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    tok_dir = folder.parent / "tokenizer_files"
    tok_dir.mkdir(exist_ok=True)
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + 256 for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                                bos_token_id=512, eos_token_id=513, pad_token_id=513))
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def make_caption_folder(folder, n=6, size=16):
    """n random images with one caption each (the last image with two) in the imagefolder layout."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(n):
        pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        text = ["a red circle", "a blue square"] if i == n - 1 else f"picture number {i}"
        lines.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core CPU run 20x faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """(pipeline folder, caption folder), made once per test module."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("sd")
    return make_tiny_pipeline(root / "pipeline"), make_caption_folder(root / "captions")


def cpu_env():
    """fp32 on the CPU, no compile."""
    return Env(torch.device("cpu"))


def sd_config(tmp_path, pipeline, captions, **kw):
    """A run of two ranges of two steps on 16x16 images, with a 3-candidate merge-weight search."""
    return Config(**{**dict(dataset="folder", model="sd", pretrained=str(pipeline), data_dir=str(captions),
                            out=str(tmp_path / "run"), device="cpu", precision="fp32", compile=False,
                            channels_last=False, n_ranges=2, steps=2, batch_size=2, ckpt_every=100, sd_resolution=16,
                            heldout_fraction=0.3,  # 0.png selects, 2.png reports, the rest train (heldout_role)
                            sample_steps=2, eval_batch=4, search_images=4, search_evals=3, guidance_scale=7.5,
                            prompts="a red circle", models="theta0,ensemble,merged"), **kw})


def eps_inputs(model, batch=2, seed=0):
    """Latents, timesteps and text embeddings that fit an SDUNet."""
    g = torch.Generator().manual_seed(seed)
    c = model.unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    return x, torch.tensor([10, 900])[:batch], torch.randn(batch, 8, c.cross_attention_dim, generator=g)


def randomise_projections(model, seed=0, scale=0.2):
    """W = I + noise at every projection, as after finetuning."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.projections.values():
            p.weight.add_(scale * torch.randn(p.weight.shape, generator=g))
    return model


@pytest.mark.machinery
@pytest.mark.extras
def test_sd_v1_gets_nine_projections_holding_1_06_percent_of_the_parameters(one_thread):
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):  # SD v1.x's UNet shape (its config is the constructor's default but 768-d text)
        model = SDUNet(diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)).add_projections()
    channels = [p.weight.shape[0] for p in model.projections.values()]
    assert list(model.projections) == ["down_0", "down_1", "down_2", "down_3", "mid", "up_0", "up_1", "up_2", "up_3"]
    assert channels == [320, 640, 1280, 1280, 1280, 1280, 1280, 640, 320]
    n_unet = sum(p.numel() for p in model.unet.parameters())
    n_proj = sum(p.numel() for p in model.projections.parameters())
    assert (n_unet, n_proj) == (859_520_964, 9_216_000)
    assert round(100 * n_proj / (n_unet + n_proj), 2) == 1.06


@pytest.mark.machinery
@pytest.mark.extras
def test_sd_projections_start_as_identity_and_never_touch_skip_tensors(tiny_sd, one_thread):
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny_sd[0], subfolder="unet")
    plain, projected = SDUNet(unet).eval(), SDUNet(copy.deepcopy(unet)).add_projections().eval()
    x, t, emb = eps_inputs(plain)
    with torch.no_grad():
        assert torch.equal(plain(x, t, emb), projected(x, t, emb))  # identity W: the model is unchanged at the start
        projected.projections["down_0"].weight.mul_(2.0)
    seen = {}
    for name, model in (("plain", plain), ("projected", projected)):  # registered after the projection: sees its output
        model.unet.down_blocks[0].register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
        with torch.no_grad():
            model(x, t, emb)
    (h0, skips0), (h1, skips1) = seen["plain"], seen["projected"]
    assert torch.allclose(h1, 2 * h0)  # the main path is projected ...
    assert all(torch.equal(a, b) for a, b in zip(skips0, skips1))  # ... the skip tensors are not


@pytest.mark.machinery
@pytest.mark.extras
def test_the_sd_wrapper_encodes_latents_and_captions_with_sds_schedule(tiny_sd, one_thread):
    sd = StableDiffusion(tiny_sd[0], cpu_env())
    assert sd.diffusion.T == 1000 and abs(sd.diffusion.betas[0].item() - 0.00085) < 1e-12
    assert abs(sd.diffusion.betas[-1].item() - 0.012) < 1e-12
    ref = GaussianDiffusion(beta_start=0.00085, beta_end=0.012, schedule="scaled_linear")
    assert torch.equal(sd.diffusion.alphas_bar, ref.alphas_bar)
    data = CaptionedImages(tiny_sd[1], 16)
    x0, cond = sd.encode(next(batches(data, 2, seed=0)))  # (images, captions) as the DataLoader collates them
    assert x0.shape == (2, 4, 8, 8) and cond["encoder_hidden_states"].shape == (2, 8, 16)
    images = torch.stack([data[0][0], data[1][0]])
    latents = sd.vae.encode(images).latent_dist.mean * sd.vae.config.scaling_factor
    assert torch.allclose(sd.encode((images, ["", ""]))[0], latents)
    with torch.no_grad():  # called as the DDPM UNet is: eps(x_t, t, **cond)
        assert sd.unet(x0, torch.tensor([3, 700]), **cond).shape == x0.shape


@pytest.mark.machinery
@pytest.mark.extras
def test_classifier_free_guidance_extrapolates_from_the_unconditional_prediction(tiny_sd, one_thread):
    sd = StableDiffusion(tiny_sd[0], cpu_env())
    x, t, _ = eps_inputs(sd.unet)
    emb, uncond = sd.embed(["a red circle", "a blue square"]), sd.embed(["", ""])
    with torch.no_grad():
        e_c, e_u = sd.unet(x, t, emb), sd.unet(x, t, uncond)
        assert torch.allclose(Prompted(sd.unet, emb, uncond, 1.0)(x, t), e_c, atol=1e-5)
        assert torch.allclose(Prompted(sd.unet, emb, uncond, 7.5)(x, t), e_u + 7.5 * (e_c - e_u), atol=1e-4)


@pytest.mark.machinery
@pytest.mark.extras
def test_a_caption_folder_holds_pairs_and_each_mistake_is_one_line(tmp_path, tiny_sd, one_thread):
    data = CaptionedImages(tiny_sd[1], 16)
    assert len(data) == 7  # six images, the last with two captions
    image, caption = data[6]
    assert image.shape == (3, 16, 16) and -1 <= image.min() <= image.max() <= 1 and caption == "a blue square"
    bad = tmp_path / "bad"
    cases = [(tmp_path / "nowhere", "metadata.jsonl is missing"), (bad, "metadata.jsonl is missing")]
    for folder, message in cases:
        if folder == bad:
            bad.mkdir()
        with pytest.raises(UserError, match=message):
            CaptionedImages(folder, 16)
    for text, message in [('{"file_name": "gone.png", "text": "x"}', "names gone.png"),
                          ('{"file": "0.png"}', "line 1 is not a JSON object"), ("\n\n", "no image-caption pairs")]:
        (bad / "metadata.jsonl").write_text(text)
        with pytest.raises(UserError, match=message) as e:
            CaptionedImages(bad, 16)
        assert "\n" not in str(e.value)


@pytest.mark.machinery
@pytest.mark.extras
def test_missing_diffusers_is_one_line_naming_the_extras(monkeypatch, one_thread):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what `import diffusers` sees when it is not installed
    with pytest.raises(UserError, match="pip install -r requirements-extra.txt"):
        StableDiffusion("anywhere", cpu_env())
    with pytest.raises(UserError, match="needs diffusers and transformers"):
        load_sd_unet("anywhere")


@pytest.mark.machinery
@pytest.mark.extras
def test_export_folds_what_it_can_and_the_sidecar_restores_the_rest(tmp_path, tiny_sd, capsys, one_thread):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    sd = StableDiffusion(tiny_sd[0], cpu_env(), sd_config(tmp_path, *tiny_sd))
    model = randomise_projections(copy.deepcopy(sd.unet).add_projections()).eval()
    sd.save_merged(model.state_dict(), {}, tmp_path)
    rest = load_file(str(tmp_path / "merged_unet" / SIDECAR))
    assert sorted(rest) == ["down_0", "down_1", "down_2", "mid", "up_2"]  # up_0, up_1 folded into upsampler convs
    assert "load_sd_unet" in capsys.readouterr().err
    unet, info = UNet2DConditionModel.from_pretrained(tmp_path / "merged_unet", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    x, t, emb = eps_inputs(model)
    with torch.no_grad():
        want = model(x, t, emb)
        for folder in (tmp_path / "merged_unet", tmp_path / "merged_pipeline"):
            assert torch.allclose(load_sd_unet(folder)(x, t, emb), want, atol=1e-5)
        # the hooks ride on the diffusers UNet itself, so a pipeline can be handed load_sd_unet(dir).unet
        assert torch.allclose(load_sd_unet(tmp_path / "merged_unet").unet(x, t, emb).sample, want, atol=1e-5)
        assert not torch.allclose(SDUNet(unet)(x, t, emb), want, atol=1e-3)  # plain diffusers drops the sidecar's W


@pytest.mark.machinery
@pytest.mark.extras
def test_stable_diffusion_decouples_merges_exports_and_samples(tmp_path, tiny_sd, monkeypatch, one_thread):
    from diffusers import StableDiffusionPipeline
    cfg = sd_config(tmp_path, *tiny_sd)
    env = setup_env(cfg)
    home = sys.modules[stage_sd.__module__]
    real_train_loop, seen = home.train_loop, []

    def spy(cfg, env, stage_dir, model, data, diffusion, *, teacher=None, **kw):  # the frozen teacher must not move
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        ema = real_train_loop(cfg, env, stage_dir, model, data, diffusion, teacher=teacher, **kw)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert not teacher.projections and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
        seen.append(kw["identity"]["range"])
        return ema

    monkeypatch.setattr(home, "train_loop", spy)
    stage_sd(cfg, env)
    assert seen == [[0, 500], [500, 1000]]
    assert all((tmp_path / "run" / f"range_{i}" / "grid_000002.png").is_file() for i in range(2))
    sd = StableDiffusion(cfg.pretrained, env)
    theta0, states = sd.unet, []
    for i in range(2):
        ck = load_checkpoint(tmp_path / "run" / f"range_{i}" / "ckpt.pt")  # weights_only: the config is plain data
        assert ck["step"] == 2 and ck["model_config"]["kind"] == "stable_diffusion"
        assert all(torch.isfinite(v).all() for v in ck["ema"].values() if v.is_floating_point())
        assert any(not torch.equal(ck["model"][k], v) for k, v in theta0.state_dict().items())  # θ_i moved from θ0
        states.append(ck["ema"])
    record = json.loads((tmp_path / "run" / "merge" / "search.json").read_text())
    assert record["search"]["evals"] <= 3 and len(record["weights"]) == 2
    base = sd.merge_base(states[0])
    merged = sd.build(merge(base, states, record["weights"]))
    x, t, emb = eps_inputs(theta0)
    with torch.no_grad():  # the exported model is θ0 + Σ w_i τ_i; with w = 0 it is θ0
        assert torch.allclose(load_sd_unet(tmp_path / "run" / "merge" / "merged_unet")(x, t, emb),
                              merged(x, t, emb), atol=1e-5)
        assert torch.allclose(sd.build(merge(base, states, [0.0, 0.0]))(x, t, emb), theta0(x, t, emb))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "merge" / "merged_pipeline")
    assert pipe.unet.state_dict().keys() == theta0.unet.state_dict().keys()
    from PIL import Image
    for name in ("theta0", "ensemble", "merged"):
        with Image.open(tmp_path / "run" / "samples" / name / "00000.png") as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    image = sd_sample(sd, [merged], ["a red circle"], cfg, [0])
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


# ======================================================================================================================
# Numbers you can trust: train / select / report kept apart, fp32 evaluation, samples fixed by seed and index, checks
# before work, resume on other hardware, many processes failing together, the CUDA path
# ======================================================================================================================

def _png_folder(folder, n, size=(20, 24)):
    """n small distinct PNGs named img_000.png ... under folder (some in a subfolder)."""
    from PIL import Image
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        path = folder / ("sub" if i % 3 == 0 else "") / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(path)
    return folder


@pytest.mark.machinery
def test_folder_splits_are_disjoint_stable_and_training_never_sees_the_held_out_images(tmp_path):
    _png_folder(tmp_path / "data", 200)
    cfg = resolve_config(dict(dataset="folder", data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                              heldout_fraction=0.3))
    names = {role: {p.relative_to(tmp_path / "data").as_posix() for p in make_dataset(cfg, role).paths}
             for role in ("train", "eval", "select", "report")}
    assert names["train"] == names["eval"]
    assert not names["train"] & names["select"] and not names["train"] & names["report"]
    assert not names["select"] & names["report"]
    assert len(names["train"] | names["select"] | names["report"]) == 200
    assert 15 <= len(names["select"]) <= 45 and 15 <= len(names["report"]) <= 45  # 15% each (30 expected), by hash
    _png_folder(tmp_path / "more", 50)
    for p in (tmp_path / "more").rglob("*.png"):  # adding files moves none of the old ones to another split
        p.rename(tmp_path / "data" / f"new_{p.name}")
    for role in ("select", "report"):
        grown = {p.relative_to(tmp_path / "data").as_posix() for p in make_dataset(cfg, role).paths}
        assert names[role] <= grown and all(n.startswith("new_") for n in grown - names[role])


@pytest.mark.machinery
def test_the_cifar10_held_out_halves_are_the_two_halves_of_the_test_split(tmp_path):
    batches_ = write_fake_cifar10(tmp_path, n=6)
    cfg = resolve_config(dict(dataset="cifar10", preset="tiny", image_size=32, data_dir=str(tmp_path),
                              out=str(tmp_path / "run")))
    test = torch.from_numpy(batches_["test_batch"].reshape(-1, 3, 32, 32))
    assert torch.equal(make_dataset(cfg, "select").tensors[0], test[:3])
    assert torch.equal(make_dataset(cfg, "report").tensors[0], test[3:])
    with pytest.raises(UserError, match="fewer than --report-images 4"):
        heldout_images(cfg, 4, "report")


class _RecordingGenerator:
    """torch.Generator, recording every seed it is given (what selection and reporting draw their noise from)."""
    real, seeds = torch.Generator, None

    def __init__(self, *args, **kwargs):
        self.g = self.real(*args, **kwargs)

    def manual_seed(self, seed):
        self.seeds.append(int(seed))
        return self.g.manual_seed(seed)


@pytest.mark.part4
def test_selection_and_reporting_share_no_image_and_no_noise_seed(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, ranges="all", n_ranges=2, steps=2, search_objective="samples", search_candidates=3,
                   search_samples=16, search_evals=4,
                   n_samples=16, report_images=16, models="theta0,merged", baseline=False)
    env, d = setup_env(cfg), GaussianDiffusion()
    theta0 = tiny_theta0()
    stage_finetune(cfg, env, d, theta0)
    seen = {}
    real_synthetic = DEME.synthetic_images
    for role, stage in (("select", stage_merge), ("report", stage_evaluate)):
        images, seeds = [], []
        with monkeypatch.context() as m:
            m.setattr(DEME, "synthetic_images", lambda n, size=16, seed=0: images.append(seed) or
                      real_synthetic(n, size, seed))
            m.setattr(_RecordingGenerator, "seeds", seeds)
            m.setattr(torch, "Generator", _RecordingGenerator)
            m.setattr(DEME, "save_grid", lambda *a, **k: None)
            stage(cfg, env, d, theta0)
        seen[role] = set(images), set(seeds)
    (select_images, select_seeds), (report_images, report_seeds) = seen["select"], seen["report"]
    assert select_images and report_images and select_seeds and report_seeds
    assert not select_images & report_images, "an image set both selected and reported"
    assert not select_seeds & report_seeds, "a noise seed both selected and reported"
    assert cfg.seed not in select_images | report_images  # the training images' seed
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    protocol = results["protocol"]
    assert protocol["select"]["noise_seed"] == role_seed(cfg.seed, "select") in select_seeds
    assert protocol["report_loss"]["noise_seed"] == role_seed(cfg.seed, "report") in report_seeds
    assert protocol["select_samples"]["noise_seed"] == role_seed(cfg.seed, "select_samples")
    assert role_seed(cfg.seed, "select_samples") * 1_000_003 in select_seeds  # the generator of selection sample 0
    assert protocol["select_samples"]["noise_seed"] != protocol["report_samples"]["noise_seed"]
    assert "which no selection step used" in (tmp_path / "run" / "results.md").read_text()
    search = json.loads((tmp_path / "run" / "merge" / "search.json").read_text())["search"]
    assert all(len(p["loss_per_range"]) == 2 for p in search["path"]) and len(search["samples"]) == 3
    assert search["weights"] == search["samples"][0]["w"] == min(search["samples"], key=lambda c: c["score"])["w"]
    scores = json.loads((tmp_path / "run" / "merge" / "search_cache.json").read_text())["values"]
    assert search["chosen"]["loss_per_range"] == scores["loss" + json.dumps(search["weights"])][1]


@pytest.mark.part4
def test_role_seeds_differ_for_every_role_and_every_run_seed():
    seeds = [role_seed(s, role) for s in range(100) for role in deme.ROLE_SEEDS]
    assert len(set(seeds)) == len(seeds)


@pytest.mark.machinery
def test_the_per_range_objective_counts_a_small_high_t_loss_as_much_as_a_large_low_t_one():
    theta0 = [0.1, 0.01]  # the low-t range's loss is ten times the high-t range's
    a, b = [0.098, 0.01], [0.1, 0.009]  # a: 2% better at low t; b: 10% better at high t
    mean = lambda losses: sum(losses) / 2
    assert search_score(mean(a), a, theta0, "loss") < search_score(mean(b), b, theta0, "loss")
    assert search_score(mean(b), b, theta0, "per_range") < search_score(mean(a), a, theta0, "per_range")
    assert search_score(mean(theta0), theta0, theta0, "per_range") == 1.0


@pytest.mark.part4
def test_evaluation_runs_in_fp32_while_training_autocasts():
    model, d = tiny_theta0(), GaussianDiffusion()
    images = synthetic_images(8, 16, seed=3)
    fp32 = Env(torch.device("cpu"))
    trains_bf16 = Env(torch.device("cpu"), precision="bf16")
    samples_bf16 = Env(torch.device("cpu"), precision="bf16", eval_precision="bf16")
    loss = lambda env: heldout_loss(model, d, images, env, 2, seed=1)
    assert loss(trains_bf16) == loss(fp32) != loss(samples_bf16)
    cfg = Config(sample_steps=2, eta=1.0)
    sample = lambda env: sample_batch(cfg, env, d, model, range(3), 5, (3, 16, 16))
    assert torch.equal(sample(trains_bf16), sample(fp32)) and not torch.equal(sample(samples_bf16), sample(fp32))


@pytest.mark.part4
def test_exact_evaluation_switches_tf32_off_and_restores_it():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with Env(torch.device("cpu"), precision="bf16").evaluation():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.part1
@pytest.mark.parametrize("sampler,eta,schedule", [("ddim", 0.0, {}), ("ddim", 1.0, {}), ("ddim", 0.3, {}),
                                                  ("ddpm", 0.0, dict(T=8, beta_start=0.05, beta_end=0.3))])
def test_a_sample_depends_only_on_the_seed_and_its_index(sampler, eta, schedule):
    model, d = tiny_theta0(), GaussianDiffusion(**schedule)  # DDPM: 8 ancestral steps keep the test fast
    base = dict(sampler=sampler, eta=eta, sample_steps=4)
    env = Env(torch.device("cpu"))
    one = sample_in_memory(Config(**base, eval_batch=8), env, d, model, 7, seed=4)
    small = sample_in_memory(Config(**base, eval_batch=3), env, d, model, 7, seed=4)
    ranks = [sample_in_memory(Config(**base, eval_batch=2), env, d, model, 7, seed=4, rank=r, world=2) for r in (0, 1)]
    two = torch.empty_like(one)
    two[0::2], two[1::2] = ranks
    for other in (small, two):  # batch composition may move a pixel by float rounding, never more
        assert (images_to_uint8(one).astype(int) - images_to_uint8(other).astype(int)).__abs__().max() <= 1
    assert not torch.allclose(one, sample_in_memory(Config(**base, eval_batch=8), env, d, model, 7, seed=5))


@pytest.mark.machinery
def test_random_crops_come_from_the_data_order_so_every_rank_and_run_crops_alike(tmp_path):
    _png_folder(tmp_path / "data", 8, size=(28, 20))
    ds = ImageFolder(tmp_path / "data", 16, random_crop=True)
    take = lambda it, k: [b.clone() for b in itertools.islice(it, k)]
    torch.manual_seed(0)
    whole = take(batches(ds, 4, seed=2), 4)
    torch.manual_seed(1)  # another global RNG state changes nothing
    halves = [take(batches(ds, 2, seed=2, rank=r, world=2), 4) for r in (0, 1)]
    for k in range(4):
        assert torch.equal(whole[k], torch.cat([halves[0][k], halves[1][k]]))
    assert not torch.equal(whole[0], whole[2])  # epoch 2 draws other crops of the same images
    assert not torch.equal(ds[(0, 1)], ds[(0, 2)]) and torch.equal(ds[(0, 1)], ds[(0, 1)])


@pytest.mark.machinery
def test_lsun_lmdb_keys_are_cached_in_the_run_folder_and_workers_open_their_own_handle(tmp_path, monkeypatch):
    lmdb = pytest.importorskip("lmdb")
    from PIL import Image
    folder = tmp_path / "lsun" / "church_outdoor_train_lmdb"
    folder.mkdir(parents=True)
    with lmdb.open(str(folder), map_size=1 << 24) as db, db.begin(write=True) as txn:
        for i in range(12):
            buf = io.BytesIO()
            Image.new("RGB", (24, 20), (20 * i, 0, 0)).save(buf, format="WEBP")
            txn.put(hashlib.sha1(str(i).encode()).hexdigest().encode(), buf.getvalue())
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(dict(dataset="lsun_church", preset="tiny", data_dir=str(tmp_path / "lsun"),
                              out=str(tmp_path / "run"), heldout_fraction=0.3))
    parts = {split: make_dataset(cfg, split) for split in ("train", "select", "report")}
    assert sum(len(p) for p in parts.values()) == 12 and not set(parts["train"].paths) & set(parts["select"].paths)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["lsun_keys_church_outdoor.txt"]
    assert not list(tmp_path.glob("_cache_*"))  # torchvision's reader would have written here, into the cwd
    train = parts["train"]
    assert train[0].shape == (3, 16, 16)
    assert parts["select"][0].shape == (3, 16, 16)  # a second split of the same lmdb, read in the same process
    x = next(batches(train, 2, seed=0, workers=2))  # two worker processes, each with its own lmdb handle
    assert x.shape == (2, 3, 16, 16) and torch.equal(x, next(batches(train, 2, seed=0)))
    assert parts["report"][0].shape == (3, 16, 16)  # and the main process reads on after the workers were forked


@pytest.mark.machinery
def test_resume_on_other_hardware_continues_and_says_what_it_could_not_restore(tmp_path, monkeypatch, capsys):
    theta0 = UNet.from_preset("tiny")
    cfg = tiny_cfg(tmp_path, ranges="0", steps=3, ckpt_every=1, precision="bf16", batch_size=4)
    with monkeypatch.context() as m:
        interrupt_after(m, 2)  # dies after step 2; the last checkpoint is step 1
        with pytest.raises(KeyboardInterrupt):
            stage_finetune(cfg, setup_env(cfg), GaussianDiffusion(), theta0)
    path = tmp_path / "run" / "range_0" / "ckpt.pt"
    ck = _load(path)
    assert ck["scaler"] == {}  # bf16 has no gradient scaler
    ck["rng"]["generators"][1] = torch.zeros(16, dtype=torch.uint8)  # the state of a CUDA generator
    ck["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 2  # and of two GPUs
    ddpm_unet.atomic_save(ck, path)
    cfg = dataclasses.replace(cfg, precision="fp16", resume=True)  # on a CPU, in fp16: a scaler with nothing to load
    stage_finetune(cfg, setup_env(cfg), GaussianDiffusion(), theta0)
    out = capsys.readouterr().out
    assert "resumed at step 1" in out and "could not restore" in out
    assert "2 of 2 GPU(s)" in out and "cuda" not in out.split("could not restore")[0]
    assert "noise generator" in out and "gradient scaler" in out
    assert _load(path)["step"] == 3


@pytest.mark.machinery
def test_cuda_without_an_index_means_the_current_gpu(monkeypatch, tmp_path):
    def set_device(device):  # torch.cuda.set_device refuses a device without an index, as the real one does
        if torch.device(device).index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer")
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 2), ("current_device", lambda: 1),
                        ("set_device", set_device), ("is_bf16_supported", lambda: True)):
        monkeypatch.setattr(torch.cuda, name, value)
    assert setup_env(tiny_cfg(tmp_path, device="cuda")).device == torch.device("cuda", 1)
    assert setup_env(tiny_cfg(tmp_path, device="cuda:0")).device == torch.device("cuda", 0)
    with pytest.raises(UserError, match="sees 2 GPU"):
        setup_env(tiny_cfg(tmp_path, device="cuda:5"))


@pytest.mark.machinery
def test_bench_samples_as_evaluation_does(tmp_path, monkeypatch):
    calls = []
    real = DEME.sample_batch
    monkeypatch.setattr(DEME, "sample_batch", lambda cfg, env, d, model, *a, **k: calls.append(type(model)) or
                        real(cfg, env, d, model, *a, **k))
    DEME.main(["bench", "--preset", "tiny", "--device", "cpu", "--bench-batch", "2", "--bench-iters", "1",
               "--out", str(tmp_path)])
    assert calls and set(calls) == {UNet}  # the plain model, as evaluation samples it (no compile wrapper)


@pytest.mark.machinery
@pytest.mark.parametrize("argv, message", [
    (["--metric", "pixel", "--n-samples", "2048"], "fewer than 2 x 2048"),
    (["--metric", "fid"], "Inception weights missing"),
    (["--fid-stats", "{tmp}/broken.npz"], "cannot read FID statistics"),
    (["--search-images", "500"], "fewer than --search-images 500"),
    (["--report-images", "500"], "fewer than --report-images 500"),
    (["--eta", "-1"], "--eta must be at least 0, got -1.0"),
    (["--search-candidates", "1"], "--search-candidates must be at least 2, got 1"),
    (["--search-objective", "samples", "--search-samples", "500"], "fewer than --search-samples 500"),
    (["--sample-steps", "7"], "--sample-steps 7"),
    (["--batch-size", "7", "--grad-accum", "2"], "--batch-size 7"),
])
def test_every_mistake_that_would_stop_a_run_late_stops_it_before_any_stage(argv, message, tmp_path, capsys,
                                                                            monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    _png_folder(tmp_path / "data", 100, size=(16, 16))
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    out = tmp_path / "run"
    line = cli_error(capsys, "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--out", str(out),
                     "--device", "cpu", "--batch-size", "8", "--n-samples", "16", "--search-images", "4",
                     "--report-images", "4", "--heldout-fraction", "0.5", "--metric", "pixel",
                     *[a.format(tmp=tmp_path) for a in argv])
    assert message in line, line
    made = sorted(p.name for p in out.iterdir() if p.is_dir()) if out.exists() else []
    assert made == [], f"stage folders made before the error: {made}"


@pytest.mark.machinery
def test_fid_of_missing_folders_says_so_before_looking_for_inception_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(DEME, "FIDInception", lambda *a, **k: pytest.fail("looked for the weights first"))
    line = cli_error(capsys, "fid", str(tmp_path / "nowhere"), str(tmp_path / "neither"), "--device", "cpu")
    assert "nowhere does not exist" in line


TORCHRUN_SCRIPT = """
import os, sys, time, torch
sys.path.insert(0, {root!r})
import deme

class Features(torch.nn.Module):  # a stand-in for the FID Inception: 2048 fixed random features, and a count
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3 * 16 * 16, 2048, generator=torch.Generator().manual_seed(0)))
        self.seen = 0
    def forward(self, x):
        self.seen += len(x)
        return torch.relu(x.flatten(1) @ self.w)

def stage(cfg, env):
    if {fail_rank} == env.rank:
        time.sleep(1)
        raise deme.UserError("rank {fail_rank} cannot go on")
    if {fail_rank} >= 0:
        env.barrier()  # waits for a rank that will never come
    features = Features()
    mu, sigma = deme.reference_stats(cfg, env, features)
    print("seen", features.seen, flush=True)

deme.STAGES["evaluate"] = (stage, "")
deme.preflight = lambda *args: None
deme.main(["evaluate", "--dataset", "folder", "--data-dir", {data!r}, "--out", {out!r}, "--device", "cpu",
           "--preset", "tiny", "--eval-batch", "4", "--metric", "fid"])
"""


def _torchrun_script(tmp_path, fail_rank):
    _png_folder(tmp_path / "data", MIN_FOLDER_IMAGES, size=(16, 16))
    script = tmp_path / "script.py"
    script.write_text(TORCHRUN_SCRIPT.format(root=str(ROOT), data=str(tmp_path / "data"), out=str(tmp_path / "run"),
                                             fail_rank=fail_rank))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--redirects", "3",
            "--log-dir", str(tmp_path / "logs"), str(script)], torchrun_env()


def _rank_output(tmp_path, rank, name):
    return "".join(p.read_text() for p in (tmp_path / "logs").rglob(f"attempt_0/{rank}/{name}.log"))


@pytest.mark.machinery
def test_reference_statistics_are_shared_over_the_processes(tmp_path):
    cmd, env = _torchrun_script(tmp_path, fail_rank=-1)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    train = make_dataset(resolve_config(dict(dataset="folder", data_dir=str(tmp_path / "data"), preset="tiny",
                                             out=str(tmp_path / "x"))), "eval")
    for rank in (0, 1):  # each process computed the features of its half of the training split, not all of it
        assert f"seen {(len(train) + 1 - rank) // 2}" in _rank_output(tmp_path, rank, "stdout")
    mu, sigma = load_stats(tmp_path / "run" / "fid_stats_folder.npz")
    images = torch.stack([train[i] for i in range(len(train))])
    x = torch.from_numpy(images_to_uint8(images)).permute(0, 3, 1, 2).float() / 255
    w = torch.randn(3 * 16 * 16, 2048, generator=torch.Generator().manual_seed(0))
    ref_mu, ref_sigma = feature_stats(torch.relu(x.flatten(1) @ w).double().numpy())
    # float32 features from batches of 4 vs one batch of all: equal up to float rounding (a wrong share is far off)
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-5, atol=1e-6 * np.abs(ref_mu).max())
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-4, atol=1e-6 * np.abs(ref_sigma).max())


@pytest.mark.machinery
def test_a_failure_on_any_process_ends_the_whole_job_at_once_with_its_one_line_error(tmp_path):
    cmd, env = _torchrun_script(tmp_path, fail_rank=1)
    # rank 0 waits in a barrier whose timeout is an hour: ending within the subprocess's 10 minutes, on a machine as
    # busy as it may be, shows that it never waited that timeout out
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "error: rank 1 cannot go on" in _rank_output(tmp_path, 1, "stderr").splitlines()


# ---------------------------------------------------------------------------------------------------------------------
# The CUDA path: `pytest -m cuda test_deme.py` on a machine with a GPU; skipped (with the reason) elsewhere

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA_RUN = ["--device", "cuda", "--pretrained", "", "--preset", "tiny", "--train-steps", "6", "--steps", "3",
            "--n-ranges", "2", "--batch-size", "8", "--ckpt-every", "2", "--search-images", "16", "--report-images", "16",
            "--search-evals", "3", "--n-samples", "16", "--sample-steps", "4", "--eval-batch", "8",
            "--models", "theta0,baseline,ensemble,merged"]


@pytest.mark.cuda
@cuda
def test_cuda_pipeline_trains_in_bf16_with_compile_and_channels_last(tmp_path):
    proc = run_cli(*CUDA_RUN, "--out", str(tmp_path / "run"), "--precision", "bf16", "--compile", "--channels-last")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["theta0", "baseline", "ensemble", "merged"]
    assert all(math.isfinite(r["value"]) and math.isfinite(r["heldout_loss"]) for r in results["rows"])
    ck = _load(tmp_path / "run" / "range_0" / "ckpt.pt")
    assert ck["config"]["precision"] == "bf16" and not [k for k in ck["model"] if "_orig_mod" in k]


@pytest.mark.cuda
@cuda
def test_cuda_device_without_an_index_runs_in_one_process(tmp_path):
    proc = run_cli("train", *CUDA_RUN, "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _load(tmp_path / "run" / "pretrain" / "ckpt.pt")["step"] == 6


@pytest.mark.cuda
@cuda
def test_cuda_one_process_torchrun_runs_the_pipeline(tmp_path):
    job = start_torchrun(tmp_path, "pipeline", "--out", str(tmp_path / "run"), *CUDA_RUN, "--no-baseline",
                         "--models", "theta0,merged", nproc=1)
    finish_torchrun(job)
    assert (tmp_path / "run" / "results.json").exists()


@pytest.mark.cuda
@cuda
def test_cuda_interrupted_then_resumed_finetune_ends_with_the_same_weights(tmp_path, monkeypatch):
    theta0 = UNet.from_preset("tiny").eval()
    settings = dict(ranges="1", steps=4, ckpt_every=2, device="cuda", precision="bf16", flip=True)
    cfg = tiny_cfg(tmp_path / "a", **settings)
    stage_finetune(cfg, setup_env(cfg), GaussianDiffusion(), theta0)
    whole = _load(tmp_path / "a" / "run" / "range_1" / "ckpt.pt")
    cfg = tiny_cfg(tmp_path / "b", **settings)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)
        with pytest.raises(KeyboardInterrupt):
            stage_finetune(cfg, setup_env(cfg), GaussianDiffusion(), theta0)
    cfg = dataclasses.replace(cfg, resume=True)
    stage_finetune(cfg, setup_env(cfg), GaussianDiffusion(), theta0)
    resumed = _load(tmp_path / "b" / "run" / "range_1" / "ckpt.pt")
    for part in ("model", "ema"):  # cuDNN may pick other kernels after a restart: equal up to float rounding
        for k in whole[part]:
            torch.testing.assert_close(resumed[part][k], whole[part][k], atol=1e-5, rtol=1e-4)


@pytest.mark.extras
@pytest.mark.cuda
@cuda
def test_cuda_fid_inception_features_match_the_cpu_within_1e_4(calibrated_weights):
    ours = FIDInception(calibrated_weights, check_hash=False)
    x = _smooth_images(8, 32, seed=3)
    with torch.no_grad():
        cpu = ours(x)
        with Env(torch.device("cuda")).exact():
            gpu = ours.cuda()(x.cuda()).cpu()
    assert ((gpu - cpu).abs().max() / cpu.abs().max()) < 1e-4


@pytest.mark.cuda
@cuda
def test_cuda_samples_do_not_depend_on_the_batch_size(tmp_path):
    model, d = tiny_theta0().cuda(), GaussianDiffusion()
    env = Env(torch.device("cuda"))
    for eta in (0.0, 1.0):
        a = sample_in_memory(Config(sample_steps=5, eta=eta, eval_batch=8), env, d, model, 8, seed=1)
        b = sample_in_memory(Config(sample_steps=5, eta=eta, eval_batch=3), env, d, model, 8, seed=1)
        assert np.abs(images_to_uint8(a).astype(int) - images_to_uint8(b).astype(int)).max() <= 1


# ----------------------------------------------------------------------------------------------------------------------
# The loss-reweighting baselines of DeMe Table 1: Min-SNR-γ and P2, as continued finetuning at equal compute

@pytest.mark.part2
def test_min_snr_and_p2_weights_are_their_closed_forms():
    d = GaussianDiffusion()
    t = torch.tensor([0, 10, 250, 600, 999])
    ab = [math.prod(1 - d.betas[s].item() for s in range(ti + 1)) for ti in t.tolist()]
    snr = [a / (1 - a) for a in ab]
    np.testing.assert_allclose(d.snr(t).numpy(), snr, rtol=1e-9)
    np.testing.assert_allclose(min_snr_weight(d.snr(t), 5.0).numpy(), [min(s, 5.0) / s for s in snr], rtol=1e-12)
    np.testing.assert_allclose(p2_weight(d.snr(t), 1.0, 1.0).numpy(), [1 / (1 + s) for s in snr], rtol=1e-12)
    assert min_snr_weight(d.snr(t), 5.0)[0] < 1e-3 and min_snr_weight(d.snr(t), 5.0)[-1] == 1.0  # low t weighs less
    assert p2_weight(torch.tensor([3.0]), k=2.0, gamma=0.5).item() == pytest.approx(5 ** -0.5)


@pytest.mark.part2
def test_a_reweighted_baseline_trains_with_its_weights_into_its_own_folder(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, steps=1, n_ranges=2, baseline_weighting="minsnr")
    seen = []
    real = DEME.min_snr_weight
    monkeypatch.setitem(DEME.LOSS_WEIGHTINGS, "minsnr", lambda snr: seen.append(len(snr)) or real(snr))
    stage_baseline(cfg, setup_env(cfg), GaussianDiffusion(), UNet.from_preset("tiny").eval())
    ck = _load(tmp_path / "run" / "baseline_minsnr" / "ckpt.pt")
    assert ck["step"] == 2 and ck["identity"]["weighting"] == "minsnr" and seen == [8, 8]
    assert not (tmp_path / "run" / "baseline").exists()
    assert named_model(cfg, setup_env(cfg), "baseline_minsnr").config == ck["model_config"]


@pytest.mark.machinery
def test_pretraining_writes_the_held_out_loss_curve_of_its_ema_and_a_resume_redoes_no_row(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, train_steps=4, ckpt_every=2, curve_every=1, search_images=16)
    with monkeypatch.context() as m:
        interrupt_after(m, 3)  # the curve has rows 1..3; the checkpoint is at step 2
        with pytest.raises(KeyboardInterrupt):
            stage_train(cfg, setup_env(cfg))
    stage_train(dataclasses.replace(cfg, resume=True), setup_env(cfg))
    rows = (tmp_path / "run" / "pretrain" / "heldout_curve.csv").read_text().splitlines()
    assert rows[0] == "step,heldout_loss,loss_range0,loss_range1,loss_range2,loss_range3"
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]
    ema = load_model(tmp_path / "run" / "pretrain" / "ckpt.pt")
    final = heldout_loss(ema, GaussianDiffusion(), heldout_images(cfg, 16, "select"), setup_env(cfg), 4,
                         role_seed(cfg.seed, "select"))[0]
    assert float(rows[-1].split(",")[1]) == pytest.approx(final, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Seeds: the comparison once per seed from the same θ0, and each model's spread

@pytest.mark.part4
def test_seed_summary_is_each_models_mean_and_min_max_over_seeds():
    row = lambda model, value, loss, per_range: dict(model=model, value=value, heldout_loss=loss,
                                                     heldout_loss_per_range=per_range)
    rows = {0: [row("theta0", 9.0, 0.030, [0.09, 0.01]), row("merged", 8.0, 0.029, [0.08, 0.02])],
            1: [row("theta0", 7.0, 0.034, [0.10, 0.03]), row("merged", 8.5, 0.031, [0.07, 0.01])],
            2: [row("theta0", 8.0, 0.032, [0.11, 0.02]), row("merged", 9.5, 0.027, [0.09, 0.03])]}
    summary = seed_summary(rows)
    assert list(summary) == ["theta0", "merged"]
    assert summary["theta0"]["value"] == dict(mean=8.0, min=7.0, max=9.0, values=[9.0, 7.0, 8.0])
    assert summary["merged"]["heldout_loss"]["mean"] == pytest.approx(0.029)
    assert (summary["merged"]["heldout_loss"]["min"], summary["merged"]["heldout_loss"]["max"]) == (0.027, 0.031)
    assert [r["mean"] for r in summary["theta0"]["heldout_loss_per_range"]] == pytest.approx([0.10, 0.02])
    assert summary["merged"]["heldout_loss_per_range"][1]["max"] == 0.03
    # paired with θ0 seed by seed: merged - θ0 = -1.0, +1.5, +1.5 (metric) and -3.3%, -8.8%, -15.6% (loss)
    assert summary["merged"]["value_vs_theta0"] == dict(mean=pytest.approx(2 / 3), min=-1.0, max=1.5,
                                                         values=[-1.0, 1.5, 1.5])
    assert summary["merged"]["loss_vs_theta0_pct"]["values"] == pytest.approx([-10 / 3, -300 / 34, -500 / 32])
    assert summary["merged"]["loss_per_range_vs_theta0_pct"][1]["values"] == pytest.approx([100.0, -200 / 3, 50.0])
    assert summary["theta0"]["loss_vs_theta0_pct"]["max"] == 0.0
    assert "value_vs_theta0" not in seed_summary({0: rows[0][1:]})["merged"]  # no θ0 row: nothing to pair with


@pytest.mark.part4
def test_seeds_run_the_comparison_per_seed_from_one_theta0_and_write_the_spread(tmp_path):
    out = tmp_path / "run"
    run_one_process("--out", str(out), *FAST, "--seeds", "3,5", "--no-baseline", "--models", "theta0,merged",
                    "--n-ranges", "2")
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [3, 5] and list(summary["models"]) == ["theta0", "merged"]
    for s in (3, 5):
        rows = json.loads((out / f"seed_{s}" / "results.json").read_text())["rows"]
        assert summary["models"]["merged"]["value"]["values"][[3, 5].index(s)] == rows[1]["value"]
        assert json.loads((out / f"seed_{s}" / "results.json").read_text())["seed"] == s
    assert not (out / "seed_3" / "pretrain").exists() and (out / "pretrain" / "ckpt.pt").exists()  # one θ0
    assert "[" in (out / "seeds.md").read_text() and (out / "seeds.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="distinct"):
        resolve_config(dict(seeds="1,1"))


# ----------------------------------------------------------------------------------------------------------------------
# The paper's regime on a laptop: the shipped converged θ0, precision auto, the plan line, the ablation

@pytest.mark.machinery
def test_the_shipped_theta0_loads_safely_has_the_tiny_layout_and_samples_shapes():
    path = ROOT / "assets" / ddpm_unet.PRETRAINED["tiny_synthetic"]["file"]
    assert path.stat().st_size <= 5 * 2 ** 20
    sd = torch.load(path, map_location="cpu", weights_only=True)
    want = UNet.from_preset("tiny").state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert all(v.dtype == torch.float32 for v in sd.values())
    theta0 = ddpm_unet.load_pretrained("tiny_synthetic")
    cfg = resolve_config(dict(device="cpu"))
    assert cfg.pretrained == "tiny_synthetic" and cfg.train_schedule == "cosine"
    env, d = setup_env(cfg), GaussianDiffusion()
    # trained: its held-out loss is a fraction of an untrained UNet's (about 1 for ε-prediction)
    images = heldout_images(cfg, 64, "select")
    trained = heldout_loss(theta0, d, images, env, 4, 0)[0]
    untrained = heldout_loss(UNet.from_preset("tiny").eval(), d, images, env, 4, 0)[0]
    assert trained < 0.05 and untrained > 0.5
    x = sample_in_memory(dataclasses.replace(cfg, sample_steps=10), env, d, theta0, 8, seed=0)
    assert x.shape == (8, 3, 16, 16) and x.abs().max() <= 1 and x.std() > 0.2  # images, not noise or flat grey


@pytest.mark.machinery
def test_a_changed_or_missing_shipped_theta0_is_refused_with_the_way_back(tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm_unet, "ASSETS", str(tmp_path))
    with pytest.raises(UserError, match="missing; restore it with `git checkout"):
        ddpm_unet.load_pretrained("tiny_synthetic")
    torch.save(UNet.from_preset("tiny").state_dict(), tmp_path / ddpm_unet.PRETRAINED["tiny_synthetic"]["file"])
    with pytest.raises(UserError, match=r"not the shipped file \(MD5 [0-9a-f]{32}\).*--pretrained PATH"):
        ddpm_unet.load_pretrained("tiny_synthetic")


@pytest.mark.machinery
def test_the_pretraining_learning_rate_warms_up_then_decays_to_zero_on_a_cosine():
    f = lambda k: lr_factor(k, steps=1100, warmup=100, schedule="cosine")
    assert [f(0), f(49), f(99)] == pytest.approx([0.01, 0.5, 1.0])
    assert f(100) == 1.0 and f(600) == pytest.approx(0.5) and f(1099) == pytest.approx(0.0, abs=1e-5)
    assert all(f(k) >= f(k + 1) for k in range(100, 1099))
    assert lr_factor(5000, 1100, 100) == 1.0  # constant, DDPM


@pytest.mark.machinery
def test_train_writes_theta0_alone_in_the_layout_the_pipeline_loads(tmp_path):
    cfg = tiny_cfg(tmp_path, train_steps=2, train_schedule="cosine")
    stage_train(cfg, setup_env(cfg))
    path = tmp_path / "run" / "pretrain" / "theta0.pt"
    ema = _load(tmp_path / "run" / "pretrain" / "ckpt.pt")["ema"]
    sd = torch.load(path, weights_only=True)
    assert sd.keys() == ema.keys() and all(torch.equal(sd[k], ema[k]) for k in sd)
    assert ddpm_unet.load_pretrained(path).config == UNet.from_preset("tiny").config


@pytest.mark.machinery
def test_precision_auto_trains_in_fp32_on_every_cpu_whatever_a_timing_would_say(monkeypatch, tmp_path):
    cfg = resolve_config(dict(device="cpu", out=str(tmp_path)))
    timed = []
    monkeypatch.setattr(DEME, "rates", lambda *a, **k: timed.append(1) or {})
    for native in (False, True):  # emulated bf16, and AVX512-BF16 where bf16 would time faster
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        env = setup_env(cfg)
        assert (env.precision, env.eval_precision) == ("fp32", "fp32")
    assert not timed  # nothing is timed: the machine's load can never change a result
    assert setup_env(dataclasses.replace(cfg, precision="bf16")).precision == "bf16"  # an opt-in
    for name, value in (("is_available", lambda: True), ("device_count", lambda: 1), ("current_device", lambda: 0),
                        ("set_device", lambda d: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    for supported in (True, False):  # on a GPU: bf16 where it has bf16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert setup_env(dataclasses.replace(cfg, device="cuda")).precision == ("bf16" if supported else "fp32")


@pytest.mark.part1
def test_the_synthetic_dataset_is_fixed_and_a_seed_changes_only_the_training():
    a, b = (make_dataset(resolve_config(dict(seed=s)), split).tensors[0] for s in (0, 7) for split in ["train"])
    assert torch.equal(a, b)
    assert torch.equal(heldout_images(resolve_config(dict(seed=0)), 8, "report"),
                       heldout_images(resolve_config(dict(seed=7)), 8, "report"))


@pytest.mark.machinery
def test_a_folder_on_a_cpu_gets_the_cpu_recipe_and_on_a_gpu_the_papers(tmp_path):
    folder = dict(dataset="folder", data_dir=str(_png_folder(tmp_path / "data", MIN_FOLDER_IMAGES, size=(8, 8))))
    cpu = resolve_config(dict(folder, device="cpu"))
    assert (cpu.steps, cpu.train_steps, cpu.train_schedule, cpu.metric, cpu.pretrained) == \
        (CPU_RECIPE["steps"], CPU_RECIPE["train_steps"], "cosine", "pixel", "")
    assert resolve_config(dict(folder, device="cpu", steps=7)).steps == 7  # flags still win
    gpu = resolve_config(dict(folder, device="cuda"))
    assert gpu.steps == Config.steps == 20000 and gpu.n_samples == 50000


@pytest.mark.machinery
def test_a_small_folder_holds_out_a_larger_share_and_caps_the_counts_no_flag_gave(tmp_path, capsys):
    data = _png_folder(tmp_path / "data", 1800, size=(8, 8))  # as many images as scikit-learn's digits
    folder = dict(dataset="folder", data_dir=str(data), device="cpu", out=str(tmp_path / "run"))
    notes = []
    cfg = resolve_config(folder, notes)
    select, report = (len(make_dataset(cfg, role)) for role in ("select", "report"))
    assert 0.1 < cfg.heldout_fraction <= max(HELDOUT_FRACTIONS) and 200 < select and 200 < report
    assert (cfg.search_images, cfg.report_images) == (min(CPU_RECIPE["search_images"], select), report)
    assert 2 * cfg.n_samples <= len(make_dataset(cfg, "eval"))  # the pixel metric's two sets of real images
    assert len(notes) == 1 and "\n" not in notes[0] and f"--heldout-fraction 0.1 -> {cfg.heldout_fraction}" in notes[0]
    assert f"--report-images {CPU_RECIPE['report_images']} -> {report}" in notes[0]
    kept = resolve_config(dict(folder, heldout_fraction=0.2, report_images=2000))  # what a flag says is kept
    assert (kept.heldout_fraction, kept.report_images) == (0.2, 2000)
    # the defaults run, from θ0 to the results table, with no flag about the splits
    run_one_process("--dataset", "folder", "--data-dir", str(data), "--out", str(tmp_path / "run"), "--device", "cpu",
                    "--train-steps", "2", "--steps", "1", "--batch-size", "8", "--n-ranges", "2", "--sample-steps",
                    "2", "--search-evals", "2", "--no-baseline", "--models", "theta0,merged")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["report_images"] == report and len(results["rows"]) == 2
    # a folder too small to train, select and report: one line naming the minimum, and nothing made
    _png_folder(tmp_path / "few", 30, size=(8, 8))
    line = cli_error(capsys, "--dataset", "folder", "--data-dir", str(tmp_path / "few"), "--out",
                     str(tmp_path / "none"), "--device", "cpu")
    assert f"at least {MIN_FOLDER_IMAGES} images" in line and "holds 30 images" in line
    assert not (tmp_path / "none").exists()


@pytest.mark.machinery
def test_a_dry_run_checks_and_plans_without_training_sampling_or_writing(tmp_path, capsys):
    out = tmp_path / "run"
    run_one_process("--out", str(out), *FAST, "--seed", "3", "--dry-run")
    printed = capsys.readouterr().out
    plan = [line for line in printed.splitlines() if line.startswith("plan: ")]
    assert len(plan) == 1 and "pretrain θ0: 10 steps" in plan[0] and "dry run:" in printed
    assert not out.exists()
    # the configuration, readably: what differs from the defaults, by where it came from
    summary = printed[:printed.index("plan: ")]
    assert summary.startswith("deme.py pipeline: synthetic into") and len(summary) < 1500
    flags = next(line for line in summary.splitlines() if line.startswith("  from flags: "))
    assert "seed=3" in flags and "train_steps=10" in flags and "pretrained=," in flags
    assert "from the synthetic preset: train_lr=0.001" in summary and "sample_steps=4" in flags
    assert "adam_eps" not in summary and "the whole configuration" not in summary  # a default; nothing saved
    # a mistake is still one line and exit code 2, before anything is made
    assert "not a probability" in cli_error(capsys, "--out", str(out), *FAST, "--p-global", "2", "--dry-run")
    assert "cannot read FID statistics" in cli_error(capsys, "--out", str(out), *FAST, "--fid-stats",
                                                     str(tmp_path / "missing.npz"), "--dry-run")
    assert not out.exists()
    # stages the run folder has already trained are left out of the plan
    run_one_process("train", "--out", str(out), *FAST)
    capsys.readouterr()
    run_one_process("--out", str(out), *FAST, "--dry-run")
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: "))
    assert "pretrain" not in plan and "DeMe finetuning: 4 ranges" in plan and "sample baseline" in plan
    run_one_process("--out", str(out), *FAST, "--no-baseline", "--dry-run")  # a model the run will not make
    plan = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: "))
    assert "baseline" not in plan and "sample merged" in plan
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["pretrain"]


@pytest.mark.machinery
def test_every_training_command_first_prints_its_plan_and_projected_duration(tmp_path, capsys):
    run_one_process("--out", str(tmp_path / "run"), *FAST, "--n-ranges", "2", "--models", "theta0,merged")
    out = capsys.readouterr().out
    plan = [line for line in out.splitlines() if line.startswith("plan: ")]
    assert len(plan) == 1 and "pretrain θ0: 10 steps" in plan[0] and "DeMe finetuning: 2 ranges x 2 steps" in plan[0]
    assert "sample merged: 64 x 4 steps" in plan[0] and "Projected" in plan[0]
    assert out.index("plan: ") < out.index("merged 2 ranges")  # before the work
    r = dict(train_plain_img_s=10.0, train_deme_img_s=5.0, forward_img_s=100.0, sampling_img_s=10.0, sample_steps=10)
    cfg = resolve_config(dict(steps=100, batch_size=10, n_samples=50, models="theta0,merged", seeds="0,1",
                              out=str(tmp_path / "other")))
    plan = dict(projected_time(cfg, r, ("finetune", "baseline", "evaluate")))
    assert plan["DeMe finetuning: 8 ranges x 100 steps x 10"] == pytest.approx(2 * 4 * 100 * 10 / 5.0)
    assert plan["baseline: 2 x 400 steps x 10"] == pytest.approx(2 * 400 * 10 / 10.0)
    assert plan["total"] == pytest.approx(1600 + 800 + 2 * 2 * 50 / 10)


@pytest.mark.part4
def test_an_evaluation_is_kept_and_reused_only_for_the_same_model_and_protocol(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, n_samples=16, sample_steps=2, report_images=16)
    env, d = setup_env(cfg), GaussianDiffusion()
    calls = []
    real = DEME.sample_in_memory
    monkeypatch.setattr(DEME, "sample_in_memory", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = evaluation_reference(cfg, env)
    a, b = tiny_theta0(0), tiny_theta0(1)
    first, grid = evaluate_model(cfg, env, d, a, "a", ref)
    again, grid2 = evaluate_model(cfg, env, d, a, "renamed", ref)
    assert len(calls) == 1 and again == dict(first, model="renamed")
    assert (grid2 - grid).abs().max() <= 1 / 127.5 + 1e-6  # kept as 8-bit images
    evaluate_model(cfg, env, d, b, "b", ref)  # another model
    evaluate_model(dataclasses.replace(cfg, sample_steps=3), env, d, a, "a", ref)  # another sampler
    assert len(calls) == 3


@pytest.mark.part4
def test_the_ablation_runs_every_row_at_equal_compute_and_writes_its_table_and_chart(tmp_path):
    out = tmp_path / "run"
    argv = ["--out", str(out), *FAST, "--steps", "2", "--n-samples", "16", "--report-images", "16",
            "--search-evals", "3", "--sample-steps", "2", "--seeds", "1"]
    run_one_process("ablation", *argv)
    table = json.loads((out / "ablation.json").read_text())
    assert table["seeds"] == [1] and list(table["models"]) == list(ABLATION)  # (the spread: test_seeds_run_...)
    for name, d in table["models"].items():
        assert len(d["heldout_loss"]["values"]) == 1 and len(d["heldout_loss_per_range"]) == 4, name
        assert d["heldout_loss"]["min"] <= d["heldout_loss"]["mean"] <= d["heldout_loss"]["max"]
    # DeMe's row is the pipeline's own run (range_*, baseline, merge in seed_<s>/, as `--seeds` makes them), so a
    # pipeline run with the same flags afterwards reuses every stage and every evaluation
    assert (out / "seed_1" / "merge" / "merged.pt").exists() and (out / "seed_1" / "range_3" / "ckpt.pt").exists()
    kept = len(list((out / "seed_1" / "evaluations").iterdir()))
    run_one_process(*argv, "--models", "theta0,baseline,merged")
    assert len(list((out / "seed_1" / "evaluations").iterdir())) == kept
    rows = json.loads((out / "seed_1" / "results.json").read_text())["rows"]
    deme_row = table["models"]["N=4 + PS + CL + CP (DeMe)"]["heldout_loss"]["values"][0]
    assert deme_row == next(r["heldout_loss"] for r in rows if r["model"] == "merged")
    steps = {}
    for folder in sorted((out / "seed_1" / "ablation").iterdir()):
        cks = [_load(folder / f"range_{i}" / "ckpt.pt") for i in range(8) if (folder / f"range_{i}").exists()]
        steps[folder.name] = (len(cks), cks[0]["step"], cks[0]["identity"]["consistency"],
                              cks[0]["identity"]["projections"])
    assert steps == {"n1_consistency0_projections1": (1, 8, 0.0, True),
                     "n8_consistency0_projections0": (8, 1, 0.0, False),
                     "n8_consistency1_projections0": (8, 1, 1.0, False),
                     "n8_consistency1_projections1": (8, 1, 1.0, True)}
    assert _load(out / "seed_1" / "baseline_p2" / "ckpt.pt")["step"] == 8
    assert "| N=8 + PS + CL + CP |" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        run_one_process("ablation", *argv, "--steps", "3")  # 12 steps do not split over 8 ranges


# ----------------------------------------------------------------------------------------------------------------------
# Reading order: the method first, and the README's reading guide true to the code

def _reading_guide_rows():
    """(cell, names before "Part II:", names after) of each row of the README's reading guide."""
    readme = (ROOT / "README.md").read_text()
    guide = readme.split("## Reading the code beside the paper", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[3] for line in guide.splitlines() if line.startswith("| ") and "|---" not in line][1:]
    names = lambda text: re.findall(r"`([A-Za-z_][\w.]*)`", text)
    return [(cell, names(cell.partition("Part II:")[0]), names(cell.partition("Part II:")[2])) for cell in rows]


@pytest.mark.machinery
def test_no_function_needs_a_table_of_contents_and_the_network_file_stays_in_budget():
    for module, most_lines in ((deme, None), (ddpm_unet, 600)):
        source = Path(module.__file__).read_text()
        assert most_lines is None or len(source.splitlines()) <= most_lines, (module.__name__, most_lines)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef):  # stage_merge is the one hard read of the method: Eq. 8 and a call
                most = 40 if node.name == "stage_merge" else 90
                assert node.end_lineno - node.lineno + 1 <= most, (module.__name__, node.name, node.lineno)


@pytest.mark.machinery
def test_part_one_holds_the_method_first_and_the_reading_guide_names_each_function_where_it_is():
    lines = (ROOT / "deme.py").read_text().splitlines()
    start, end = lines.index("# Part I: the method") + 1, lines.index("# Part II: machinery") + 1
    assert start <= 300 and end - start <= 800, (start, end)  # a student meets DeMe early and reads it in a sitting
    found = {}  # top-level name -> (module, line)
    for module in (deme, ddpm_unet):
        for node in ast.parse(Path(module.__file__).read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node]
            for t in targets:
                if isinstance(t, (ast.FunctionDef, ast.ClassDef, ast.Name)):
                    found.setdefault(getattr(t, "name", None) or t.id, (module, node.lineno))
    rows = _reading_guide_rows()
    assert len(rows) >= 15 and sum(len(before) + len(after) for _, before, after in rows) >= 35
    for cell, before, after in rows:
        owner = None  # a bare name that is not top-level is a method of the class named before it in the cell
        for name, part in [(n, "I") for n in before] + [(n, "II") for n in after]:
            top, _, attr = name.partition(".")
            if top not in found and owner is not None:
                top, attr = owner, top
            assert top in found, f"README reading guide names {name!r}, which is not in deme.py or ddpm_unet.py"
            module, line = found[top]
            if attr:
                assert hasattr(getattr(module, top), attr), name
                owner = top
            if "ddpm_unet.py" in cell:
                assert module is ddpm_unet, name
            else:
                assert module is deme and (start < line < end) == (part == "I"), (name, line, part, start, end)


# ----------------------------------------------------------------------------------------------------------------------
# Exercises: the student copy a course hands out

def _pytest_in(folder, *args) -> subprocess.Popen:
    """`python -m pytest ARGS` started in `folder` on one thread (several run at once), output captured."""
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.machinery
def test_each_parts_tests_fail_on_its_exercises_in_the_student_copy_and_pass_on_the_reference(tmp_path):
    every = deme.exercise_command(tmp_path / "every")
    guide = (every / "EXERCISES.md").read_text()
    for k, (part, file, func, what) in enumerate(deme.EXERCISES, 1):
        assert f"NotImplementedError({f'Exercise {k}: {what}'!r})" in (every / file).read_text()
        assert f"{k}. `{func}` in {file}: {what}" in guide and f"pytest -m part{part}" in guide
    student = (every / "deme.py").read_text()
    assert '"""x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, DDPM Eq. 4."""' in student  # docstrings stay
    assert "return self._at(self.alphas_bar.sqrt(), t, x0) * x0" not in student  # the answer does not
    again = run_cli("exercise", "--out", str(every))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr
    runs = {}
    for part in (1, 2, 3, 4):  # a copy without this part's exercises alone: this part's tests fail on exactly them
        deme.exercise_command(tmp_path / f"part{part}", (part,))
        runs[part] = _pytest_in(tmp_path / f"part{part}", "-m", f"part{part} and not extras", "-x", "test_deme.py")
    failed = []
    for part, run in runs.items():
        out = run.communicate(timeout=600)[0]
        raised = {int(k) for k in re.findall(r"NotImplementedError: Exercise (\d+)", out)}
        mine = {k for k, e in enumerate(deme.EXERCISES, 1) if e[0] == part}
        assert run.returncode == 1 and raised and raised <= mine, (part, raised, out[-3000:])
        failed += re.findall(r"^FAILED (test_deme\.py::\S+)", out, re.M)
    assert len(failed) == 4
    ref = _pytest_in(ROOT, *failed)  # the reference passes the very tests the student copies failed
    out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0 and "4 passed" in out, out[-3000:]
