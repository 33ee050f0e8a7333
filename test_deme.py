"""The specification of this project, as tests: each test is a sentence about the method or its code.

Sections follow the code: the UNet and its checkpoints (ddpm_unet.py), the diffusion core, data, training and
decoupled finetuning, merging, evaluation, analysis, scale-out, Stable Diffusion, and bad input. Nothing here
downloads: fake datasets and random weights in the real formats are made by the tests themselves.
"""
import copy
import dataclasses
import io
import itertools
import json
import math
import os
import pickle
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
from deme import (FID_WEIGHTS_NAME, FID_WEIGHTS_URL, FIDInception, RangeEnsemble, dataset_stats,  # noqa: E402
                  feature_stats, fid_command, frechet_distance, generate_samples, images_to_uint8, load_stats, merge,
                  pixel_frechet, pixel_frechet_report, rerank, sample_timesteps, save_stats, search_merge_weights,
                  task_vectors, timestep_ranges)

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


# ======================================================================================================================
# Diffusion core: schedule, samplers against diffusers, EMA
# ======================================================================================================================

def test_linear_schedule_matches_the_ddpm_paper():
    d = deme.GaussianDiffusion()
    assert d.betas.dtype == torch.float64 and d.alphas_bar.dtype == torch.float64 and len(d.betas) == 1000
    assert d.alphas_bar[0].item() == pytest.approx(0.9999, abs=1e-12)
    assert d.alphas_bar[999].item() == pytest.approx(4.0358e-5, rel=1e-4)


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


def test_ddim_with_eta_matches_diffusers_given_the_same_noise():
    d, sched = deme.GaussianDiffusion(), _ddim_scheduler(True)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    mine = d.ddim_step(x, eps, 500, 450, eta=0.7, noise=z)
    theirs = sched.step(eps, 500, x, eta=0.7, variance_noise=z).prev_sample
    assert (mine - theirs).abs().max() < 1e-5


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


def test_a_seed_fixes_every_sample_of_both_samplers():
    d, model = deme.GaussianDiffusion(T=1000), UNet.from_preset("tiny").eval()
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    run = lambda: d.ddim_sample(model, x_T, 5, eta=1.0, generator=torch.Generator().manual_seed(3))
    a, b = run(), run()
    assert torch.equal(a, b) and a.abs().max() <= 1
    short = deme.GaussianDiffusion(T=5, beta_start=0.1, beta_end=0.2)  # 5 ancestral steps keep the test fast
    run = lambda: short.ddpm_sample(model, x_T, generator=torch.Generator().manual_seed(3))
    assert torch.equal(run(), run())


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


def test_a_fake_cifar10_in_the_real_format_loads_through_the_cifar10_path(tmp_path):
    batches = write_fake_cifar10(tmp_path)
    cfg = deme.resolve_config(dict(dataset="cifar10", preset="tiny", image_size=32, data_dir=str(tmp_path),
                                   out=str(tmp_path / "run")))
    ds = deme.make_dataset(cfg)
    assert len(ds) == 100 and ds[0].shape == (3, 32, 32)
    first = torch.from_numpy(batches["data_batch_1"][0].reshape(3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(ds[0], first) and ds[0].min() >= -1 and ds[0].max() <= 1
    assert len(deme.heldout_images(cfg, 7)) == 7  # the test split


def test_cifar10_batch_files_that_run_code_are_refused(tmp_path):
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump(RunsCode(str(marker)), f)
    with pytest.raises(UserError, match="not a CIFAR-10 batch file"):
        deme.cifar10_images(tmp_path)
    assert not marker.exists()


def test_missing_cifar10_without_download_names_the_folder(tmp_path):
    with pytest.raises(UserError, match="--download"):
        deme.cifar10_images(tmp_path)


def test_a_folder_of_pngs_loads_through_folder_and_skips_what_is_not_an_image(tmp_path, capsys):
    from PIL import Image
    (tmp_path / "sub").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 24), (i * 80, 0, 255)).save(tmp_path / "sub" / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    cfg = deme.resolve_config(dict(dataset="folder", data_dir=str(tmp_path), out=str(tmp_path / "run")))
    ds = deme.make_dataset(cfg)
    assert len(ds) == 3 and ds[1].shape == (3, 16, 16)
    assert ds[2][0, 0, 0].item() == pytest.approx(160 / 255 * 2 - 1, abs=1e-6) and ds[2][2].max() == 1
    assert "skipped 2 file(s)" in capsys.readouterr().err


def test_an_empty_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(UserError, match="no readable images"):
        deme.image_files(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        deme.image_files(tmp_path / "missing")


def test_the_synthetic_set_is_identical_for_the_same_seed():
    a, b, c = deme.synthetic_images(16, 16, seed=5), deme.synthetic_images(16, 16, seed=5), deme.synthetic_images(16, 16, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 3, 16, 16) and a.min() >= -1 and a.max() <= 1 and a.std() > 0.3


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
    base = dict(out=str(tmp_path / "run"), device="cpu", batch_size=8, steps=4, train_steps=4, ckpt_every=2,
                n_samples=32, eval_batch=32, sample_steps=5, search_images=32, search_evals=4)
    return deme.resolve_config({**base, **kw})


def test_training_on_the_synthetic_set_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, batch_size=32)
    env, d = deme.setup_env(cfg), deme.GaussianDiffusion()
    model = UNet.from_preset("tiny")
    images = deme.heldout_images(cfg, 128)
    before = deme.heldout_loss(model, d, images, env)[0]
    uniform = lambda b, g: torch.randint(0, 1000, (b,), generator=g)
    deme.train_loop(cfg, env, tmp_path / "train", model, deme.make_dataset(cfg), d, steps=40, lr=1e-3, warmup=5,
                    timesteps=uniform, identity={}, seed=0)
    after = deme.heldout_loss(model, d, images, env)[0]
    assert after < 0.6 * before, (before, after)
    assert (tmp_path / "train" / "ckpt.pt").exists() and (tmp_path / "train" / "grid_000040.png").exists()


def test_the_consistency_loss_is_zero_at_step_zero_and_projections_change_nothing():
    theta0 = UNet.from_preset("tiny").eval()
    student = deme.add_channel_projections(copy.deepcopy(theta0)).eval()
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([3, 300, 600, 990])
    assert F.mse_loss(student(x, t), deme.frozen(theta0)(x, t)).item() == 0.0


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


def test_a_run_killed_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE.format(root=str(ROOT), out=str(out))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "pretrain" / "ckpt.pt.tmp").exists()  # the half-written file never replaced the good one
    ck = deme.load_checkpoint(out / "pretrain" / "ckpt.pt")
    assert ck["step"] == 2
    proc = run_cli("train", "--out", str(out), "--device", "cpu", "--train-steps", "4", "--ckpt-every", "2",
                   "--batch-size", "8", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert deme.load_checkpoint(out / "pretrain" / "ckpt.pt")["step"] == 4


def test_checkpoints_that_run_code_are_refused_without_running_it(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": RunsCode(str(marker))}, path)
    with pytest.raises(UserError, match="cannot be read"):
        deme.load_checkpoint(path)
    proc = run_cli("evaluate", "--out", str(tmp_path / "run"), "--models", str(path), "--device", "cpu")
    assert proc.returncode != 0 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


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


def test_bad_numbers_get_one_line_each(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run"), "--device", "cpu"]
    assert "--n-ranges 0" in cli_error(capsys, "finetune", "--n-ranges", "0", *out)
    assert "indices must lie in 0..3" in cli_error(capsys, "finetune", "--ranges", "7", *out)
    assert "not a probability" in cli_error(capsys, "finetune", "--p-global", "1.5", *out)
    assert "one per range" in cli_error(capsys, "merge", "--merge-weights", "0.1,0.2", *out)
    assert "unknown preset 'huge'" in cli_error(capsys, "train", "--preset", "huge", *out)
    assert "invalid choice: 'imagenet'" in cli_error(capsys, "train", "--dataset", "imagenet", *out)
    assert "multiple of 4" in cli_error(capsys, "train", "--image-size", "18", *out)
    assert "--batch-size" in cli_error(capsys, "train", "--batch-size", "6", "--grad-accum", "4", *out)


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


def test_bad_checkpoints_are_a_clear_error(capsys, tmp_path):
    out = ["--out", str(tmp_path / "run"), "--device", "cpu", "--steps", "1"]
    assert "does not exist" in cli_error(capsys, "finetune", "--pretrained", str(tmp_path / "none.pt"), *out)
    good = tmp_path / "good.pt"
    torch.save(UNet.from_preset("tiny").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    assert "truncated.pt" in cli_error(capsys, "finetune", "--pretrained", str(truncated), *out)
    other = tmp_path / "other.pt"
    torch.save(UNet.from_preset("tiny", ch=64).state_dict(), other)
    line = cli_error(capsys, "finetune", "--pretrained", str(other), "--preset", "tiny", *out)
    assert "conv_in.weight" in line or "preset" in line


def test_an_unwritable_run_folder_is_a_clear_error(capsys, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    assert "cannot write to the run folder" in cli_error(capsys, "train", "--out", str(tmp_path / "file" / "run"))


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

def test_all_zero_weights_give_the_base_model_exactly():
    base, finetuned = make_state_dicts()
    merged = merge(base, finetuned, weights=[0.0] * 4)
    assert all(torch.equal(merged[k], base[k]) and merged[k].dtype == base[k].dtype for k in base)


def test_one_model_with_weight_one_gives_that_model():
    base, finetuned = make_state_dicts(n=1)
    merged = merge(base, finetuned, weights=[1.0])
    assert_state_dicts_close({k: v for k, v in merged.items() if v.is_floating_point()},
                             {k: v for k, v in finetuned[0].items() if v.is_floating_point()})


def test_average_is_the_mean_of_the_finetuned_models_and_ignores_weights():
    base, finetuned = make_state_dicts(half=False)
    merged = merge(base, finetuned, weights=[5.0, 0.0, 0.0, 0.0], method="average")
    mean = {k: torch.stack([sd[k] for sd in finetuned]).mean(0) for k in base if base[k].is_floating_point()}
    assert_state_dicts_close({k: merged[k] for k in mean}, mean)


def test_task_arithmetic_with_uniform_weights_equals_the_average():
    base, finetuned = make_state_dicts()
    average = merge(base, finetuned, method="average")
    assert_state_dicts_close(merge(base, finetuned, weights=[0.25] * 4), average)
    assert_state_dicts_close(merge(base, finetuned), average)  # default weights are 1/N


def test_task_arithmetic_is_theta0_plus_the_weighted_sum_of_task_vectors():
    base, finetuned = make_state_dicts(half=False)
    w = [0.1, 0.1, 0.2, 0.5]  # the official LSUN-Church weights
    merged, taus = merge(base, finetuned, weights=w), task_vectors(base, finetuned)
    assert set(taus[0]) == {k for k in base if base[k].is_floating_point()}  # integer buffers have no τ
    for k in taus[0]:
        torch.testing.assert_close(merged[k], base[k] + sum(w_i * tau[k] for w_i, tau in zip(w, taus)))


def test_ties_with_k100_and_agreeing_signs_is_the_mean_task_vector():
    base, _ = make_state_dicts(half=False)
    g = torch.Generator().manual_seed(1)
    signs = {k: torch.randn(v.shape, generator=g).sign() for k, v in base.items() if v.is_floating_point()}
    finetuned = [{k: base[k] + signs[k] * torch.rand(base[k].shape, generator=g) if k in signs else base[k]
                  for k in base} for _ in range(3)]
    merged = merge(base, finetuned, method="ties", k=100, lam=1.0)
    for k in signs:
        torch.testing.assert_close(merged[k], torch.stack([sd[k] for sd in finetuned]).mean(0))


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


def test_ties_drops_the_entries_that_disagree_with_the_elected_sign():
    base = {"w": torch.zeros(10)}
    finetuned = [{"w": torch.full((10,), 1.0)}, {"w": torch.full((10,), 2.0)}, {"w": torch.full((10,), -4.0)}]
    merged = merge(base, finetuned, method="ties", k=100, lam=0.5)
    torch.testing.assert_close(merged["w"], torch.full((10,), 0.5 * -4.0))  # Σ = -1 elects "-": only -4 survives


def test_dare_with_p0_is_task_arithmetic():
    base, finetuned = make_state_dicts()
    w = [0.1, 0.1, 0.2, 0.5]
    assert_state_dicts_close(merge(base, finetuned, w, method="dare", p=0.0), merge(base, finetuned, w))


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


@pytest.mark.parametrize("method", ["task_arithmetic", "average", "ties", "dare"])
def test_integer_buffers_pass_through_from_the_base_untouched(method):
    base, finetuned = make_state_dicts()
    merged = merge(base, finetuned, method=method)
    assert merged["bn.num_batches_tracked"].dtype == torch.int64 and merged["bn.num_batches_tracked"].item() == 100
    assert merged["attn.weight"].dtype == torch.float16


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


def test_merge_mistakes_raise_user_errors():
    base, finetuned = make_state_dicts()
    renamed = dict(finetuned[1])
    renamed["conv.weights"] = renamed.pop("conv.weight")
    with pytest.raises(UserError, match="conv.weight"):
        merge(base, [finetuned[0], renamed])
    with pytest.raises(UserError, match="weights"):
        merge(base, finetuned, weights=[0.5, 0.5])
    with pytest.raises(UserError, match="task_arithmetic"):
        merge(base, finetuned, method="soup")
    with pytest.raises(UserError, match="lam"):
        merge(base, finetuned, method="ties", p=0.5)
    with pytest.raises(UserError):
        merge(base, finetuned, method="dare", p=1.0)
    with pytest.raises(UserError):
        merge(base, finetuned, method="ties", k=0)


# ----------------------------------------------------------------------------- timestep ranges and sampling

def test_timestep_ranges_split_0_to_T_into_n_equal_contiguous_ranges():
    assert timestep_ranges(4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    eight = timestep_ranges(8)
    assert len(eight) == 8 and eight[0][0] == 0 and eight[-1][1] == 1000
    assert all(hi - lo == 125 for lo, hi in eight) and all(a[1] == b[0] for a, b in zip(eight, eight[1:]))
    for n in (3, 7):  # when n does not divide T, range i is exactly the t that Eq. 7 routes to model i
        for i, (lo, hi) in enumerate(timestep_ranges(n)):
            assert all(t * n // 1000 == i for t in range(lo, hi))
    for bad in (0, 1001, 2.5):
        with pytest.raises(UserError):
            timestep_ranges(bad)


def test_sampled_timesteps_stay_in_their_range_when_p_is_0():
    g = torch.Generator().manual_seed(0)
    for lo, hi in timestep_ranges(4):
        for per_batch in (True, False):
            t = sample_timesteps(63, lo, hi, p=0.0, per_batch=per_batch, generator=g)
            assert t.dtype == torch.int64 and t.shape == (63,) and t.min() >= lo and t.max() < hi


def test_sampled_timesteps_cover_all_of_0_to_T_when_p_is_1():
    g = torch.Generator().manual_seed(0)
    t = torch.cat([sample_timesteps(64, 0, 250, p=1.0, generator=g) for _ in range(200)])
    assert set(t.tolist()) == set(range(1000))


def test_a_fraction_p_of_batches_is_drawn_from_all_timesteps():
    g = torch.Generator().manual_seed(0)
    batches = [sample_timesteps(16, 0, 250, p=0.3, generator=g) for _ in range(2000)]
    frac_global = sum(bool((b >= 250).any()) for b in batches) / 2000  # a global antithetic pair always leaves [0,250)
    assert abs(frac_global - 0.3) < 0.04


def test_per_sample_coins_draw_a_fraction_p_of_samples_from_all_timesteps():
    g = torch.Generator().manual_seed(0)
    t = torch.cat([sample_timesteps(16, 0, 250, p=0.3, per_batch=False, antithetic=False, generator=g)
                   for _ in range(2000)])
    assert abs((t >= 250).float().mean().item() - 0.3 * 0.75) < 0.02  # a global draw lands outside w.p. 0.75


def test_antithetic_pairs_sum_to_a_plus_b_minus_1_of_their_interval():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(9, 250, 500, p=0.0, generator=g)
    assert t.shape == (9,) and (t[:4] + t[5:9] == 749).all()
    t = sample_timesteps(8, 250, 500, p=1.0, generator=g)
    assert (t[:4] + t[4:] == 999).all()
    for _ in range(50):  # per-sample coins: each pair shares its own interval
        t = sample_timesteps(16, 250, 500, p=0.5, per_batch=False, generator=g)
        assert set((t[:8] + t[8:]).tolist()) <= {749, 999}


def test_the_same_generator_seed_gives_the_same_timesteps():
    a = sample_timesteps(32, 500, 750, generator=torch.Generator().manual_seed(7))
    b = sample_timesteps(32, 500, 750, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_invalid_sampling_arguments_raise_user_errors():
    for kwargs in (dict(p=-0.1), dict(p=1.5), dict(lo=250, hi=250), dict(lo=900, hi=1100), dict(lo=-1, hi=10)):
        with pytest.raises(UserError):
            sample_timesteps(8, **{"lo": 0, "hi": 250, **kwargs})


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


def test_search_is_deterministic_respects_max_evals_and_clips_weights():
    objective, _ = quadratic((2.0, -1.0), torch.eye(2, dtype=torch.float64))
    assert search_merge_weights(objective, 2, progress=False) == search_merge_weights(objective, 2, progress=False)
    assert search_merge_weights(objective, 2, progress=False)["weights"] == [1.5, 0.0]  # w clipped to [0, 1.5]
    assert search_merge_weights(objective, 2, max_evals=4, progress=False)["evals"] == 4


def test_rerank_sorts_candidates_by_the_second_score():
    ranked = rerank([(0.1, 0.2), (0.3, 0.3), (0.0, 0.0)], score=lambda w: abs(sum(w) - 0.6))
    assert [r["w"] for r in ranked] == [[0.3, 0.3], [0.1, 0.2], [0.0, 0.0]]
    assert ranked[0]["score"] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: Fréchet distance, FID Inception, statistics files, sample generation, pixel Fréchet distance
# ---------------------------------------------------------------------------------------------------------------------

def _random_spd(d, rng, rank=None):
    """A random symmetric PSD matrix (d, d) of the given rank (full by default)."""
    A = rng.standard_normal((d, rank or d))
    return A @ A.T / (rank or d)


def test_frechet_with_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(0)
    mu1, mu2, sigma = rng.standard_normal(32), rng.standard_normal(32), _random_spd(32, rng)
    expected = np.sum((mu1 - mu2) ** 2)
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9, abs=1e-9)


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


def test_frechet_of_a_sample_against_itself_is_zero():
    features = np.random.default_rng(2).standard_normal((300, 64)) * np.linspace(0.1, 5, 64)
    mu, sigma = feature_stats(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # scipy.linalg.sqrtm's `disp`, used by pytorch-fid
def test_frechet_matches_pytorch_fid_on_full_rank_statistics():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(4)
    (mu1, sigma1), (mu2, sigma2) = feature_stats(rng.standard_normal((400, 24))), feature_stats(
        1 + rng.standard_normal((400, 24)) @ _random_spd(24, rng))
    reference = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)  # scipy.linalg.sqrtm
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-8)


def test_frechet_of_mismatched_shapes_is_a_user_error():
    with pytest.raises(UserError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _smooth_images(n, size, seed):
    """n images (n, 3, size, size) in [0, 1] that differ in colour and layout, not just in noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def calibrated_weights(tmp_path_factory):
    """A random FID-Inception state dict whose BatchNorm statistics are calibrated on a batch (SPEC section 6)."""
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


def test_stats_npz_round_trip_is_readable_by_pytorch_fid(tmp_path):
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    mu, sigma = feature_stats(np.random.default_rng(5).standard_normal((20, 6)))
    save_stats(tmp_path / "stats.npz", mu, sigma)
    assert sorted(os.listdir(tmp_path)) == ["stats.npz"]
    m, s = fid_score.compute_statistics_of_path(str(tmp_path / "stats.npz"), None, 1, 2048, "cpu")
    assert np.array_equal(m, mu) and np.array_equal(s, sigma)
    assert all(np.array_equal(a, b) for a, b in zip(load_stats(tmp_path / "stats.npz"), (mu, sigma)))
    with pytest.raises(UserError, match="must end in .npz"):
        save_stats(tmp_path / "stats", mu, sigma)


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


def test_fid_command_on_image_folders_with_a_stats_cache(calibrated_weights, tmp_path, capsys):
    _write_pngs(tmp_path / "a", 3, seed=7)
    _write_pngs(tmp_path / "b", 3, seed=8)
    fid = fid_command(tmp_path / "a", tmp_path / "b", batch_size=3, inception_weights=calibrated_weights,
                      check_hash=False)
    assert np.isfinite(fid) and fid > 0
    model = FIDInception(calibrated_weights, check_hash=False)
    dataset_stats(tmp_path / "a", model, batch_size=3, cache=tmp_path / "a.npz")  # writes the cache
    (tmp_path / "a" / "0.png").unlink()  # a used cache is not recomputed
    cached = dataset_stats(tmp_path / "a", model, batch_size=3, cache=tmp_path / "a.npz")
    assert all(np.array_equal(x, y) for x, y in zip(cached, load_stats(tmp_path / "a.npz")))
    assert fid_command(tmp_path / "a.npz", tmp_path / "b", batch_size=3, inception_weights=calibrated_weights,
                       check_hash=False) == pytest.approx(fid, rel=1e-6)


def test_image_paths_are_recursive_sorted_and_skip_unreadable_files(tmp_path, capsys):
    _write_pngs(tmp_path / "imgs" / "sub", 2, seed=9)
    _write_pngs(tmp_path / "imgs" / "a", 1, seed=10)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "imgs" / "notes.txt").write_text("ignored")
    names = [p.relative_to(tmp_path / "imgs").as_posix() for p in image_paths(tmp_path / "imgs")]
    assert names == ["a/0.png", "sub/0.png", "sub/1.png"]
    assert "broken.png" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(UserError):
            image_paths(folder)


def test_uint8_conversion_matches_torchvision_save_image(tmp_path):
    from PIL import Image
    from torchvision.utils import save_image
    x = torch.linspace(-1.2, 1.2, 3 * 8 * 8).reshape(1, 3, 8, 8)
    save_image(x[0] * 0.5 + 0.5, tmp_path / "tv.png")
    assert np.array_equal(images_to_uint8(x)[0], np.array(Image.open(tmp_path / "tv.png")))


def test_generated_samples_do_not_depend_on_batch_size_processes_or_resume(tmp_path):
    from PIL import Image
    def read(folder):
        return {p.name: np.array(Image.open(p)) for p in sorted(folder.iterdir())}
    made = []
    def sample_fn(noise):  # a deterministic stand-in for a sampler
        made.append(len(noise))
        return torch.tanh(noise)
    for rank in (0, 1):
        generate_samples(sample_fn, 10, tmp_path / "two", batch_size=4, seed=3, rank=rank, world=2, shape=(3, 8, 8))
    generate_samples(sample_fn, 10, tmp_path / "one", batch_size=3, seed=3, shape=(3, 8, 8))
    two, one = read(tmp_path / "two"), read(tmp_path / "one")
    assert list(two) == [f"{i:06d}.png" for i in range(10)] and list(one) == list(two)
    assert all(np.array_equal(two[k], one[k]) for k in two) and two["000000.png"].shape == (8, 8, 3)
    (tmp_path / "one" / "000002.png").unlink()
    (tmp_path / "one" / "000007.png").unlink()
    made.clear()
    assert generate_samples(sample_fn, 10, tmp_path / "one", batch_size=4, seed=3, shape=(3, 8, 8)) == 2
    assert made == [2] and all(np.array_equal(v, one[k]) for k, v in read(tmp_path / "one").items())
    assert generate_samples(sample_fn, 10, tmp_path / "one", batch_size=3, seed=4, shape=(3, 8, 8)) == 0


def test_pixel_frechet_is_zero_for_identical_sets_and_dims_c2_for_a_shift(capsys):
    x = torch.rand(500, 3, 4, 4, generator=torch.Generator().manual_seed(11)) * 2 - 1  # N = 500 >= 10 x 48 dims
    assert abs(pixel_frechet(x, x)) < 1e-9
    assert pixel_frechet(x, x + 0.25) == pytest.approx(48 * 0.25 ** 2, rel=1e-9)
    assert pixel_frechet(x, x + 0.25, pool=2) == pytest.approx(12 * 0.25 ** 2, rel=1e-9)
    assert capsys.readouterr().err == ""
    pixel_frechet(x[:100], x[100:200])
    assert "N=100 < 10 x 48" in capsys.readouterr().err


def test_pixel_frechet_report_gives_the_real_vs_real_floor_at_the_same_n():
    g = torch.Generator().manual_seed(12)
    real_a, real_b = torch.rand(300, 3, 4, 4, generator=g), torch.rand(200, 3, 4, 4, generator=g)
    fake = torch.rand(200, 3, 4, 4, generator=g) * 0.5  # too dark, too little contrast
    report = pixel_frechet_report(fake, real_a, real_b, pool=2)
    assert report["n"] == 200 and report["real_vs_real"] < report["model"]
    with pytest.raises(UserError, match="same N"):
        pixel_frechet_report(fake[:100], real_a, real_b, pool=2)
