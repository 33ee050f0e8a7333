"""DeMe: Decouple-then-Merge (Ma et al., CVPR 2025) for DDPM, from scratch in plain PyTorch.

Part I, the method, reads in the order of the paper and is all a reader needs to follow it:
  I.1  the paper's hyperparameters         I.6  decoupled finetuning (Sec. 3.2) and the equal-compute baseline
  I.2  schedule and samplers (DDPM, DDIM)  I.7  task vectors and the merges: Eq. 8, TIES, DARE (Sec. 3.3)
  I.3  synthetic data                      I.8  the ensemble before merging (Eq. 7)
  I.4  the DeMe loss (Eq. 4-5)             I.9  the merge-weight search and the merge stage
  I.5  timestep ranges and Eq. 6           I.10 evaluation and the pipeline
Part II, the machinery (configuration and its checks, devices, the training loop with checkpoints and resume, data
loaders, FID, figures, Stable Diffusion, benchmark, command line), starts at its banner; the method never needs it.
The network and its channel-wise projections are in ddpm_unet.py.

Run `python deme.py --help` for the stages and flags.
"""
import argparse
import ast
import bisect
import contextlib
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ddpm_unet import (PRESETS, UNet, UserError, add_channel_projections, atomic_path, atomic_save,
                       download, file_digest, fold_channel_projections, load_pretrained, model_from_state_dict)


# ======================================================================================================================
# Part I: the method
# ======================================================================================================================

# --- I.1 The paper's hyperparameters ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Paper:
    """DeMe's knobs with the values of the paper (Sec. 4) and of the official code where the paper is silent. Every
    default of the command line (Config) and of the functions below comes from here."""
    T: int = 1000                       # diffusion timesteps (DDPM)
    n_ranges: int = 4                   # N, the number of timestep ranges (Sec. 3.1; 8 in the ablation, Table 3)
    p_global: float = 0.3               # probabilistic sampling: chance of drawing t from all of [0, T) (Eq. 6)
    per_sample: bool = False            # one coin per batch, not per sample (official code)
    antithetic: bool = True             # timesteps in antithetic pairs (t, lo + hi - 1 - t) (official code)
    consistency: float = 1.0            # λ, weight of the consistency loss to the frozen θ0 (Eq. 4-5)
    projections: bool = True            # channel-wise projections, identity-initialised 1x1 convs (Sec. 3.2)
    steps: int = 20000                  # optimizer steps per range
    batch_size: int = 64                # images per optimizer step
    lr: float = 5e-5                    # AdamW learning rate, constant (official code)
    adam_betas: tuple = (0.95, 0.999)   # (official code)
    weight_decay: float = 1e-6          # (official code)
    grad_clip: float = 1.0              # gradient-norm clipping (official code)
    ema_decay: float = 0.9999           # EMA ceiling; warm-up min(ceiling, 1 - k^-3/4), diffusers' EMAModel
    ties_k: float = 20.0                # TIES: percent of each task vector kept (TIES reference code)
    ties_lam: float = 1.0               # TIES: scale of the merged task vector
    dare_p: float = 0.9                 # DARE: drop probability (DARE's main setting)


PAPER = Paper()


# --- I.2 Schedule and samplers: DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) ------------------------------------

class GaussianDiffusion:
    """The forward process q and the reverse samplers of DDPM (Ho et al. 2020) and DDIM (Song et al. 2021)."""

    def __init__(self, T=PAPER.T, beta_start=1e-4, beta_end=0.02, schedule="linear"):
        assert schedule in ("linear", "scaled_linear"), schedule
        if schedule == "linear":  # DDPM Sec. 4
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:  # Stable Diffusion
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        self.T = T
        self.betas = betas
        self.alphas_bar = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_bar[:-1]])
        # β̃_t, DDPM Eq. 7
        self.posterior_variance = betas * (1.0 - self.alphas_bar_prev) / (1.0 - self.alphas_bar)

    @staticmethod
    def _at(values, t, x):
        """values[t] as x's dtype and device, shaped to broadcast over (B, C, H, W)."""
        v = values.to(x.device)[t.to(x.device)] if torch.is_tensor(t) else values[t].to(x.device)
        return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, DDPM Eq. 4."""
        return self._at(self.alphas_bar.sqrt(), t, x0) * x0 + self._at((1 - self.alphas_bar).sqrt(), t, x0) * noise

    def snr(self, t):
        """SNR(t) = ᾱ_t / (1 - ᾱ_t), the signal-to-noise ratio of x_t (float64, on t's device)."""
        ab = self.alphas_bar.to(t.device)[t]
        return ab / (1 - ab)

    def predict_x0(self, x_t, t, eps):
        """x0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t), DDPM Eq. 4 solved for x0."""
        return (x_t - self._at((1 - self.alphas_bar).sqrt(), t, x_t) * eps) / self._at(self.alphas_bar.sqrt(), t, x_t)

    def q_posterior_mean(self, x0, x_t, t):
        """μ̃_t(x_t, x0), DDPM Eq. 7."""
        ab, ab_prev, beta = self.alphas_bar, self.alphas_bar_prev, self.betas
        c0 = self._at(beta * ab_prev.sqrt() / (1 - ab), t, x_t)
        ct = self._at((1 - ab_prev) * (1 - beta).sqrt() / (1 - ab), t, x_t)
        return c0 * x0 + ct * x_t

    def ddpm_step(self, x_t, eps, t: int, variance="fixedlarge", clip_denoised=True, noise=None):
        """x_{t-1} ~ p_θ(x_{t-1} | x_t), one step of DDPM Algorithm 2, with σ²_t = β_t (fixedlarge) or β̃_t."""
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = self.q_posterior_mean(x0, x_t, t)
        if t == 0:
            return mean
        var = {"fixedlarge": self.betas, "fixedsmall": self.posterior_variance}[variance]
        return mean + self._at(var.sqrt(), t, x_t) * noise

    def ddim_timesteps(self, steps):
        """The S timesteps DDIM visits, high to low: range(0, T, T//S) reversed (980, 960, ..., 0 for S = 50)."""
        return list(range(0, self.T, self.T // steps))[::-1]

    def ddim_step(self, x_t, eps, t: int, t_prev: int, eta=0.0, clip_denoised=True, noise=None):
        """x_{t_prev} from x_t, DDIM Eq. 12; ᾱ of t_prev = -1 (after the last step) is 1."""
        ab_t = self.alphas_bar[t]
        ab_prev = self.alphas_bar[t_prev] if t_prev >= 0 else torch.ones((), dtype=torch.float64)
        x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()  # DDIM Eq. 16
        c2 = (1 - ab_prev - sigma ** 2).sqrt()
        x_prev = ab_prev.sqrt().to(x_t.dtype) * x0 + c2.to(x_t.dtype) * eps
        if eta > 0:
            x_prev = x_prev + sigma.to(x_t.dtype) * noise
        return x_prev

    @torch.no_grad()
    def ddpm_sample(self, model, x_T, variance="fixedlarge", clip_denoised=True, noise=None, progress=False, **cond):
        """DDPM Algorithm 2: T ancestral steps from x_T ~ N(0, I); returns x0 (in [-1, 1] when clipping).
        noise() gives each step's z ~ N(0, I) shaped like x_T (default: torch's global generator)."""
        x = x_T
        for t in tqdm(range(self.T - 1, -1, -1), desc="DDPM", leave=False, disable=not progress):
            eps = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), **cond).to(x.dtype)
            z = (noise() if noise else torch.randn_like(x)).to(x.device, x.dtype) if t > 0 else None
            x = self.ddpm_step(x, eps, t, variance, clip_denoised, z)
        return x.clamp(-1, 1) if clip_denoised else x

    @torch.no_grad()
    def ddim_sample(self, model, x_T, steps, eta=0.0, clip_denoised=True, noise=None, progress=False, **cond):
        """DDIM with S steps (Song et al. 2021, Eq. 12); eta = 0 is deterministic; returns x0 (in [-1, 1] when
        clipping). With eta > 0, noise() gives each step's z ~ N(0, I) shaped like x_T."""
        ts = self.ddim_timesteps(steps)
        x = x_T
        for t, t_prev in tqdm(list(zip(ts, ts[1:] + [-1])), desc="DDIM", leave=False, disable=not progress):
            eps = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long), **cond).to(x.dtype)
            z = (noise() if noise else torch.randn_like(x)).to(x.device, x.dtype) if eta > 0 else None
            x = self.ddim_step(x, eps, t, t_prev, eta, clip_denoised, z)
        return x.clamp(-1, 1) if clip_denoised else x


class SampleNoise:
    """The noise of samples `indices`: sample i draws its x_T and then every step's z from its own generator, seeded
    by (seed, i) alone, so a sample is the same whatever batch, batch size or process makes it. Calling it gives the
    next draw, (B, *shape), on `device` (where its generators live: a GPU draws its own noise)."""

    def __init__(self, seed, indices, shape, device="cpu"):
        self.generators = [torch.Generator(device).manual_seed(seed * 1_000_003 + i) for i in indices]
        self.shape, self.device = tuple(shape), device

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, device=self.device) for g in self.generators])


def sample_images(diffusion, model, x_T, cfg: "Config", noise=None, clip=True, **cond):
    """Samples from starting noise x_T with the configured sampler; noise() gives the steps' z (eta > 0, DDPM)."""
    if cfg.sampler == "ddim":
        return diffusion.ddim_sample(model, x_T, cfg.sample_steps, cfg.eta, clip, noise=noise, **cond)
    return diffusion.ddpm_sample(model, x_T, cfg.variance, clip, noise=noise, **cond)


def sample_batch(cfg: "Config", env: "Env", diffusion, model, indices, seed, shape, clip=True, **cond):
    """Samples `indices` of noise seed `seed` as (B, *shape) float32 on the CPU (in [-1, 1] when clipping): the one
    sampling driver of evaluation, grids, the benchmark and Stable Diffusion, in the evaluation precision."""
    noise = SampleNoise(seed, indices, shape, env.device)
    with env.evaluation():  # (the samplers run without gradients)
        return sample_images(diffusion, model, noise(), cfg, noise, clip, **cond).float().cpu()


# --- I.3 Data: synthetic shapes (every dataset yields (3, H, W) images in [-1, 1]) -----------------------------------

def synthetic_images(n, size=16, seed=0) -> torch.Tensor:
    """Procedural scenes in [-1, 1]: a two-colour gradient with one or two anti-aliased discs, squares or rings."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)
    ys, xs = torch.meshgrid((torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij")
    angle = u(n, 1, 1) * 2 * math.pi
    ramp = 0.5 + 0.5 * ((xs - 0.5) * angle.cos() + (ys - 0.5) * angle.sin()) * 1.4  # (n, H, W)
    c1, c2 = u(n, 3, 1, 1), u(n, 3, 1, 1)
    img = c1 + (c2 - c1) * ramp.clamp(0, 1).unsqueeze(1)  # (n, 3, H, W)
    for k in range(2):
        present = (u(n) < (1.0 if k == 0 else 0.5)).view(n, 1, 1, 1)
        kind = torch.randint(0, 3, (n, 1, 1), generator=g)
        cx, cy, r = 0.2 + 0.6 * u(n, 1, 1), 0.2 + 0.6 * u(n, 1, 1), 0.12 + 0.18 * u(n, 1, 1)
        dist = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()
        signed = torch.where(kind == 0, dist - r,  # disc
                 torch.where(kind == 1, torch.maximum((xs - cx).abs(), (ys - cy).abs()) - r,  # square
                             (dist - r).abs() - 0.35 * r))  # ring
        mask = (0.5 - signed * size).clamp(0, 1).unsqueeze(1) * present  # about one pixel of anti-aliasing
        img = img + (u(n, 3, 1, 1) - img) * mask
    return img * 2 - 1


# the synthetic dataset's splits: the training images (20,000), the held-out select and report images (2,048 each),
# and the pixel metric's two disjoint sets of real images that report
SYNTHETIC_SEEDS = {"train": 0, "eval": 0, "select": 1_000_001, "report": 4_000_037, "real": (2_000_003, 3_000_017)}


# --- I.4 The DeMe loss: DDPM's simple loss plus the consistency loss to θ0 (Eq. 4-5) ---------------------------------

def deme_loss(eps, noise, eps0=None, lam=PAPER.consistency, weight=None, reduction="mean"):
    """DeMe Eq. 4-5: ||ε - ε_θ(x_t, t)||² + λ ||ε_θ(x_t, t) - ε_θ0(x_t, t)||², DDPM's simple loss (Algorithm 1)
    plus the consistency loss that keeps the finetuned θ near the frozen θ0 at the same x_t and t.
    eps = ε_θ(x_t, t), noise = ε, eps0 = ε_θ0(x_t, t) or None (no consistency term): each (B, C, H, W).
    weight: (B,) weights of each sample's simple loss (the loss-reweighting baselines of Table 1), or None.
    reduction: "mean", the element mean (F.mse_loss's); "none", each sample's element mean, (B,)."""
    assert eps.shape == noise.shape and (eps0 is None or eps0.shape == eps.shape), (eps.shape, noise.shape)

    def mse(a, b):
        return (a - b).pow(2).flatten(1).mean(1) if reduction == "none" else F.mse_loss(a, b)

    if weight is None:
        loss = mse(eps, noise)
    else:
        loss = weight * (eps - noise).pow(2).flatten(1).mean(1)
        loss = loss if reduction == "none" else loss.mean()
    if eps0 is not None and lam > 0:
        loss = loss + lam * mse(eps, eps0)
    return loss


def training_loss(model, teacher, diffusion, x0, t, noise, lam=PAPER.consistency, weight=None, **cond):
    """The loss of one training batch: x_t from q (DDPM Eq. 4), then deme_loss with the frozen θ0 `teacher` (None:
    DDPM's plain simple loss). cond: the model's extra inputs (Stable Diffusion: the text embeddings)."""
    x_t = diffusion.q_sample(x0, t, noise)
    eps = model(x_t, t, **cond).float()
    eps0 = None
    if teacher is not None and lam > 0:
        with torch.no_grad():
            eps0 = teacher(x_t, t, **cond).float()
    return deme_loss(eps, noise, eps0, lam, weight)


# --- I.5 Timestep ranges and probabilistic sampling (Sec. 3.1, Eq. 6) ------------------------------------------------

def timestep_ranges(n, T=PAPER.T):
    """DeMe Sec. 3.1: N contiguous ranges [i*T/N, (i+1)*T/N) of [0, T), i = 0..N-1."""
    assert isinstance(n, int) and 1 <= n <= T, n
    # Boundaries ceil(i*T/n): exact when n divides T; otherwise range i is exactly {t : t*n//T == i}, Eq. 7's routing.
    edges = [-(-i * T // n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def sample_timesteps(batch_size, lo, hi, T=PAPER.T, p=PAPER.p_global, per_batch=not PAPER.per_sample,
                     antithetic=PAPER.antithetic, generator=None):
    """DeMe Eq. 6: with probability p draw t from [0, T), otherwise from the range [lo, hi). Returns (batch_size,)."""
    assert 0 <= lo < hi <= T and 0.0 <= p <= 1.0 and batch_size >= 1, (lo, hi, T, p, batch_size)
    n_draw = math.ceil(batch_size / 2) if antithetic else batch_size
    # One coin per batch (official), or one per draw; an antithetic pair shares its draw's coin and interval.
    coin = torch.rand(1 if per_batch else n_draw, generator=generator) < p
    a = torch.where(coin, torch.tensor(0), torch.tensor(lo))
    b = torch.where(coin, torch.tensor(T), torch.tensor(hi))
    u = torch.rand(n_draw, generator=generator, dtype=torch.float64)
    t = a + (u * (b - a)).long()  # uniform on [a, b)
    if antithetic:
        t = torch.cat([t, a + b - 1 - t])[:batch_size]  # pairs (t, a+b-1-t)
    return t


# --- I.6 Decoupled finetuning (Sec. 3.2) and the equal-compute baseline ----------------------------------------------

class PixelDDPM:
    """What the finetune and merge stages ask of the model they work on, for DeMe's DDPM UNet on pixels: the data,
    a student copy of θ0, the merge base, the selection images. Stable Diffusion answers the same questions for
    latents and captions (StableDiffusion, Part II)."""
    name, identity, encode, batch = "", {}, None, 256  # batches are images; no conditioning

    def __init__(self, cfg: "Config", theta0):
        self.cfg, self.theta0 = cfg, theta0

    def train_data(self):
        return make_dataset(self.cfg)

    def student(self):
        """θ_i at the start: θ0, with finetuning's dropout (official code: 0) and identity projections (Sec. 3.2)."""
        student = set_dropout(copy.deepcopy(self.theta0), self.cfg.dropout or 0.0)
        return add_channel_projections(student) if self.cfg.projections else student

    def grid(self, student):
        return None  # train_loop draws the UNet's own sample grids

    def build(self, state):
        return build_model(unwrap(self.theta0).config, state)

    def merge_base(self, finetuned_state):
        return merge_base(self.theta0, any(k.endswith(".proj.weight") for k in finetuned_state))

    def selection(self):
        """(images, conditioning) that choose the merge weights: the selection split, which no range trained on."""
        return heldout_images(self.cfg, self.cfg.search_images, "select"), None

    def save_merged(self, state, record, folder) -> dict:
        """merge/merged.pt with the projections folded where they fold exactly: P (W x + b) = (P W) x + P b."""
        model = self.build(state)
        record["folded_projections"] = fold_channel_projections(model)
        atomic_save(dict(ema=model.state_dict(), model_config=model.config, merge=record,
                         config=dataclasses.asdict(self.cfg)), folder / "merged.pt")
        return model.state_dict()


def stage_finetune(cfg: "Config", env: "Env", diffusion=None, theta0=None, backbone=None):
    """Decoupled finetuning (DeMe Sec. 3.2): one copy of θ0 per timestep range, with PS, CL and CP; `backbone`: the
    model finetuned (default: the DDPM UNet θ0, PixelDDPM)."""
    diffusion = diffusion or GaussianDiffusion()
    if backbone is None:
        backbone = PixelDDPM(cfg, theta0 if theta0 is not None else theta0_model(cfg, env, diffusion))
    data = backbone.train_data()
    ranges = timestep_ranges(cfg.n_ranges, diffusion.T)
    for i in range_indices(cfg):
        lo, hi = ranges[i]
        student = backbone.student()
        teacher = frozen(backbone.theta0) if cfg.consistency > 0 else None  # the frozen θ0 of Eq. 4-5

        def timesteps(b, g, lo=lo, hi=hi):  # DeMe Eq. 6
            return sample_timesteps(b, lo, hi, diffusion.T, cfg.p_global, not cfg.per_sample, cfg.antithetic, g)

        identity = stage_identity(cfg, stage="finetune", range=[lo, hi], n_ranges=cfg.n_ranges,
                                  p_global=cfg.p_global, per_sample=cfg.per_sample, antithetic=cfg.antithetic,
                                  consistency=cfg.consistency, projections=cfg.projections, **backbone.identity)
        train_loop(cfg, env, run_dir(cfg, f"range_{i}"), student, data, diffusion, steps=cfg.steps, lr=cfg.lr,
                   warmup=0, timesteps=timesteps, identity=identity, teacher=teacher, lam=cfg.consistency,
                   desc=f"{backbone.name}range {i} [{lo},{hi})", seed=cfg.seed + 1 + i, encode=backbone.encode,
                   grid=backbone.grid(student))
        del student, teacher


def min_snr_weight(snr, gamma=5.0):
    """Min-SNR-γ (Hang et al., ICCV 2023), for ε-prediction: the simple loss at t weighted by min(SNR, γ) / SNR."""
    return snr.clamp(max=gamma) / snr


def p2_weight(snr, k=1.0, gamma=1.0):
    """P2 weighting (Choi et al., CVPR 2022): the simple loss at t weighted by 1 / (k + SNR)^γ (their code's
    defaults: k = 1, γ = 1)."""
    return 1.0 / (k + snr) ** gamma


LOSS_WEIGHTINGS = {"minsnr": min_snr_weight, "p2": p2_weight}  # each method's own defaults; the paper gives none


def baseline_name(cfg: "Config") -> str:
    """The baseline's model name and run-folder stage: baseline, or baseline_minsnr / baseline_p2."""
    return "baseline" if cfg.baseline_weighting == "none" else f"baseline_{cfg.baseline_weighting}"


def stage_baseline(cfg: "Config", env: "Env", diffusion=None, theta0=None):
    """The paper's equal-compute baseline: plain finetuning of θ0 on all timesteps for N x steps (N = 1, no PS/CL/CP),
    with DDPM's simple loss or one of Table 1's loss reweightings (--baseline-weighting)."""
    diffusion = diffusion or GaussianDiffusion()
    theta0 = theta0 if theta0 is not None else theta0_model(cfg, env, diffusion)
    student = set_dropout(copy.deepcopy(theta0), cfg.dropout or 0.0)
    uniform = lambda b, g: torch.randint(0, diffusion.T, (b,), generator=g)
    steps, name = cfg.steps * cfg.n_ranges, baseline_name(cfg)
    weighting = LOSS_WEIGHTINGS.get(cfg.baseline_weighting)
    extra = {} if weighting is None else dict(weighting=cfg.baseline_weighting)
    train_loop(cfg, env, run_dir(cfg, name), student, make_dataset(cfg), diffusion, steps=steps, lr=cfg.lr,
               warmup=0, timesteps=uniform, identity=stage_identity(cfg, stage="baseline", **extra),
               desc=f"{name} ({steps} steps)", seed=cfg.seed + 999,
               weighting=None if weighting is None else lambda t: weighting(diffusion.snr(t)).float())


# --- I.7 Task vectors and the merges (Sec. 3.3, Eq. 8; TIES; DARE) ---------------------------------------------------

def task_vector(theta_i, theta0):
    """DeMe Sec. 3.3: τ_i = θ_i - θ0 of one tensor, in float32 (float64 for float64 weights)."""
    dtype = torch.promote_types(theta0.dtype, torch.float32)
    return theta_i.to(dtype) - theta0.to(dtype)


def task_vectors(base_sd, finetuned_sds):
    """τ_1..τ_N: {key: τ_i} of every floating-point tensor, for each finetuned state dict."""
    return [{k: task_vector(sd[k], v) for k, v in base_sd.items() if _is_weight(v)} for sd in finetuned_sds]


def _is_weight(v):
    return torch.is_tensor(v) and torch.is_floating_point(v)  # integer buffers are not merged


def task_arithmetic(tau, w):
    """DeMe Eq. 8's Σ_i w_i τ_i: tau (N, ...) the task vectors of one tensor, w (N, 1, ...) their weights."""
    return (w * tau).sum(0)


def _ties(tau, w, k, lam):
    """TIES (Yadav et al. 2023): trim to top-k%, elect signs, disjoint mean; tau is (N, ...)."""
    tau = w * tau  # weights act before trimming
    flat = tau.reshape(tau.shape[0], -1)  # (N, D)
    n_keep = max(1, round(k / 100 * flat.shape[1]))
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.abs().topk(n_keep, dim=1).indices, True)
    trimmed = (flat * keep).view_as(tau)
    elected = torch.sign(trimmed.sum(0))  # (...)
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    return lam * (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def _dare(tau, w, generator, p):
    """DARE (Yu et al. 2024): drop entries with probability p, rescale by 1/(1-p), then Σ w_i τ_i."""
    keep = torch.rand(tau.shape, generator=generator) >= p
    return task_arithmetic(tau * keep.to(tau.device) / (1 - p), w)


# Options and defaults per method. TIES: k = percent kept, trimmed per tensor (as mergekit; the TIES reference code
# trims over the whole flattened model); weights scale τ_i before trimming. DARE assumes small deltas: lower p if it
# hurts.
MERGE_OPTIONS = {"task_arithmetic": {}, "average": {}, "ties": {"k": PAPER.ties_k, "lam": PAPER.ties_lam},
                 "dare": {"p": PAPER.dare_p, "seed": 0}}


def merge(base_sd, finetuned_sds, weights=None, method="task_arithmetic", **options):
    """DeMe Eq. 8: θ0 + Σ w_i τ_i, or the uniform average, TIES or DARE of the same task vectors. Each tensor is
    merged on its own, so merging never holds N copies of a large model."""
    assert method in MERGE_OPTIONS and set(options) <= set(MERGE_OPTIONS[method]), (method, sorted(options))
    assert finetuned_sds and all(sd.keys() == base_sd.keys() for sd in finetuned_sds), "state dicts differ in keys"
    n = len(finetuned_sds)
    if method == "average" or weights is None:
        weights = [1.0] * n if method == "ties" else [1.0 / n] * n  # TIES already averages: default w_i = 1
    weights = [float(x) for x in weights]
    assert len(weights) == n, f"{len(weights)} merge weights for {n} models"
    opts = {**MERGE_OPTIONS[method], **options}
    if method == "dare":
        generator = torch.Generator().manual_seed(int(opts.pop("seed")))
    merged = {}
    for key, theta0 in base_sd.items():
        if not _is_weight(theta0):
            merged[key] = theta0.clone() if torch.is_tensor(theta0) else theta0
            continue
        tau = torch.stack([task_vector(sd[key], theta0) for sd in finetuned_sds])  # (N, ...)
        w = torch.tensor(weights, dtype=tau.dtype, device=tau.device).view(-1, *[1] * theta0.dim())  # (N, 1, ...)
        if method == "ties":
            tau_m = _ties(tau, w, **opts)
        elif method == "dare":
            tau_m = _dare(tau, w, generator, **opts)
        else:
            tau_m = task_arithmetic(tau, w)
        merged[key] = (theta0.to(tau.dtype) + tau_m).to(theta0.dtype)
    return merged


# --- I.8 The ensemble before merging (Eq. 7) -------------------------------------------------------------------------

class RangeEnsemble(nn.Module):
    """DeMe Eq. 7: at timestep t use θ_i with i = floor(t*N/T) (N models at inference, no merge)."""

    def __init__(self, models, T=1000):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.T = T

    def forward(self, x, t):
        """ε(x_t, t) for x (B, C, H, W) and t (B,) or a scalar: sample b goes to model i = floor(t_b N / T); the
        outputs come back in the batch's order."""
        B, N = x.shape[0], len(self.models)
        t = torch.as_tensor(t, device=x.device).long().expand(B) if not torch.is_tensor(t) or t.dim() == 0 else t
        idx = t * N // self.T  # (B,) the model of each sample; t must lie in [0, T)
        if (idx == idx[0]).all():
            return self.models[int(idx[0])](x, t)
        out = None
        for i in idx.unique().tolist():
            rows = (idx == i).nonzero().squeeze(1)
            y = self.models[i](x[rows], t[rows])
            out = y.new_empty((B, *y.shape[1:])) if out is None else out
            out[rows] = y
        return out


# --- I.9 Choosing the merge weights on held-out images, and the merge stage ------------------------------------------

def search_merge_weights(objective, n, grid=(0.0, 0.25, 0.5, 0.75, 1.0), refine_steps=(0.1, 0.05), max_evals=60,
                         init=None, progress=True):
    """Choose w for DeMe Eq. 8 by minimising objective(w): shared-scalar grid, then coordinate descent."""
    w_min, w_max = 0.0, 1.5  # no task negation; up to 50% extrapolation past θ_i
    cache, path = {}, []
    bar = tqdm(total=max_evals, desc="merge weights", disable=not progress)

    def evaluate(w):
        w = tuple(round(min(max(wi, w_min), w_max), 6) for wi in w)
        if w not in cache and len(path) < max_evals:
            value = float(objective(w))
            cache[w] = value if not math.isnan(value) else math.inf
            path.append({"w": list(w), "value": value})
            bar.update(1)
            bar.set_postfix(best=min(cache.values()))
        return w, cache.get(w, math.inf)

    # (a) coarse: w_i = s for all i, the uniform average and θ0 itself
    starts = ([tuple(init)] if init is not None else []) + [(s,) * n for s in grid] + [(1.0 / n,) * n, (0.0,) * n]
    for w in starts:
        evaluate(w)
    best = min(cache, key=cache.get)  # first minimum in evaluation order
    # (b) coordinate descent: step along each coordinate while it improves, until a full sweep does not; then refine
    for step in refine_steps:
        improved = True
        while improved and len(path) < max_evals:
            improved = False
            for i in range(n):
                for direction in (+step, -step):
                    moved = False
                    while True:
                        w, value = evaluate(best[:i] + (best[i] + direction,) + best[i + 1:])
                        if not value < cache[best]:
                            break
                        best, moved, improved = w, True, True
                    if moved:
                        break
    bar.close()
    return dict(weights=list(best), value=cache[best], path=path, evals=len(path))


@torch.no_grad()
def heldout_loss(model, diffusion, images, env: "Env", n_ranges=PAPER.n_ranges, seed=0, batch=256, cond=None):
    """DDPM's simple loss on held-out images, with t stratified over [0, T) and noise fixed by `seed`: the same
    objective the models train on, on data they did not see, with common random numbers so that two models'
    values differ by the models alone. cond: the images' conditioning, (n, ...) (Stable Diffusion: their captions'
    text embeddings). Returns (mean, [mean over each of the N timestep ranges])."""
    n = len(images)
    g = torch.Generator().manual_seed(seed)
    t = ((torch.arange(n) + 0.5) * diffusion.T / n).long()[torch.randperm(n, generator=g)]  # (n,) stratified
    noise = torch.randn(images.shape, generator=g)
    losses = torch.empty(n, dtype=torch.float64)
    model.eval()
    for s in range(0, n, batch):
        x0, eps, tb = (v[s:s + batch].to(env.device) for v in (images, noise, t))
        extra = {} if cond is None else dict(encoder_hidden_states=cond[s:s + batch].to(env.device))
        with env.evaluation():
            pred = model(diffusion.q_sample(x0, tb, eps), tb, **extra).float()
        losses[s:s + batch] = deme_loss(pred, eps, reduction="none").double().cpu()  # (B,) simple loss
    which = t * n_ranges // diffusion.T
    return losses.mean().item(), [losses[which == i].mean().item() for i in range(n_ranges)]


def search_score(mean, per_range, base_per_range, objective="loss") -> float:
    """The merge search's objective from a candidate's held-out loss: "loss", the loss with t uniform over [0, T)
    (dominated by the low-t ranges, whose loss is largest); "per_range", the mean over ranges of each range's loss
    relative to θ0's on that range, so that every range counts alike."""
    if objective == "per_range":
        return sum(loss / base for loss, base in zip(per_range, base_per_range)) / len(per_range)
    return mean


def sample_candidates(path, n, k) -> list:
    """The weight vectors that the paper's grid search, scored by samples (--search-objective samples), ranks: θ0
    itself (w = 0), the loss search's best point, and two families of shapes: the shared scale w_i = s (s = 0.25 is
    the uniform average) and weights rising with t as the official LSUN-Church weights [0.1, 0.1, 0.2, 0.5] do,
    w_i = s (i + 1) / N. The first k, in this order."""
    best = min(path, key=lambda p: p["value"])["w"]
    shaped = lambda s, rising: [round(s * (i + 1) / n if rising else s, 6) for i in range(n)]
    grid = [shaped(0.5, False), shaped(0.5, True), shaped(0.25, False), shaped(1.0, True), shaped(0.75, False),
            shaped(1.0, False)]
    out = []
    for w in [[0.0] * n, best, *grid]:
        if w not in out:
            out.append(w)
    return out[:k]


# Each evaluation role draws its noise from its own seed (and its images from its own split, make_dataset), so that
# nothing that selected a model (merge weights, re-ranking) is also what reports on it.
ROLE_SEEDS = {"select": 1, "select_samples": 2, "report": 3, "samples": 4}


def role_seed(seed, role) -> int:
    """The noise seed of an evaluation role for the run's --seed: distinct for every role and every seed."""
    return 10 * seed + ROLE_SEEDS[role]


def merge_base(theta0, with_projections) -> dict:
    """θ0's state dict in the finetuned models' layout (identity projections, so their task vector is W_i - I)."""
    base = copy.deepcopy(unwrap(theta0))
    return (add_channel_projections(base) if with_projections else base).state_dict()


def merge_options(cfg: "Config") -> dict:
    return {"ties": dict(k=cfg.ties_k, lam=cfg.ties_lam), "dare": dict(p=cfg.dare_p, seed=cfg.seed)}.get(
        cfg.merge_method, {})


def stage_merge(cfg: "Config", env: "Env", diffusion=None, theta0=None, backbone=None, finetuned=None):
    """DeMe Eq. 8: θ0 + Σ w_i τ_i with w given, or chosen on the selection split (choose_merge_weights, Part II);
    saves merge/merged.pt (or what the backbone saves) and merge/search.json, and returns the merged state dict (on
    rank 0). finetuned: θ_1..θ_N's state dicts when the caller has loaded them (default: the ranges' checkpoints)."""
    diffusion = diffusion or GaussianDiffusion()
    if backbone is None:
        backbone = PixelDDPM(cfg, theta0 if theta0 is not None else theta0_model(cfg, env, diffusion))
    finetuned = finetuned or [ck["ema"] for ck in range_checkpoints(cfg)]
    base, search = backbone.merge_base(finetuned[0]), None
    if cfg.merge_weights:
        weights = merge_weight_list(cfg)
    elif cfg.merge_method == "average":
        weights = [1.0 / cfg.n_ranges] * cfg.n_ranges
    else:
        search = choose_merge_weights(cfg, env, diffusion, backbone, base, finetuned)
        if search is None:  # the search ran on rank 0
            return None
        weights = search["weights"]
    merged = merge(base, finetuned, weights, cfg.merge_method, **merge_options(cfg))
    if env.master:
        folder = run_dir(cfg, "merge")
        folder.mkdir(parents=True, exist_ok=True)
        record = dict(method=cfg.merge_method, weights=weights, options=merge_options(cfg), search=search)
        merged = backbone.save_merged(merged, record, folder)
        atomic_write_text(json.dumps(record, indent=2), folder / "search.json")
        print(f"merged {cfg.n_ranges} ranges with {cfg.merge_method}, w = {[round(w, 3) for w in weights]} -> "
              f"{folder}")
    env.barrier()
    return merged


# --- I.10 Evaluation and the pipeline --------------------------------------------------------------------------------

def stage_evaluate(cfg: "Config", env: "Env", diffusion=None, theta0=None):
    """Compares models with one sampler and sample count, on images and noise that selected nothing: the held-out
    loss on the report split, samples from their own noise seed. Writes results.{json,md} and models.png."""
    diffusion = diffusion or GaussianDiffusion()
    names = [s.strip() for s in cfg.models.split(",") if s.strip()]
    ref = evaluation_reference(cfg, env)
    metric, floor, pool = ref["metric"], ref["floor"], ref["pool"]
    rows, grids = [], {}
    for name in names:
        row, grids[name] = evaluate_model(cfg, env, diffusion, named_model(cfg, env, name, theta0), name, ref)
        rows.append(row)
    if not env.master:
        return rows
    label = ("pixel Fréchet distance (not FID)" if metric == "pixel" else "FID") + f", {cfg.n_samples} samples"
    sampler = (f"DDIM {cfg.sample_steps} steps, eta {cfg.eta}" if cfg.sampler == "ddim"
               else f"DDPM {diffusion.T} steps, {cfg.variance}")
    results = dict(metric=label, sampler=sampler, seed=cfg.seed, protocol=evaluation_protocol(cfg, metric), rows=rows,
                   real_vs_real=floor if metric == "pixel" else None,
                   pixel_pool=pool if metric == "pixel" else None, config=dataclasses.asdict(cfg))
    table = results_markdown(results, cfg)
    print("\n" + table)
    atomic_write_text(json.dumps(results, indent=2), run_dir(cfg, "results.json"))
    atomic_write_text(table, run_dir(cfg, "results.md"))
    side_by_side(grids, run_dir(cfg, "models.png"))
    print(f"results: {run_dir(cfg, 'results.md')}, samples side by side: {run_dir(cfg, 'models.png')}")
    return rows


def stage_pipeline(cfg: "Config", env: "Env"):
    """Everything, in the paper's order: θ0, the N ranges, the equal-compute baseline, the merge, the evaluation;
    with --seeds, all but θ0 once per seed, and the spread over the seeds."""
    start = time.perf_counter()
    diffusion = GaussianDiffusion()
    theta0 = theta0_model(cfg, env, diffusion)
    rows = {s: compare(c, env, diffusion, theta0) for s, c in seed_runs(cfg)}
    if env.master and cfg.seeds:
        write_seed_summary(cfg, rows)
    if env.master:
        print(f"pipeline finished in {(time.perf_counter() - start) / 60:.1f} min")


def compare(cfg: "Config", env: "Env", diffusion, theta0) -> list:
    """From θ0: the N ranges, the equal-compute baseline, the merge and the evaluation; returns the results rows."""
    stage_finetune(cfg, env, diffusion, theta0)
    models = [m.strip() for m in cfg.models.split(",")]
    if cfg.baseline:
        stage_baseline(cfg, env, diffusion, theta0)
        models = [baseline_name(cfg) if m == "baseline" else m for m in models]  # the weighting that was trained
    else:
        models = [m for m in models if not m.startswith("baseline")]
    cfg = dataclasses.replace(cfg, models=",".join(models))
    stage_merge(cfg, env, diffusion, theta0)
    return stage_evaluate(cfg, env, diffusion, theta0)


def seed_runs(cfg: "Config") -> list:
    """[(seed, config)]: the run itself, or with --seeds one run per seed under --out/seed_<s>/, all from one θ0."""
    if not cfg.seeds:
        return [(cfg.seed, cfg)]
    theta0_file = cfg.pretrained or str(run_dir(cfg, "pretrain", "ckpt.pt"))
    return [(s, dataclasses.replace(cfg, seed=s, seeds="", out=str(run_dir(cfg, f"seed_{s}")), pretrained=theta0_file))
            for s in seed_list(cfg)]


# ======================================================================================================================
# Part II: machinery
# Not needed to follow the paper: configuration and its checks, devices and torch.distributed, the training
# loop (EMA, checkpoints, resume, RNG state), data loaders, FID, figures, Stable Diffusion, benchmark, command line.
# ======================================================================================================================


# --- II.1 Configuration: one dataclass that is also the command line, and its checks ---------------------------------

def _opt(default, help, choices=""):
    """A config field with its command-line help and its choices, given as one string: "fid pixel"."""
    return field(default=default, metadata=dict(help=help, choices=choices.split() or None))


@dataclass
class Config:
    """Every setting of every stage, in the --help groups of GROUPS; dataset presets fill in the paper's values."""
    dataset: str = _opt("synthetic", "training data", "synthetic cifar10 lsun_church lsun_bedroom folder")
    data_dir: str = _opt("data", "where the dataset lives (CIFAR-10: the folder holding cifar-10-batches-py)")
    download: bool = _opt(False, "download CIFAR-10 into --data-dir if it is missing")
    out: str = _opt("", "run folder; everything this run writes goes under it (default runs/<dataset>)")
    seed: int = _opt(0, "seed of everything: data order, noise, timesteps, samples")
    seeds: str = _opt("", "e.g. 0,1,2: the comparison once per seed from one θ0 (in seed_<s>/), then its spread")
    device: str = _opt("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    resume: bool = _opt(False, "continue the interrupted stages of this run folder from their last checkpoint")
    overwrite: bool = _opt(False, "start over, replacing what this run folder holds")
    precision: str = _opt("auto", "training autocast (auto: bf16 on a GPU with bf16, else fp32)", "auto fp32 bf16 fp16")
    eval_precision: str = _opt("fp32", "precision of everything that measures or selects", "fp32 bf16")
    compile: Optional[bool] = _opt(None, "torch.compile the model (default: on for CUDA, off on CPU)")
    channels_last: Optional[bool] = _opt(None, "channels_last memory format (default: on for CUDA, off on CPU)")
    workers: int = _opt(0, "data-loading worker processes (0 loads in the main process)")
    model: str = _opt("ddpm", "ddpm: the pixel UNet; sd: a diffusers Stable Diffusion folder (--pretrained)", "ddpm sd")
    preset: str = _opt("tiny", "UNet size", " ".join(PRESETS))
    pretrained: str = _opt("", "θ0: cifar10, lsun_church, lsun_bedroom, a file or a folder; empty: train it here")
    image_size: int = _opt(0, "training resolution (0: the preset's)")
    flip: bool = _opt(False, "random horizontal flips")
    dropout: Optional[float] = _opt(None, "dropout while training (default: the preset's; 0 when finetuning)")
    train_steps: int = _opt(2000, "optimizer steps to pretrain θ0")
    train_lr: float = _opt(2e-4, "pretraining learning rate (DDPM: 2e-4)")
    train_warmup: int = _opt(100, "pretraining linear warm-up steps (DDPM: 5000)")
    train_schedule: str = _opt("constant", "after the warm-up: constant (DDPM), cosine (to 0)", "constant cosine")
    curve_every: int = _opt(0, "log the EMA's held-out loss every this many pretraining steps (0: off)")
    n_ranges: int = _opt(PAPER.n_ranges, "N, the number of timestep ranges (paper: 4; 8 in the ablation)")
    ranges: str = _opt("all", "which ranges this invocation finetunes: all, or indices such as 0,2")
    steps: int = _opt(PAPER.steps, "optimizer steps per range (paper: 20K); the baseline gets N times as many")
    batch_size: int = _opt(PAPER.batch_size, "images per optimizer step over all processes")
    grad_accum: int = _opt(1, "micro-batches per optimizer step (official LSUN script: 4 x 16)")
    lr: float = _opt(PAPER.lr, "finetuning learning rate (official: 5e-5, constant)")
    adam_betas: tuple = _opt(PAPER.adam_betas, "AdamW betas")
    weight_decay: float = _opt(PAPER.weight_decay, "AdamW weight decay")
    adam_eps: float = _opt(1e-8, "AdamW epsilon")
    grad_clip: float = _opt(PAPER.grad_clip, "gradient clipping norm (0: off)")
    ema_decay: float = _opt(PAPER.ema_decay, "EMA decay ceiling; the decay warms up as min(ceiling, 1 - k^-3/4)")
    p_global: float = _opt(PAPER.p_global, "chance of drawing the timesteps from all of [0, T) (Eq. 6)")
    per_sample: bool = _opt(PAPER.per_sample, "one probabilistic-sampling coin per sample (official: per batch)")
    antithetic: bool = _opt(PAPER.antithetic, "timesteps in antithetic pairs (t, lo+hi-1-t), as the official code")
    consistency: float = _opt(PAPER.consistency, "λ, weight of the consistency loss to the frozen θ0 (Eq. 4-5)")
    projections: bool = _opt(PAPER.projections, "channel-wise projections (identity-initialised 1x1 convs)")
    baseline: bool = _opt(True, "also run the equal-compute baseline: plain finetuning on all timesteps, N x steps")
    baseline_weighting: str = _opt("none", "the baseline's loss: none, minsnr or p2 (DeMe Table 1)", "none minsnr p2")
    ckpt_every: int = _opt(1000, "save a resumable checkpoint every this many steps")
    grid_every: int = _opt(0, "save a sample grid every this many steps (0: only at the end)")
    merge_method: str = _opt("task_arithmetic", "how to merge", "task_arithmetic average ties dare")
    merge_weights: str = _opt("", "w_1..w_N, low t first (LSUN official: 0.1,0.1,0.2,0.5); empty: search them")
    heldout_fraction: float = _opt(0.1, "folder and LSUN: the share held out from training (half to select)")
    search_images: int = _opt(512, "selection images of the merge search's held-out loss")
    search_objective: str = _opt("loss", "what chooses w: held-out loss, per range, samples", "loss per_range samples")
    search_evals: int = _opt(60, "most candidates the loss search scores")
    search_candidates: int = _opt(8, "most candidates the samples objective ranks")
    search_samples: int = _opt(0, "samples per candidate of the samples objective (0: --n-samples)")
    ties_k: float = _opt(PAPER.ties_k, "TIES: percent of each task vector's entries kept")
    ties_lam: float = _opt(PAPER.ties_lam, "TIES: scale of the merged task vector")
    dare_p: float = _opt(PAPER.dare_p, "DARE: drop probability")
    sampler: str = _opt("ddim", "sampler for evaluation", "ddim ddpm")
    sample_steps: int = _opt(100, "DDIM steps (paper: 100 for CIFAR-10, 50 for LSUN)")
    eta: float = _opt(0.0, "DDIM eta (0: deterministic)")
    variance: str = _opt("fixedlarge", "DDPM sampling variance", "fixedlarge fixedsmall")
    n_samples: int = _opt(50000, "samples per model for the metric (paper: 50K)")
    report_images: int = _opt(512, "report images of the results table's held-out loss")
    eval_batch: int = _opt(256, "sampling batch size")
    metric: str = _opt("auto", "FID, or a Fréchet distance on pixels (auto: pixel for synthetic)", "auto fid pixel")
    inception_weights: str = _opt("", "pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    fid_stats: str = _opt("", "reference statistics .npz of the training set (default: computed once, cached)")
    models: str = _opt("theta0,baseline,ensemble,merged", "models the evaluate stage compares")
    bench_batch: int = _opt(0, "images per timed step (0: the run's micro-batch and --eval-batch; on a CPU try 8)")
    bench_iters: int = _opt(5, "timed rounds after a warm-up; the median is reported")
    figures: str = _opt("all", "all, or some of conflict, landscape, norms, stationarity, seeds, interference, partial")
    conflict_timesteps: int = _opt(20, "K, the timesteps of the gradient-conflict figure: the centres of K bins")
    landscape_ranges: str = _opt("", "i,j: the ranges spanning the merge-landscape plane (default: 0 and N-1)")
    landscape_points: int = _opt(15, "grid points per axis of the merge landscape, weights from -0.25 to 1.5")
    prompts: str = _opt("", "prompts to draw: a file with one per line or 'a|b|c' (default: 8 captions)")
    guidance_scale: float = _opt(7.5, "classifier-free guidance scale (1: none)")
    sd_resolution: int = _opt(512, "image resolution for training and sampling (SD v1: 512)")


# The CPU recipe: θ0 trained to convergence (about an hour on 2 cores), then DeMe in minutes (README, "A converged θ0").
CPU_RECIPE = dict(preset="tiny", train_steps=12000, train_lr=1e-3, train_schedule="cosine", steps=64, batch_size=32,
                  ckpt_every=100, sample_steps=20, n_samples=512, eval_batch=256, search_images=256, search_evals=30,
                  report_images=1024)
DATASET_PRESETS = {
    "synthetic": dict(CPU_RECIPE, pretrained="tiny_synthetic"),  # the CPU pipeline, from the θ0 shipped in assets/
    # the paper's recipes (DeMe Sec. 4 and the official scripts; DDIM-100 for CIFAR-10, 50 steps for LSUN)
    "cifar10": dict(preset="cifar10", pretrained="cifar10", flip=True, sample_steps=100, search_samples=5000),
    **{d: dict(preset="lsun256", pretrained=d, batch_size=64, grad_accum=4, sample_steps=50, eval_batch=64,
               variance="fixedsmall", search_samples=5000) for d in ("lsun_church", "lsun_bedroom")},
    "folder": dict(search_samples=5000),  # on a GPU the paper's finetuning budget; on a CPU the CPU recipe
}


def preset_of(given: dict) -> tuple:
    """(name, values) of the dataset preset that fills in what no flag gives (argparse refuses an unknown dataset)."""
    dataset, device = given.get("dataset", Config.dataset), given.get("device", Config.device)
    if dataset == "folder" and (device == "cpu" or device == "auto" and not torch.cuda.is_available()):
        return "the CPU recipe", dict(CPU_RECIPE, metric="pixel")  # a laptop: θ0 trained here first
    return f"the {dataset} preset", DATASET_PRESETS[dataset]


# A folder too small for the held-out counts asked for holds out a larger share of its images, up to 30%.
HELDOUT_FRACTIONS = (0.1, 0.15, 0.2, 0.25, 0.3)
MIN_FOLDER_IMAGES, MIN_HELDOUT_IMAGES = 100, 8


def resolve_config(given: dict, notes: Optional[list] = None) -> Config:
    """Defaults < preset < flags, checked; a small folder's held-out share and unflagged counts fit it (`notes`)."""
    cfg = Config(**{**preset_of(given)[1], **given})
    cfg.out = cfg.out or f"runs/{cfg.dataset}"
    check_config(cfg)
    if cfg.dataset != "folder" or cfg.model != "ddpm":
        return cfg
    h = sorted(unit_hash(p.relative_to(cfg.data_dir).as_posix()) for p in image_files(cfg.data_dir))  # hashed once
    if len(h) < MIN_FOLDER_IMAGES:
        raise UserError(f"{cfg.data_dir} holds {len(h)} images, too few to train, select and report: use a folder "
                        f"of at least {MIN_FOLDER_IMAGES} images")

    def split_sizes(fraction):  # (select, report, train), as heldout_role splits: h < fraction / 2, h < fraction
        select, held = bisect.bisect_left(h, fraction / 2), bisect.bisect_left(h, fraction)
        return select, held - select, len(h) - held

    fits = (f for f in HELDOUT_FRACTIONS if (s := split_sizes(f))[0] >= cfg.search_images and s[1] >= cfg.report_images)
    fraction = given.get("heldout_fraction") or next(fits, HELDOUT_FRACTIONS[-1])  # else the smallest share that fits
    select, report, train = split_sizes(fraction)
    if min(select, report) < MIN_HELDOUT_IMAGES:
        raise UserError(f"at --heldout-fraction {fraction} the selection and report splits of {cfg.data_dir} get "
                        f"{select} and {report} images, fewer than {MIN_HELDOUT_IMAGES}; raise --heldout-fraction")
    caps = dict(search_images=select, report_images=report)
    if eval_metric(cfg) == "pixel":  # real images: two sets from the training split, one from the selection split
        caps.update(n_samples=train // 2, search_samples=select)
    new = dict(heldout_fraction=fraction)
    for k, cap in caps.items():  # (--search-samples 0 means --n-samples)
        if k not in given and (getattr(cfg, k) or new.get("n_samples", cfg.n_samples)) > cap:
            new[k] = cap
    changed = {k: v for k, v in new.items() if v != getattr(cfg, k)}
    note = "; ".join(f"--{k.replace('_', '-')} {getattr(cfg, k) or cfg.n_samples} -> {v}" for k, v in changed.items())
    if note and notes is not None:
        notes.append(f"{cfg.data_dir} holds {len(h):,} images, {select} to select, {report} to report, {train} to "
                     f"train: {note}")
    return dataclasses.replace(cfg, **changed)


def config_summary(cfg: Config, given: dict, stage: str, notes, saved) -> str:
    """What this run's configuration changes from the defaults, and where each change came from."""
    preset_name, preset = preset_of(given)
    default, groups = Config(out=cfg.out), {"flags": {}, preset_name: {}, "fitted to the folder": {}}
    for k, value in vars(cfg).items():
        where = "flags" if k in given else preset_name if preset.get(k) == value else "fitted to the folder"
        if k in given or value != getattr(default, k):
            groups[where][k] = value
    lines = [f"deme.py {stage}: {cfg.dataset} into {cfg.out}; what differs from the defaults:"]
    lines += [f"  from {where}: " + ", ".join(f"{k}={v}" for k, v in values.items())
              for where, values in groups.items() if values]
    saved = [f"  the whole configuration: {run_dir(cfg, f'config_{stage}.json')}"] if saved else []
    return "\n".join(lines + [f"  note: {n}" for n in notes] + saved)


def check_config(cfg: Config):
    """One clear line for the first value that cannot work (argparse has checked the types and the choices)."""
    minimum = dict(steps=1, batch_size=1, grad_accum=1, n_samples=1, eval_batch=1, sample_steps=1, train_steps=1,
                   ckpt_every=1, search_evals=1, search_images=1, report_images=1, bench_iters=1, search_candidates=2,
                   eta=0, search_samples=0, workers=0, image_size=0, conflict_timesteps=2, landscape_points=2)
    res, down = cfg.image_size or PRESETS[cfg.preset]["resolution"], 2 ** (len(PRESETS[cfg.preset]["ch_mult"]) - 1)
    checks = [(cfg.model != "sd" or cfg.dataset == "folder" and cfg.pretrained and cfg.search_objective != "samples",
               "--model sd needs --pretrained SD_PIPELINE_FOLDER, --dataset folder --data-dir DIR (images plus "
               "metadata.jsonl) and --search-objective loss or per_range (samples scores DDPM samples)"),
              (1 <= cfg.n_ranges <= 1000 and 1000 % cfg.n_ranges == 0, f"--n-ranges {cfg.n_ranges} does not split "
               f"the 1000 timesteps evenly; use 1, 2, 4, 5, 8, 10, ..."),
              (0.0 <= cfg.p_global <= 1.0, f"--p-global {cfg.p_global} is not a probability; give a value in [0, 1]"),
              (0 < cfg.ties_k <= 100, f"--ties-k {cfg.ties_k} must lie in (0, 100]: the percent TIES keeps of each τ"),
              (0 <= cfg.dare_p < 1, f"--dare-p {cfg.dare_p} must lie in [0, 1): the probability DARE drops an entry"),
              (len(cfg.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.adam_betas), f"--adam-betas {cfg.adam_betas} "
               f"must be two numbers in [0, 1), e.g. 0.95,0.999"),
              (0 <= cfg.ema_decay < 1, f"--ema-decay {cfg.ema_decay} must lie in [0, 1), e.g. 0.9999"),
              *[(getattr(cfg, n) >= m, f"--{n.replace('_', '-')} must be at least {m}, got {getattr(cfg, n)}")
                for n, m in minimum.items()],
              (0 < cfg.heldout_fraction < 1, f"--heldout-fraction {cfg.heldout_fraction} is not in (0, 1); e.g. 0.1"),
              (cfg.sampler != "ddim" or cfg.sample_steps < 1 or 1000 % cfg.sample_steps == 0,  # (< 1: said above)
               f"--sample-steps {cfg.sample_steps} does not divide the 1000 timesteps; use 10, 20, 50, 100, ..."),
              (res % down == 0, f"--image-size {res} cannot pass the downsamplings of preset {cfg.preset}; use a "
               f"multiple of {down}")]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for parse in (range_indices, merge_weight_list, seed_list):  # each raises its flag's line ([] when not given)
        parse(cfg)


def parse_list(flag, text, kind=int, example="0,1,2") -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{flag} {text!r} is not a list of {'integers' if kind is int else 'numbers'}; write for "
                        f"example --{flag} {example}") from None


def range_indices(cfg: Config) -> list:
    idx = list(range(cfg.n_ranges)) if cfg.ranges == "all" else parse_list("ranges", cfg.ranges, example="0,2")
    if not idx or any(not 0 <= i < cfg.n_ranges for i in idx):
        raise UserError(f"--ranges {cfg.ranges!r}: indices must lie in 0..{cfg.n_ranges - 1}, below --n-ranges")
    return idx


def seed_list(cfg: Config) -> list:
    seeds = parse_list("seeds", cfg.seeds)
    if cfg.seeds and (not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0):
        raise UserError(f"--seeds {cfg.seeds!r}: give distinct non-negative integers, e.g. 0,1,2")
    return seeds


def merge_weight_list(cfg: Config) -> list:
    w = parse_list("merge-weights", cfg.merge_weights, float, "0.1,0.1,0.2,0.5")
    if cfg.merge_weights and len(w) != cfg.n_ranges:
        raise UserError(f"--merge-weights has {len(w)} values but there are {cfg.n_ranges} ranges; give one per range")
    return w


# --- II.2 Devices, precision, torch.distributed ----------------------------------------------------------------------

@dataclass
class Env:
    """Where and how this process runs: device, its rank among torchrun's processes, precision."""
    device: torch.device
    rank: int = 0
    world: int = 1
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    eval_precision: str = "fp32"

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    @contextlib.contextmanager
    def exact(self):
        """fp32 as written: no autocast and no TF32 (on GPUs, TF32 rounds fp32 matrix products to 10 mantissa bits)."""
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.autocast(self.device.type, enabled=False):
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def evaluation(self):
        """Where everything that measures or selects runs: exact fp32, or bf16 autocast with --eval-precision bf16."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.eval_precision == "bf16" else self.exact()

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def master_first(self):
        """Rank 0 runs the block first (downloads, caches); the other ranks run it after, and find its files."""
        if not self.master:
            self.barrier()
        try:
            yield
        finally:  # also when rank 0 fails: the others then meet the same error rather than wait forever
            if self.master:
                self.barrier()


def timing_unet(cfg: Config) -> UNet:
    """A fresh UNet of the run's preset and resolution, no dropout (official finetuning): what bench and plans time."""
    return UNet.from_preset(cfg.preset, dropout=0.0, resolution=cfg.image_size or PRESETS[cfg.preset]["resolution"])


def setup_env(cfg: Config) -> Env:
    """Device, precision (auto: bf16 on a GPU that has it, else fp32; never from a timing) and torchrun's processes."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    try:
        device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise UserError(f"--device {cfg.device!r} is not a device; use cpu, cuda or cuda:N") from None
    gpu, gpus = device.type == "cuda", torch.cuda.device_count()
    if gpu:
        if gpus and (world > 1 or device.index is None):  # torchrun: the GPU of this LOCAL_RANK
            device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        if (device.index or 0) >= gpus:
            raise UserError(f"--device {cfg.device}: torch sees {gpus} GPU(s), numbered from 0; else use --device cpu")
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        import datetime
        torch.distributed.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(hours=1),
                                             device_id=device if gpu else None)
    auto = "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"  # CPUs: opt-in (README, "bf16 on CPUs")
    precision = auto if cfg.precision == "auto" else cfg.precision
    if gpu:  # TF32 only where training is not fp32 anyway; evaluation switches it off (Env.exact)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    return Env(device, rank, world, precision, gpu if cfg.compile is None else cfg.compile,
               gpu if cfg.channels_last is None else cfg.channels_last, cfg.eval_precision)


def unwrap(model):
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    return model


def frozen(model):
    return copy.deepcopy(unwrap(model)).eval().requires_grad_(False)


def place(model, env: Env):
    """The model on the device, in its memory format (in place; do this before taking references to weights)."""
    return model.to(env.device, memory_format=torch.channels_last if env.channels_last else torch.preserve_format)


def prepare(model, env: Env, train=False):
    model = place(model, env)
    if train and env.world > 1:  # device_ids: the GPU of this process (None on a CPU)
        model = nn.parallel.DistributedDataParallel(model, [env.device.index] if env.device.type == "cuda" else None)
    if env.compile:
        model = torch.compile(model)
    return model


# --- II.3 The training loop: EMA, checkpoints, resume, RNG state, atomic writes --------------------------------------

class EMA:
    """EMA of the weights, decay min(max_decay, 1 - k^-3/4) at step k: diffusers' EMAModel, as the official code."""

    def __init__(self, model, max_decay=PAPER.ema_decay):
        self.max_decay, self.step, live = max_decay, 0, unwrap(model).state_dict()
        self.state = {k: v.detach().clone() for k, v in live.items()}
        self._ema, self._live = zip(*[(self.state[k], v) for k, v in live.items() if v.is_floating_point()])

    def decay(self):
        return min(self.max_decay, 1.0 - self.step ** -0.75) if self.step > 0 else 0.0

    def update(self):
        """ema = d * ema + (1 - d) * θ after optimizer step k = self.step + 1 (on detached tensors: no autograd)."""
        self.step += 1
        torch._foreach_lerp_(self._ema, self._live, 1.0 - self.decay())


def restore(state: dict, env: Env, desc, seed, model, ema, opt, sched, scaler, generators):
    """Loads a checkpoint into train_loop's objects, saying what this machine could not restore; returns its step."""
    reseed = seed + 1_000_003 * state["step"]
    for part, key in ((model, "model"), (opt, "optimizer"), (sched, "scheduler")):
        part.load_state_dict(state[key])
    for k, v in state["ema"].items():
        ema.state[k].copy_(v)
    ema.step = state["step"]
    lost, rng, gpus = [], state["rng"], torch.cuda.device_count()
    torch.set_rng_state(rng["torch"])
    torch.cuda.set_rng_state_all(rng["cuda"][:gpus])
    if len(rng["cuda"]) > gpus:
        lost.append(f"the CUDA random state of {len(rng['cuda']) - gpus} of {len(rng['cuda'])} GPU(s)")
    for k, (g, s) in enumerate(zip(generators, rng["generators"])):
        try:
            g.set_state(s)
        except RuntimeError:
            lost.append(f"the {g.device.type} noise generator (saved on another kind of device)")
            g.manual_seed(reseed + k)
    if scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    elif scaler.is_enabled() or state["scaler"]:
        lost.append("the fp16 gradient scaler's state (the run changed precision)")
    if env.world > 1:  # rank 0's global states were saved; dropout must not repeat rank 0's masks
        torch.manual_seed(reseed + env.rank + 2)
    if lost and env.master:
        print(f"{desc}: resumed at step {state['step']} with the model, EMA, optimizer, step and data position; could "
              f"not restore {'; '.join(lost)}")
    return state["step"]


def load_checkpoint(path) -> dict:
    """A checkpoint dict of this project, loaded safely (weights_only: no code in a pickle runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise UserError(f"checkpoint {path} cannot be read ({why}); it is truncated, corrupt or not a plain weights "
                        f"file: delete it and rerun the stage") from None


def build_model(model_config: dict, state_dict) -> UNet:
    return model_from_state_dict(state_dict, model_config)


def load_model(path, ck=None) -> UNet:
    """The EMA weights saved in one of this project's checkpoints, as a model; `ck`: that checkpoint, if loaded."""
    ck = ck or load_checkpoint(path)
    if "model_config" not in ck:
        raise UserError(f"{path} is not a checkpoint of this project (no model_config); pass weights as --pretrained")
    return build_model(ck["model_config"], ck["ema"])


def atomic_write_text(text, path):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_grid(model, diffusion, path, env: Env, cfg: Config):
    """A grid of samples (the evaluation's sampler) from fixed noise, so grids of two models compare image by image."""
    from torchvision.utils import save_image
    n = min(64 if model.config["resolution"] <= 64 else 16, cfg.n_samples)  # never more than the evaluation draws
    x = sample_batch(cfg, env, diffusion, model.to(env.device).eval(), range(n), 0, sample_shape(model))
    with atomic_path(path) as tmp:
        save_image(x.float() * 0.5 + 0.5, tmp, nrow=int(math.sqrt(n)))


def check_batch_split(cfg: Config, world: int) -> int:
    """Images per process per micro-batch: --batch-size / (--grad-accum x processes), which must be whole."""
    micro, rest = divmod(cfg.batch_size, cfg.grad_accum * world)
    if rest or micro == 0:
        raise UserError(f"--batch-size {cfg.batch_size} does not split into --grad-accum {cfg.grad_accum} x "
                        f"{world} process(es); use a multiple of {cfg.grad_accum * world}")
    return micro


def train_loop(cfg: Config, env: Env, stage_dir, model, data, diffusion, *, steps, lr, warmup, timesteps,
               identity: dict, teacher=None, lam=0.0, desc="train", seed=0, encode=None, grid=None,
               weighting=None, curve=None, schedule="constant") -> dict:
    """Trains `model` resumably; returns its EMA weights: DDPM Alg. 1 with the consistency loss to `teacher` (Eq. 4-5).
    Hooks: encode(batch) -> (x0, model kwargs) (SD); grid(ema, path); weighting(t) (Table 1); curve(step, ema)."""
    ckpt_path = Path(stage_dir) / "ckpt.pt"
    identity = dict(identity, steps=steps, lr=lr, batch_size=cfg.batch_size, seed=seed)
    state = None if cfg.overwrite or not ckpt_path.exists() else load_checkpoint(ckpt_path)
    diff = [f"{k}: {state['identity'].get(k)!r} there vs {v!r} now" for k, v in identity.items()
            if state and state["identity"].get(k) != v]
    if diff:  # a stage made with other settings is never silently replaced, an unfinished one never silently reused
        raise UserError(f"{ckpt_path} was made with other settings ({'; '.join(diff[:3])}); choose another --out, "
                        f"or pass --overwrite to replace it")
    if state and state["step"] < steps and not cfg.resume:
        raise UserError(f"{ckpt_path} holds an unfinished stage (step {state['step']} of {steps}); pass --resume to "
                        f"continue it or --overwrite to start over")
    if state and state["step"] >= steps:
        if env.master:
            print(f"{desc}: reusing the finished stage in {ckpt_path}")
        return state["ema"]
    micro = check_batch_split(cfg, env.world)
    opt, sched, scaler, ema = optimizer(place(model, env).train(), cfg, env, lr,
                                        lambda k: lr_factor(k, steps, warmup, schedule))
    mine = slice(env.rank * micro, (env.rank + 1) * micro)  # of every global draw, so N processes train as one does
    t_gen = torch.Generator().manual_seed(seed * 7919)  # timesteps and coins (CPU)
    x_gen = torch.Generator(env.device).manual_seed(seed * 7919 + 1)  # noise and flips (device)
    torch.manual_seed(seed * 7919 + env.rank + 2)  # dropout, different on every rank
    start = restore(state, env, desc, seed * 7919, model, ema, opt, sched, scaler, (t_gen, x_gen)) if state else 0
    teacher = None if teacher is None else prepare(teacher, env)
    net = prepare(model, env, train=True)
    grid = grid or (lambda state, path: save_grid(build_model(unwrap(model).config, state), diffusion, path, env, cfg))
    data_iter = batches(data, micro, seed, env.rank, env.world, start=start * cfg.grad_accum, workers=cfg.workers)

    def micro_step(last) -> torch.Tensor:  # one micro-batch: DDPM Algorithm 1 with DeMe's consistency loss (Eq. 4-5)
        x0, cond = encode(next(data_iter)) if encode else (next(data_iter).to(env.device, non_blocking=True), {})
        if cfg.flip:
            flip = (torch.rand(micro * env.world, generator=x_gen, device=env.device) < 0.5)[mine]
            x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
        x0 = place(x0, env)  # the model's memory format
        t = timesteps(micro * env.world, t_gen)[mine].to(env.device)
        noise = torch.randn((micro * env.world, *x0.shape[1:]), generator=x_gen, device=env.device)[mine]
        with net.no_sync() if env.world > 1 and not last else contextlib.nullcontext():
            with env.autocast():
                loss = training_loss(net, teacher, diffusion, x0, t, noise, lam, weighting and weighting(t), **cond)
            scaler.scale(loss / cfg.grad_accum).backward()
        return loss.detach() / cfg.grad_accum

    bad_steps = 0
    with tqdm(total=steps, initial=start, desc=desc, disable=not env.master, dynamic_ncols=True) as bar:
        for done in range(start + 1, steps + 1):
            total = sum(micro_step(m == cfg.grad_accum - 1) for m in range(cfg.grad_accum))
            if env.world > 1:
                torch.distributed.all_reduce(total)
                total /= env.world
            value = total.item()
            bad_steps = 0 if math.isfinite(value) else bad_steps + 1
            if bad_steps and (env.precision != "fp16" or bad_steps > 50):  # fp16: the scaler skips overflowing steps
                raise UserError(f"{desc}: the loss became {value} at step {done}; stopped, and {ckpt_path} still "
                                f"holds the last good checkpoint; lower the learning rate, then --resume")
            optimizer_step(model, opt, sched, scaler, ema, cfg.grad_clip)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            bar.update(1)
            if env.master and (done % cfg.ckpt_every == 0 or done == steps):
                atomic_save(dict(model=unwrap(model).state_dict(), ema=ema.state, optimizer=opt.state_dict(),
                                 scheduler=sched.state_dict(), scaler=scaler.state_dict(), step=done,
                                 rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all(),
                                          generators=[t_gen.get_state(), x_gen.get_state()]),
                                 identity=identity, config=dataclasses.asdict(cfg),
                                 model_config=getattr(unwrap(model), "config", None)), ckpt_path)
            if curve is not None and env.master and cfg.curve_every and done % cfg.curve_every == 0:
                curve(done, ema.state)
            if env.master and (done == steps or (cfg.grid_every and done % cfg.grid_every == 0)):
                grid(ema.state, ckpt_path.parent / f"grid_{done:06d}.png")
    env.barrier()
    return ema.state


def optimizer(model, cfg: Config, env: Env, lr, factor):
    """AdamW with the learning-rate factor(k) schedule, the fp16 gradient scaler (a no-op otherwise) and the EMA."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                            eps=cfg.adam_eps)
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor), scaler, EMA(model, cfg.ema_decay)


def optimizer_step(model, opt, sched, scaler, ema, grad_clip):
    """One step on the accumulated gradients (fp16: unscaled, overflowing steps skipped), clipped; schedule; EMA."""
    scaler.unscale_(opt)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    sched.step()
    ema.update()


def lr_factor(k, steps, warmup, schedule="constant") -> float:
    """Step k's learning rate / peak: a linear warm-up, then constant or a cosine to 0 (SGDR, without restarts)."""
    if k < warmup:
        return (k + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / max(1, steps - warmup))))


def run_dir(cfg: Config, *parts) -> Path:
    return Path(cfg.out).joinpath(*parts)


def theta0_model(cfg: Config, env: Env, diffusion) -> UNet:
    """θ0: the published checkpoint named by --pretrained, or one pretrained here from scratch (cached in the run)."""
    if cfg.pretrained:
        with env.master_first():  # one download, not one per process
            return load_pretrained(cfg.pretrained).eval()
    stage_train(cfg, env, diffusion)  # returns at once when the run folder holds the finished stage
    return load_model(run_dir(cfg, "pretrain", "ckpt.pt")).eval()


def stage_identity(cfg: Config, **extra) -> dict:
    """The settings that make a trained model what it is (a reused checkpoint must agree on all of them)."""
    split = {} if cfg.dataset in ("synthetic", "cifar10") else dict(heldout_fraction=cfg.heldout_fraction)
    return dict(dataset=cfg.dataset, pretrained=cfg.pretrained or "pretrain/ckpt.pt", grad_accum=cfg.grad_accum,
                **split, adam_betas=list(cfg.adam_betas), weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                ema_decay=cfg.ema_decay, flip=cfg.flip, dropout=cfg.dropout or 0.0, **extra)


def stage_train(cfg: Config, env: Env, diffusion=None):
    """Pretrains θ0 from scratch (DDPM Algorithm 1) on the configured dataset: the θ0 of the CPU pipeline."""
    diffusion = diffusion or GaussianDiffusion()
    torch.manual_seed(cfg.seed)  # the same initial θ in every run and on every rank
    overrides = dict(resolution=cfg.image_size or None, dropout=cfg.dropout)
    model = UNet.from_preset(cfg.preset, **{k: v for k, v in overrides.items() if v is not None})
    uniform = lambda b, g: torch.randint(0, diffusion.T, (b,), generator=g)
    identity = stage_identity(dataclasses.replace(cfg, pretrained=""),  # from scratch, whatever --pretrained says
                              stage="pretrain", preset=cfg.preset, model=model.config, warmup=cfg.train_warmup,
                              schedule=cfg.train_schedule)
    csv = run_dir(cfg, "pretrain", "heldout_curve.csv")
    images = heldout_images(cfg, cfg.search_images, "select") if cfg.curve_every else None

    def curve(step, ema):  # how far from converged θ0 is: a row (step, its EMA's held-out loss, loss per range)
        mean, per_range = heldout_loss(build_model(model.config, ema), diffusion, images, env, cfg.n_ranges,
                                       role_seed(cfg.seed, "select"))
        rows = csv.read_text().splitlines()[1:] if csv.exists() else []  # a resume drops the rows it redoes
        head = "step,heldout_loss," + ",".join(f"loss_range{i}" for i in range(len(per_range)))
        atomic_write_text("\n".join([head] + [r for r in rows if int(r.split(",")[0]) < step] +
                                    [",".join(f"{v:.6g}" for v in [step, mean, *per_range])]) + "\n", csv)

    ema = train_loop(cfg, env, run_dir(cfg, "pretrain"), model, make_dataset(cfg), diffusion, steps=cfg.train_steps,
                     lr=cfg.train_lr, warmup=cfg.train_warmup, timesteps=uniform, identity=identity,
                     desc="pretrain θ0", seed=cfg.seed, curve=curve, schedule=cfg.train_schedule)
    if env.master:  # θ0 alone, in the layout assets/ ships it in
        atomic_save({k: v.float() for k, v in ema.items()}, run_dir(cfg, "pretrain", "theta0.pt"))
        if cfg.curve_every and csv.exists():
            try:
                print(f"held-out loss curve: {plot_curve(csv)}")
            except UserError as e:
                print(f"warning: no curve plot ({e})", file=sys.stderr)


def finished_checkpoint(path: Path, what: str, command: str) -> dict:
    """The checkpoint at `path`, or one line saying `what` is missing or unfinished and the `command` that fixes it."""
    if not path.exists():
        raise UserError(f"{what} has no checkpoint at {path}; run `{command}` with the same --out first")
    ck = load_checkpoint(path)
    if "step" in ck and ck["step"] < ck["identity"]["steps"]:
        raise UserError(f"{what} is unfinished ({path}, step {ck['step']} of {ck['identity']['steps']}); finish it "
                        f"with `{command} --resume`")
    return ck


def range_checkpoints(cfg: Config):
    """The checkpoints of θ_1..θ_N, every range finished, one at a time (each holds the optimizer's state too)."""
    for i in range(cfg.n_ranges):
        yield finished_checkpoint(run_dir(cfg, f"range_{i}", "ckpt.pt"), f"range {i}",
                                  f"python deme.py finetune --ranges {i}")


def range_models(cfg: Config) -> list:
    return [build_model(ck["model_config"], ck["ema"]).eval() for ck in range_checkpoints(cfg)]


# --- II.4 Data loaders: CIFAR-10, LSUN, image folders, held-out splits -----------------------------------------------

class TensorImages(torch.utils.data.TensorDataset):
    """Images in memory, uint8 in [0, 255] or float in [-1, 1]; items in [-1, 1]."""

    def __getitem__(self, item):
        x = self.tensors[0][split_item(item)[0]]
        return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()


def cifar10_images(root, train=True, download=False) -> torch.Tensor:
    """CIFAR-10 from its python pickles (cifar-10-batches-py) as uint8 (N, 3, 32, 32)."""
    import pickle
    allowed = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    allowed |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    class NumpyOnly(pickle.Unpickler):  # numpy arrays, lists and dicts: nothing in a batch file may run code
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"refused to load {module}.{name}")
            return super().find_class(module, name)

    folder = Path(root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and download:
        from torchvision.datasets import CIFAR10
        try:
            CIFAR10(root, train=train, download=True)
        except Exception as e:
            raise UserError(f"could not download CIFAR-10 into {root} ({e}); download cifar-10-python.tar.gz from "
                            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it there") from None
    elif missing:
        raise UserError(f"CIFAR-10 not found: {folder / missing[0]} is missing; pass --download, or extract "
                        f"cifar-10-python.tar.gz into {root} (or point --data-dir at the folder that holds "
                        f"cifar-10-batches-py)")
    arrays = []
    for n in names:
        try:
            with open(folder / n, "rb") as f:
                batch = NumpyOnly(f, encoding="bytes").load()
            arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        except Exception as e:
            raise UserError(f"{folder / n} is not a CIFAR-10 batch file ({e}); delete it and pass --download") from None
    return torch.from_numpy(np.concatenate(arrays))


def image_files(folder) -> list:
    """Every image file under `folder`, sorted; unreadable ones skipped with a warning."""
    from PIL import Image
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist; check --data-dir (or the folders given to fid)")
    good, bad = [], []
    for p in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        ok = p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # only image files are worth opening
        try:
            if ok:
                with Image.open(p) as im:
                    im.verify()
        except Exception:
            ok = False
        (good if ok else bad).append(p)
    if bad:
        print(f"warning: skipped {len(bad)} file(s) under {folder} that are not readable images, e.g. {bad[0]}",
              file=sys.stderr)
    if not good:
        raise UserError(f"no readable images (png, jpg, webp, bmp) under {folder}; check --data-dir")
    return good


def unit_hash(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2 ** 64  # uniform in [0, 1)


def heldout_role(name: str, fraction: float) -> str:
    """The split of image `name` by hash (new files move none): `fraction` held out, half to select, half to report."""
    h = unit_hash(name)
    return "select" if h < fraction / 2 else "report" if h < fraction else "train"


def split_item(item):
    """A dataset index as (i, crop key): batches() passes (i, key) to image files, other callers plain i."""
    return item if isinstance(item, tuple) else (item, None)


class ImageFolder(torch.utils.data.Dataset):
    """The images under `folder` (split `role`'s), short side to `size`, cropped centred or as the crop key seeds."""

    def __init__(self, folder, size, random_crop=False, role=None, fraction=0.1):
        self.paths = [p for p in image_files(folder)
                      if role is None or heldout_role(p.relative_to(folder).as_posix(), fraction) == role]
        self.size, self.random_crop = size, random_crop

    def __len__(self):
        return len(self.paths)

    def open(self, i):
        from PIL import Image
        return Image.open(self.paths[i])

    def __getitem__(self, item):
        from torchvision.transforms import functional as TF
        i, key = split_item(item)
        with self.open(i) as im:
            image = TF.resize(im.convert("RGB"), self.size)
        if key is None or not self.random_crop:
            image = TF.center_crop(image, self.size)
        else:
            rng, (w, h) = random.Random(key), image.size
            image = TF.crop(image, rng.randint(0, h - self.size), rng.randint(0, w - self.size), self.size, self.size)
        return TF.to_tensor(image) * 2 - 1


LMDB = {}  # this process's environment of each lmdb folder: lmdb opens a folder once per process, never across a fork
if hasattr(os, "register_at_fork"):  # so a DataLoader worker opens its own (a spawned one starts without any)
    os.register_at_fork(before=lambda: [LMDB.pop(folder).close() for folder in list(LMDB)])


class LSUN(ImageFolder):
    """An lmdb's `role` split, keys listed once into `cache`; all splits of one folder read through one environment."""

    def __init__(self, folder, size, random_crop, role, fraction, cache: Path):
        self.folder, self.size, self.random_crop = str(folder), size, random_crop
        if cache.is_file():
            keys = cache.read_bytes().split(b"\n")
        else:
            with self.lmdb().begin() as txn:
                keys = list(txn.cursor().iternext(keys=True, values=False))
            with atomic_path(cache) as tmp:
                tmp.write_bytes(b"\n".join(keys))
        self.paths = [k for k in keys if heldout_role(k.decode(), fraction) == role]

    def lmdb(self):
        if self.folder not in LMDB:
            try:
                import lmdb
                LMDB[self.folder] = lmdb.open(self.folder, readonly=True, lock=False, readahead=False, meminit=False)
            except ImportError:  # (matched first: lmdb.Error is looked up only once lmdb is imported)
                raise UserError("reading LSUN lmdb folders needs the lmdb package: pip install lmdb") from None
            except lmdb.Error as e:
                raise UserError(f"{self.folder} is not a readable lmdb ({e}); check --data-dir") from None
        return LMDB[self.folder]

    def open(self, i):
        from PIL import Image
        with self.lmdb().begin() as txn:
            return Image.open(io.BytesIO(txn.get(self.paths[i])))


def make_dataset(cfg: Config, split="train", n=None):
    """The split: train (random crops), eval (the same, centred), select, report (never trained on; CIFAR-10: test)."""
    size = cfg.image_size or PRESETS[cfg.preset]["resolution"]
    if cfg.dataset == "synthetic":  # a fixed dataset, like the real ones: --seed changes the training, not the data
        count = n or (20000 if split in ("train", "eval") else 2048)
        return TensorImages(synthetic_images(count, size, seed=SYNTHETIC_SEEDS[split]))
    if cfg.dataset == "cifar10":
        if size != 32:
            raise UserError(f"CIFAR-10 images are 32x32 but the model takes {size}; use --preset cifar10 or tiny "
                            f"with --image-size 32")
        images = cifar10_images(cfg.data_dir, train=split in ("train", "eval"), download=cfg.download)
        half = len(images) // 2
        return TensorImages({"select": images[:half], "report": images[half:]}.get(split, images))
    role, random_crop = ("train" if split == "eval" else split), split == "train" and cfg.dataset != "folder"
    category = {"lsun_church": "church_outdoor", "lsun_bedroom": "bedroom"}.get(cfg.dataset)
    if category and (Path(cfg.data_dir) / f"{category}_train_lmdb").is_dir():  # else LSUN as a plain image folder
        return LSUN(Path(cfg.data_dir) / f"{category}_train_lmdb", size, random_crop, role, cfg.heldout_fraction,
                    run_dir(cfg, f"lsun_keys_{category}.txt"))
    return ImageFolder(cfg.data_dir, size, random_crop, role, cfg.heldout_fraction)


def held_out_split(cfg: Config, n, role, flag=None):
    ds = make_dataset(cfg, role, n)
    if len(ds) < n:
        flag = flag or ("--search-images" if role == "select" else "--report-images")
        raise UserError(f"the {role} split of {cfg.dataset} has {len(ds)} images, fewer than {flag} {n}; lower "
                        f"{flag}" + ("" if cfg.dataset == "cifar10" else " or raise --heldout-fraction"))
    return ds


def heldout_images(cfg: Config, n, role) -> torch.Tensor:
    """The first n images of the "select" or "report" split, as one (n, 3, H, W) tensor in [-1, 1]."""
    ds = held_out_split(cfg, n, role)
    return torch.stack([ds[i] for i in range(n)])


def batches(dataset, batch, seed, rank=0, world=1, start=0, workers=0):
    """Endless micro-batches: epoch e permuted by (seed, e), rank r's share of each, the first `start` skipped."""
    n = len(dataset)
    per_epoch = n // (batch * world)
    if per_epoch == 0:
        raise UserError(f"the dataset has {n} images, fewer than one batch of {batch * world}; lower --batch-size")
    epoch, offset = divmod(start, per_epoch)
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        pos = torch.arange(per_epoch * batch * world).view(per_epoch, world, batch)[offset:, rank]  # (batches, batch)
        keys = (seed * 1_000_003 + epoch) * n + pos  # (index, crop key) items: a key per draw, alike on every rank
        sampler = [list(zip(i.tolist(), c.tolist())) for i, c in zip(perm[pos], keys)]
        yield from torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                               pin_memory=torch.cuda.is_available())
        epoch, offset = epoch + 1, 0


# --- II.5 Evaluation: FID as pytorch-fid computes it, samples on disk, pixel Fréchet distance, results files ---------

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
FID_WEIGHTS_SHA256_PREFIX, FID_DIMS = "6726825d", 2048


class FIDInception(nn.Module):
    """pytorch-fid's InceptionV3([3]), the TF 2015-12-05 graph; weights_path, or its weights downloaded once."""

    def __init__(self, weights_path=None, check_hash=True):
        super().__init__()
        from torchvision.models.inception import Inception3
        for name, module in Inception3(num_classes=1008, aux_logits=False, init_weights=False).named_children():
            self.add_module(name, module)  # the same state-dict keys as the weights file
        path = Path(weights_path or Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME)
        if weights_path and not path.is_file():
            raise UserError(f"Inception weights file {weights_path} does not exist; "
                            f"download {FID_WEIGHTS_URL} and pass its path")
        if not path.is_file():
            try:
                download(FID_WEIGHTS_URL, path, FID_WEIGHTS_SHA256_PREFIX if check_hash else "", "sha256")
            except UserError as e:
                raise UserError(f"Inception weights missing: {e}, or pass --inception-weights FILE") from None
        elif check_hash and not (digest := file_digest(path, "sha256")).startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise UserError(f"{path} has SHA-256 {digest}, not {FID_WEIGHTS_SHA256_PREFIX}...; it is not "
                            f"pytorch-fid's {FID_WEIGHTS_NAME}: download {FID_WEIGHTS_URL}")
        try:  # BatchNorm's step counters do not affect eval-mode outputs; files from older torch versions lack them
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.load_state_dict({**{k: v for k, v in self.state_dict().items()
                                     if k.endswith("num_batches_tracked")}, **state}, strict=True)
        except Exception as error:  # only reachable with check_hash=False
            raise UserError(f"cannot read {path} or it does not hold the FID Inception's weights "
                            f"({type(error).__name__}): download {FID_WEIGHTS_URL}") from None
        self.requires_grad_(False).eval()

    def forward(self, images):
        """(B, 3, H, W) in [0, 1] -> (B, 2048) pool3 features; TF's pool branches skip the padding, 7c's is a max."""
        x = 2 * F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False) - 1  # TF: [-1, 1]
        for name, b in self.named_children():  # torchvision's order: the stem, Mixed_5b ... Mixed_7c, avgpool, fc
            if name == "avgpool":
                return F.adaptive_avg_pool2d(x, 1).flatten(1)                  # (B, 2048)
            if not hasattr(b, "branch_pool"):  # the stem, Mixed_6a and Mixed_7a: as torchvision runs them
                x = b(x)
                continue
            pool = F.max_pool2d(x, 3, 1, 1) if name == "Mixed_7c" else F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
            if hasattr(b, "branch5x5_1"):  # InceptionA
                mid = [b.branch5x5_2(b.branch5x5_1(x)), b.branch3x3dbl_3(b.branch3x3dbl_2(b.branch3x3dbl_1(x)))]
            elif hasattr(b, "branch7x7_1"):  # InceptionC
                dbl = nn.Sequential(*(getattr(b, f"branch7x7dbl_{k}") for k in range(1, 6)))
                mid = [b.branch7x7_3(b.branch7x7_2(b.branch7x7_1(x))), dbl(x)]
            else:  # InceptionE: both 3x3 branches end in two parallel convs
                b3, b3dbl = b.branch3x3_1(x), b.branch3x3dbl_2(b.branch3x3dbl_1(x))
                mid = [b.branch3x3_2a(b3), b.branch3x3_2b(b3), b.branch3x3dbl_3a(b3dbl), b.branch3x3dbl_3b(b3dbl)]
            x = torch.cat([b.branch1x1(x), *mid, b.branch_pool(pool)], 1)


def feature_stats(features):
    """Gaussian fitted to features (N, D): mean and unbiased covariance np.cov, in float64 as pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_stats(path, mu, sigma):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)


def load_stats(path):
    """(mu, sigma) from an .npz written by save_stats or by pytorch-fid --save-stats."""
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"][:], f["sigma"][:]
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not all(np.isfinite(x).all() for x in (mu, sigma)):
            raise ValueError(f"no finite Gaussian statistics: mu {mu.shape}, sigma {sigma.shape}")
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read FID statistics (keys mu, sigma) from {path} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())}); pass an .npz written by pytorch-fid --save-stats or by this "
                        f"program") from None
    return mu, sigma


def _psd_eigenvalues(w):
    """Eigenvalues of a PSD matrix with rounding noise (|w| <= D eps max|w|, numpy's matrix_rank rule) set to 0."""
    noise = len(w) * np.finfo(w.dtype).eps * np.abs(w).max(initial=0)
    return np.where(w > noise, w, 0.0)  # sqrt of noise-level eigenvalues would add D sqrt(eps) for singular matrices


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance of two Gaussians, ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    assert mu2.shape == mu1.shape and sigma1.shape == sigma2.shape == mu1.shape * 2, (mu2.shape, sigma1.shape)
    # S1 S2 is similar to the PSD matrix S1^(1/2) S2 S1^(1/2), so tr (S1 S2)^(1/2) = sum of sqrt of its eigenvalues;
    # with S1 = V W V^T, that matrix is V (B^T S2 B) V^T for B = V W^(1/2), and B^T S2 B has the same eigenvalues.
    w1, V1 = np.linalg.eigh(sigma1)
    B = V1 * np.sqrt(_psd_eigenvalues(w1))                                     # (D, D)
    M = B.T @ sigma2 @ B                                                       # (D, D)
    tr_covmean = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((M + M.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def png_batches(paths, batch_size=50):
    """(B, 3, H, W) batches in [0, 1] of image files, read as pytorch-fid reads them (PIL RGB, ToTensor)."""
    from PIL import Image
    for start in range(0, len(paths), batch_size):
        batch = []
        for p in paths[start:start + batch_size]:
            try:
                with Image.open(p) as im:
                    batch.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float().div(255))
            except OSError as e:
                raise UserError(f"cannot read image {p} ({e}); delete or replace it") from None
        if len({x.shape for x in batch}) > 1:
            raise UserError(f"images differ in size (e.g. {paths[start]}); resize or crop them to one size first")
        yield torch.stack(batch)


def inception_statistics(images, n, inception, env, desc="FID features"):
    """FID statistics (float64, as pytorch-fid's) of n images; `images`: this rank's share, batches in [0, 1]."""
    s1 = torch.zeros(FID_DIMS, dtype=torch.float64, device=env.device)                 # Σ f
    s2 = torch.zeros(FID_DIMS, FID_DIMS, dtype=torch.float64, device=env.device)       # Σ f f^T
    inception = inception.to(env.device).eval()
    with tqdm(total=n, desc=desc, unit="img", disable=not env.master) as bar:
        for x in images:
            with torch.no_grad(), env.exact():
                f = inception(x.to(env.device)).double()                              # (B, 2048)
            s1 += f.sum(0)
            s2 += f.T @ f
            bar.update(min(len(x) * env.world, n - bar.n))
    if env.world > 1:
        torch.distributed.all_reduce(s1)
        torch.distributed.all_reduce(s2)
    mu = s1 / n
    sigma = (s2 - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def fid_command(path_a, path_b, batch_size=50, device="cpu", inception_weights=None, dims=2048, check_hash=True):
    """FID between A and B, each a folder of images or an .npz, like `python -m pytorch_fid A B`."""
    if dims != FID_DIMS:
        raise UserError(f"only dims={FID_DIMS} (pool3 features, the FID standard) is supported, got {dims}")
    # both inputs are checked before the Inception weights are looked for
    inputs = [load_stats(p) if str(p).endswith(".npz") else image_files(p) for p in (path_a, path_b)]
    model = None if all(isinstance(x, tuple) for x in inputs) else FIDInception(inception_weights, check_hash)
    for k, (path, paths) in enumerate(zip((path_a, path_b), inputs)):
        if isinstance(paths, list):  # image files, not the (mu, sigma) of an .npz
            if len(paths) < FID_DIMS:
                print(f"warning: {len(paths)} images < {FID_DIMS} feature dims: singular covariance, FID biased "
                      f"upward; compare only at equal sample counts (the paper uses 50,000)", file=sys.stderr)
            inputs[k] = inception_statistics(png_batches(paths, batch_size), len(paths), model,
                                             Env(torch.device(device)), f"features of {Path(path).name}")
    if len(inputs[0][0]) != len(inputs[1][0]):
        raise UserError(f"statistics do not match: {len(inputs[0][0])} vs {len(inputs[1][0])} dimensions; compute "
                        f"both with the same feature extractor and dims")
    fid = frechet_distance(*inputs[0], *inputs[1])
    print("FID: ", fid)
    return fid


def images_to_uint8(images):
    """(B, C, H, W) images in [-1, 1] -> (B, H, W, C) uint8, rounded exactly as torchvision.utils.save_image."""
    x = (images.float() * 0.5 + 0.5).mul(255).add(0.5).clamp(0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


def pixel_frechet(images_a, images_b, pool=1):
    """Fréchet distance between raw pixel vectors, average-pooled by pool first: a cheap sanity check, NOT FID."""
    vectors = lambda x: (F.avg_pool2d(x, pool) if pool > 1 else x).flatten(1).numpy()  # (N, C * H/pool * W/pool)
    a, b = vectors(torch.as_tensor(images_a).to(torch.float64)), vectors(torch.as_tensor(images_b).to(torch.float64))
    if a.shape[1] != b.shape[1]:
        raise UserError(f"pixel vectors differ in size ({a.shape[1]} vs {b.shape[1]}); use images of one shape")
    n, dims = min(len(a), len(b)), a.shape[1]
    if n < 10 * dims:
        print(f"warning: pixel Fréchet distance from N={n} < 10 x {dims} dims is dominated by estimation bias; "
              f"use more images or a larger pool", file=sys.stderr)
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def fingerprint(weights) -> str:
    """SHA-256 (16 hex digits) of a model's or state dict's weights, which samples and scores on disk are kept by."""
    h = hashlib.sha256()
    for k, v in sorted((unwrap(weights).state_dict() if isinstance(weights, nn.Module) else weights).items()):
        h.update(k.encode() + v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def named_model(cfg: Config, env: Env, name: str, theta0=None):
    """theta0, baseline, ensemble, merged (the run's models) or the path of a checkpoint."""
    if name == "theta0":
        if theta0 is None and not cfg.pretrained and not run_dir(cfg, "pretrain", "ckpt.pt").exists():
            raise UserError(f"{run_dir(cfg, 'pretrain', 'ckpt.pt')} does not exist: θ0 of this run was never "
                            f"trained; check --out, pass --pretrained, or run `python deme.py train` first")
        return theta0 if theta0 is not None else theta0_model(cfg, env, GaussianDiffusion())
    if name == "ensemble":
        return RangeEnsemble(range_models(cfg))
    paths = {b: run_dir(cfg, b, "ckpt.pt") for b in ("baseline", "baseline_minsnr", "baseline_p2")}
    paths["merged"] = run_dir(cfg, "merge", "merged.pt")
    if name not in paths and not Path(name).exists():
        raise UserError(f"model {name!r} is neither theta0, baseline, ensemble, merged nor a checkpoint file")
    how = "merge" if name == "merged" else "baseline" + (f" --baseline-weighting {name[9:]}" if "_" in name else "")
    path = paths.get(name, Path(name))
    ck = finished_checkpoint(path, f"model {name!r}", f"python deme.py {how}" if name in paths else "its stage")
    return load_model(path, ck=ck).eval()


def sample_shape(model) -> tuple:
    m = unwrap(model)
    m = m.models[0] if isinstance(m, RangeEnsemble) else m
    return m.config["in_channels"], m.config["resolution"], m.config["resolution"]


def sample_batches(cfg: Config, env: Env, diffusion, model, indices, seed, desc="sampling"):
    """(indices, samples (B, C, H, W) in [-1, 1]) per --eval-batch; sample i's noise is fixed by (seed, i)."""
    shape = sample_shape(model)
    model = model.to(env.device).eval()
    with tqdm(total=len(indices), desc=desc, unit="img", leave=False, disable=not env.master) as bar:
        for start in range(0, len(indices), cfg.eval_batch):
            batch = indices[start:start + cfg.eval_batch]
            yield batch, sample_batch(cfg, env, diffusion, model, batch, seed, shape)
            bar.update(len(batch))


def write_samples(cfg: Config, env: Env, diffusion, model, name) -> Path:
    """--n-samples PNGs samples/<name>/{i:06d}.png of `model`, resumable; rank r writes those with i % world == r."""
    from PIL import Image
    folder = run_dir(cfg, "samples", name)
    seed = role_seed(cfg.seed, "samples")
    meta = dict(model=fingerprint(model), sampler=cfg.sampler, steps=cfg.sample_steps, eta=cfg.eta,
                variance=cfg.variance, noise_seed=seed, precision=cfg.eval_precision)
    meta_path = folder.with_suffix(".json")
    if meta_path.exists() and not cfg.overwrite and json.loads(meta_path.read_text()) != meta:
        raise UserError(f"{folder} holds samples of another model or sampler; pass --overwrite to replace them")
    if env.master:  # (atomic_path makes the folders)
        if cfg.overwrite:
            for p in folder.glob("*.png"):
                p.unlink()
        atomic_write_text(json.dumps(meta), meta_path)
    env.barrier()
    todo = [i for i in range(env.rank, cfg.n_samples, env.world) if not (folder / f"{i:06d}.png").exists()]
    for indices, images in sample_batches(cfg, env, diffusion, model, todo, seed, f"sampling {name}"):
        for i, pixels in zip(indices, images_to_uint8(images)):               # (H, W, C) uint8
            with atomic_path(folder / f"{i:06d}.png", sync=False) as tmp:
                Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(tmp, format="PNG")
    env.barrier()
    return folder


def sample_in_memory(cfg: Config, env: Env, diffusion, model, n, seed, rank=0, world=1) -> torch.Tensor:
    """Samples rank, rank + world, ... < n (all n by default) as (k, C, H, W) in [-1, 1]."""
    parts = [x for _, x in sample_batches(cfg, env, diffusion, model, list(range(rank, n, world)), seed)]
    return torch.cat([torch.empty(0, *sample_shape(model)), *parts])


def selection_samples(cfg: Config) -> int:
    return cfg.search_samples or cfg.n_samples


def selection_quality(cfg: Config, env: Env, diffusion, model) -> float:
    """The metric of --search-samples samples (selection noise seed) vs the selection split, by this rank alone."""
    n = selection_samples(cfg)
    samples = sample_in_memory(cfg, env, diffusion, model, n, role_seed(cfg.seed, "select_samples"))
    if eval_metric(cfg) == "pixel":
        real = heldout_images(cfg, n, "select")
        return pixel_frechet(samples, real, pixel_pool(real.shape[-1], real.shape[1], n))
    inception = FIDInception(cfg.inception_weights or None)
    x = torch.from_numpy(images_to_uint8(samples)).permute(0, 3, 1, 2).float() / 255  # as PNGs read back
    alone = dataclasses.replace(env, rank=0, world=1)
    stats = inception_statistics(x.split(cfg.eval_batch), n, inception, alone)
    return frechet_distance(*stats, *reference_stats(cfg, alone, inception, "select"))


def choose_merge_weights(cfg: Config, env: Env, diffusion, backbone, base, finetuned) -> Optional[dict]:
    """Rank 0's merge search (others: None) on held-out loss, then ranked by selection_quality; every score cached."""
    samples = cfg.search_objective == "samples"
    if samples and eval_metric(cfg) == "fid":  # the selection split's statistics first, shared by all ranks
        reference_stats(cfg, env, FIDInception(cfg.inception_weights or None), "select")
    if not env.master:
        env.barrier()
        return None
    (images, cond), seed, n = backbone.selection(), role_seed(cfg.seed, "select"), cfg.n_ranges
    k, sample_seed = selection_samples(cfg), role_seed(cfg.seed, "select_samples")
    source = split_description(cfg, "select")
    cache = run_dir(cfg, "merge", "search_cache.json")
    scored_with = dict(method=cfg.merge_method, options=merge_options(cfg), images=len(images), split="select",
                       seed=seed, ranges=[fingerprint(sd) for sd in finetuned], samples=dict(
                           n=k, sampler=cfg.sampler, steps=cfg.sample_steps, eta=cfg.eta, metric=eval_metric(cfg),
                           precision=cfg.eval_precision) if samples else None)
    saved = json.loads(cache.read_text()) if cache.exists() and not cfg.overwrite else {}
    values = saved.get("values", {}) if saved.get("scored_with") == scored_with else {}  # others' are never reused
    model = backbone.build(base).to(env.device)

    def cached(kind, w, compute):  # candidate w's score of that kind, computed once and kept in search_cache.json
        key = kind + json.dumps([round(x, 6) for x in w])
        if key not in values:
            values[key] = compute()
            atomic_write_text(json.dumps(dict(scored_with=scored_with, values=values)), cache)
        return values[key]

    def merged(w):
        model.load_state_dict(merge(base, finetuned, list(w), cfg.merge_method, **merge_options(cfg)))
        return model

    def losses(w):  # [mean, per range] held-out loss of θ0 + Σ w_i τ_i on the selection split
        return cached("loss", w, lambda: list(heldout_loss(merged(w), diffusion, images, env, n, seed,
                                                             backbone.batch, cond)))

    theta0_per_range = losses((0.0,) * n)[1]
    objective = "loss" if samples else cfg.search_objective
    search = search_merge_weights(lambda w: search_score(*losses(w), theta0_per_range, objective), n,
                                  max_evals=cfg.search_evals, progress=env.master)
    for point in search["path"]:
        point["loss"], point["loss_per_range"] = losses(point["w"])
    what = dict(loss="held-out loss", per_range="each range's held-out loss relative to θ0's, averaged over the "
                "ranges", samples=f"sample metric of {k} samples (noise seed {sample_seed}) against selection "
                "images, among candidates from the held-out loss")[cfg.search_objective]
    search.update(objective=f"{what}; {len(images)} selection images ({source}), t stratified over [0, "
                            f"{diffusion.T}), noise seed {seed}", objective_name=cfg.search_objective,
                  images=len(images), source=source, noise_seed=seed)
    if samples:
        scored = [dict(w=w, score=cached("samples", w, lambda: selection_quality(cfg, env, diffusion, merged(w))))
                  for w in tqdm(sample_candidates(search["path"], n, cfg.search_candidates), desc="candidates")]
        search.update(samples=sorted(scored, key=lambda c: c["score"]), search_samples=k,
                      samples_noise_seed=sample_seed)
        search["weights"] = search["samples"][0]["w"]
    search["chosen"] = dict(zip(("loss", "loss_per_range"), losses(search["weights"])),
                            theta0_loss_per_range=theta0_per_range)
    return search


def eval_metric(cfg: Config) -> str:
    return cfg.metric if cfg.metric != "auto" else ("pixel" if cfg.dataset == "synthetic" else "fid")


def pixel_pool(res, channels, n) -> int:
    """The smallest average-pool factor (a power of 2) that leaves at least 10 samples per pixel dimension."""
    return next(p for p in (2 ** k for k in itertools.count()) if channels * (res // p) ** 2 * 10 <= n or res // p <= 1)


def check_pixel_reference(size, n):
    if size < 2 * n:
        raise UserError(f"the training split has {size} images, fewer than 2 x {n} for the pixel Fréchet distance "
                        f"and its real-vs-real floor; lower --n-samples")


def reference_stats(cfg: Config, env: Env, inception, split="eval"):
    """FID statistics of the training set (--fid-stats, else computed once and cached) or of split "select"."""
    if cfg.fid_stats and split == "eval":
        return load_stats(cfg.fid_stats)
    cache = run_dir(cfg, f"fid_stats_{cfg.dataset}" + ("_select" if split == "select" else "") + ".npz")
    if cache.exists():
        return load_stats(cache)
    ds = make_dataset(cfg, split)
    mine = torch.utils.data.Subset(ds, range(env.rank, len(ds), env.world))  # every rank a share (LSUN: 3M images)
    loader = torch.utils.data.DataLoader(mine, batch_size=cfg.eval_batch, num_workers=cfg.workers)
    as_read_back = (torch.from_numpy(images_to_uint8(x)).permute(0, 3, 1, 2).float() / 255 for x in loader)  # as PNGs
    mu, sigma = inception_statistics(as_read_back, len(ds), inception, env, f"FID statistics of the {split} split")
    if env.master:
        save_stats(cache, mu, sigma)
    env.barrier()
    return mu, sigma


def split_description(cfg: Config, role) -> str:
    if cfg.dataset == "synthetic":
        return f"synthetic images of seed {SYNTHETIC_SEEDS[role]}"
    if cfg.dataset == "cifar10":
        return {"train": "the CIFAR-10 training split", "select": "CIFAR-10 test images 0-4999",
                "report": "CIFAR-10 test images 5000-9999"}[role]
    share = 1 - cfg.heldout_fraction if role == "train" else cfg.heldout_fraction / 2
    return f"the {role} split of {cfg.data_dir}: {share:.0%} of its images, by a hash of each path"


def evaluation_protocol(cfg: Config, metric: str) -> dict:
    """Which images and noise seeds each role used: training, selection (from merge/search.json), reporting."""
    path = run_dir(cfg, "merge", "search.json")
    record = json.loads(path.read_text()) if path.exists() else {}
    search = record.get("search") or {}
    return dict(
        train=split_description(cfg, "train"),
        select=(dict(images=search["images"], source=search["source"], noise_seed=search["noise_seed"],
                     objective=search["objective_name"], weights=record["weights"])
                if "noise_seed" in search else f"none: weights {record.get('weights')} given or averaged"),
        select_samples=(dict(samples=search["search_samples"], noise_seed=search["samples_noise_seed"],
                             candidates=len(search["samples"])) if "samples" in search else "off"),
        report_loss=dict(images=cfg.report_images, source=split_description(cfg, "report"),
                         noise_seed=role_seed(cfg.seed, "report")),
        report_samples=dict(samples=cfg.n_samples, noise_seed=role_seed(cfg.seed, "samples"),
                            reference="training-set FID statistics" if metric == "fid" else
                            "real images (synthetic: other seeds; else training images)",
                            precision=cfg.eval_precision))


def evaluation_reference(cfg: Config, env: Env) -> dict:
    """What models are compared with: report split, noise seeds, and FID statistics or real images and their floor."""
    ref = dict(metric=eval_metric(cfg), floor=None, pool=None, heldout=heldout_images(cfg, cfg.report_images, "report"),
               loss_seed=role_seed(cfg.seed, "report"), sample_seed=role_seed(cfg.seed, "samples"))
    if ref["metric"] == "fid":
        ref["inception"] = FIDInception(cfg.inception_weights or None)
        ref["stats"] = reference_stats(cfg, env, ref["inception"])  # sharded over the ranks, then cached
        return ref
    n = cfg.n_samples
    if cfg.dataset == "synthetic":
        real, other = (synthetic_images(n, cfg.image_size or PRESETS[cfg.preset]["resolution"], seed=s)
                       for s in SYNTHETIC_SEEDS["real"])
    else:  # 2 n training images (preflight's check_pixel_reference)
        ds = make_dataset(cfg, "eval")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))
        real, other = torch.stack([ds[int(i)] for i in idx[:2 * n]]).split(n)
    ref.update(real=real, pool=pixel_pool(real.shape[-1], real.shape[1], n))
    ref["floor"] = pixel_frechet(other, real, ref["pool"]) if env.master else None
    return ref


def evaluate_model(cfg: Config, env: Env, diffusion, model, name, ref: dict) -> tuple:
    """(results row, first 64 samples) of one model; kept in evaluations/ under its weights and protocol."""
    protocol = dict(metric=ref["metric"], n=cfg.n_samples, sampler=cfg.sampler, steps=cfg.sample_steps, eta=cfg.eta,
                    variance=cfg.variance, precision=cfg.eval_precision, report=cfg.report_images,
                    seeds=[ref["loss_seed"], ref["sample_seed"]], ranges=cfg.n_ranges, dataset=cfg.dataset,
                    data=cfg.data_dir if cfg.dataset != "synthetic" else "", fid_stats=cfg.fid_stats)
    key = hashlib.sha256(json.dumps([fingerprint(model), protocol]).encode()).hexdigest()[:16]
    path = run_dir(cfg, "evaluations", f"{key}.pt")
    kept = load_checkpoint(path) if path.exists() and not cfg.overwrite else None
    env.barrier()  # every rank has looked before rank 0 could write anything new
    if kept:
        return dict(kept["row"], model=name), kept["grid"].float() / 127.5 - 1
    start = time.perf_counter()
    if ref["metric"] == "pixel":  # rank r makes samples r, r + world, ...; all are gathered on every rank
        part = sample_in_memory(cfg, env, diffusion, model, cfg.n_samples, ref["sample_seed"], env.rank, env.world)
        parts = [part] * env.world
        if env.world > 1:
            torch.distributed.all_gather_object(parts, part)
        samples = part.new_empty((cfg.n_samples, *part.shape[1:]))
        for r, p in enumerate(parts):
            samples[r::env.world] = p
        value = pixel_frechet(samples, ref["real"], ref["pool"]) if env.master else None
        grid = samples[:64]
    else:
        folder = write_samples(cfg, env, diffusion, model, "".join(c if c.isalnum() or c in "._-" else "_"
                                                                   for c in name))  # ablation rows have spaces
        paths = [folder / f"{i:06d}.png" for i in range(cfg.n_samples)]  # exactly these, whatever else is there
        stats = inception_statistics(png_batches(paths[env.rank::env.world], cfg.eval_batch), len(paths),
                                     ref["inception"], env, f"FID features of {name}")
        value = frechet_distance(*stats, *ref["stats"])
        grid = next(png_batches(paths[:64], 64)) * 2 - 1
    seconds = time.perf_counter() - start
    loss, per_range = heldout_loss(model.to(env.device), diffusion, ref["heldout"], env, cfg.n_ranges, ref["loss_seed"])
    row = dict(model=name, value=value, heldout_loss=loss, heldout_loss_per_range=per_range,
               params=sum(p.numel() for p in model.parameters()), sample_seconds=seconds)
    if env.master:
        grid8 = ((grid.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        atomic_save(dict(row=row, grid=grid8, protocol=protocol), path)
    return row, grid


def markdown_table(head, rows) -> str:
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def results_markdown(results, cfg: Config) -> str:
    head = ["model", results["metric"].split(",")[0], "held-out loss",
            *[f"loss t∈[{a},{b})" for a, b in timestep_ranges(cfg.n_ranges)], "parameters"]  # timings: JSON only
    lines = [f"Sampler: {results['sampler']}; {results['metric']}; seed {results['seed']}."]
    if results["real_vs_real"] is not None:
        lines[0] += (f" Real vs real at the same N: {results['real_vs_real']:.4f} (pixels average-pooled "
                     f"{results['pixel_pool']}x{results['pixel_pool']}).")
    p = results["protocol"]
    sel = ("merge weights {weights} selected on {images} images ({source}; noise seed {noise_seed}; objective "
           "{objective})".format(**p["select"]) if isinstance(p["select"], dict) else f"merge weights: {p['select']}")
    if isinstance(p["select_samples"], dict):
        sel += ", ranked among {candidates} candidates by {samples} samples of noise seed {noise_seed}".format(
            **p["select_samples"])
    lines += ["", f"Protocol: trained on {p['train']}; {sel}; held-out loss on {p['report_loss']['images']} other "
              f"images ({p['report_loss']['source']}; noise seed {p['report_loss']['noise_seed']}); samples from noise "
              f"seed {p['report_samples']['noise_seed']}, which no selection step used; evaluation in "
              f"{p['report_samples']['precision']}."]
    rows = [[r["model"], f"{r['value']:.4f}", f"{r['heldout_loss']:.5f}",
             *[f"{v:.5f}" for v in r["heldout_loss_per_range"]], f"{r['params']:,}"] for r in results["rows"]]
    return "\n".join(lines + ["", markdown_table(head, rows)])


def seed_summary(rows_by_seed: dict) -> dict:
    """Each model's {mean, min, max, values} over seeds of its results, and of its differences to θ0's on each seed."""
    def spread(v):
        return dict(mean=float(np.mean(v)), min=float(np.min(v)), max=float(np.max(v)), values=[float(x) for x in v])
    by_model = [{r["model"]: r for r in seed_rows} for seed_rows in rows_by_seed.values()]
    cols = {n: [np.array([s[n][k] for s in by_model]) for k in ("value", "heldout_loss", "heldout_loss_per_range")]
            for n in by_model[0]}                                           # (seeds,), (seeds,), (seeds, ranges)
    base = next((cols[n] for n in ("theta0", "θ0") if n in cols), None)
    summary = {}
    for name, (value, loss, per_range) in cols.items():
        summary[name] = dict(value=spread(value), heldout_loss=spread(loss),
                             heldout_loss_per_range=[spread(c) for c in per_range.T])
        if base is not None:  # the same spreads of the differences to θ0's row, the losses' in %
            loss_pct, per_range_pct = 100 * (loss / base[1] - 1), 100 * (per_range / base[2] - 1)
            summary[name].update(value_vs_theta0=spread(value - base[0]), loss_vs_theta0_pct=spread(loss_pct),
                                 loss_per_range_vs_theta0_pct=[spread(c) for c in per_range_pct.T])
    return summary


def write_seed_summary(cfg: Config, rows_by_seed: dict, name="seeds", note=""):
    """{name}.json, .md and .png (bars, min-max whiskers): the spread over seeds, and the paired differences to θ0."""
    summary, seeds, ranges = seed_summary(rows_by_seed), list(rows_by_seed), timestep_ranges(cfg.n_ranges)
    names, plain = list(summary), ("value", "heldout_loss", "heldout_loss_per_range")
    vs_theta0 = ("value_vs_theta0", "loss_vs_theta0_pct", "loss_per_range_vs_theta0_pct")
    paired = vs_theta0[1] in summary[names[0]]  # the differences to θ0 on the same seed: its noise drops out
    keys = vs_theta0 if paired else plain
    short = "pixel Fréchet distance (not FID)" if eval_metric(cfg) == "pixel" else "FID"
    metric = f"{short}, {cfg.n_samples} samples"
    cell = lambda d, f: f"{d['mean']:{f}} [{d['min']:{f}}, {d['max']:{f}}]"
    losses = [f"loss t∈[{a},{b})" for a, b in ranges]

    def table(keys, f, g, head):  # a row per model: the sample metric (format f), the losses (format g)
        return markdown_table(head, [[m, cell(d[keys[0]], f), cell(d[keys[1]], g), *[cell(r, g) for r in d[keys[2]]]]
                                     for m, d in summary.items()])
    text = (f"Mean [min, max] over seeds {', '.join(map(str, seeds))} ({metric}; held-out loss on the report split; "
            f"each seed's own noise). {note}".rstrip() + "\n\n" +
            table(plain, ".4f", ".5f", ["model", short, "held-out loss", *losses]))
    if paired:
        text += ("\nPaired with θ0, seed by seed (the same report images and noise): mean [min, max] of the model's "
                 "difference to θ0; a model beats θ0 beyond the seed spread where the whole interval is below 0.\n\n"
                 + table(vs_theta0, "+.4f", "+.2f", ["model", "Δ " + short, "Δ held-out loss (%)",
                                                     *[f"Δ {x} (%)" for x in losses]]))
    atomic_write_text(json.dumps(dict(seeds=seeds, metric=metric, note=note, models=summary), indent=2),
                      run_dir(cfg, f"{name}.json"))
    atomic_write_text(text, run_dir(cfg, f"{name}.md"))
    print("\n" + text)

    def draw(fig):  # bars: the means; whiskers: min to max; per range (where finetuning gained or lost) when paired
        axes = fig.subplot_mosaic([["value", "loss"]] + ([["range", "range"]] if paired else []))
        delta = "Δ vs θ0: " if paired else ""
        panels = [("value", [""], delta + short), ("loss", [""], delta + "held-out loss" + " (%)" * paired),
                  ("range", [f"t ∈ [{a}, {b})" for a, b in ranges], "Δ held-out loss vs θ0, same seed (%)")]
        for key, (panel, groups, label) in zip(keys, panels[:len(axes)]):
            cells = [summary[m][key] if panel == "range" else [summary[m][key]] for m in names]
            mean, low, high = (np.array([[c[s] for c in cs] for cs in cells]) for s in ("mean", "min", "max"))
            _bars(axes[panel], mean, groups, names, label, np.stack([mean - low, high - mean]))  # (models, groups)
        fig.suptitle(f"Mean and min-max over seeds {', '.join(map(str, seeds))} (report split)")
    try:
        _plot(run_dir(cfg, f"{name}.png"), (5 + 1.2 * len(names), 8 if paired else 4), draw)
    except UserError as e:
        print(f"warning: no {name}.png ({e})", file=sys.stderr)


def side_by_side(grids: dict, path):
    """One image: each model's first 64 samples as an 8x8 grid under its name, left to right."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid
    tiles = [make_grid(x.float() * 0.5 + 0.5, nrow=8, padding=1, pad_value=1.0).clamp(0, 1) for x in grids.values()]
    s = max(1, 256 // tiles[0].shape[-1])  # an integer upscale of small images, towards 256 pixels wide
    tiles = [F.pad(t.repeat_interleave(s, 1).repeat_interleave(s, 2), (0, 8, 18, 0), value=1.0) for t in tiles]
    out = Image.fromarray(torch.cat(tiles, 2)[:, :, :-8].mul(255).round().byte().permute(1, 2, 0).numpy())
    for k, name in enumerate(grids):  # a title above each grid, on the 18 white rows
        ImageDraw.Draw(out).text((4 + k * tiles[0].shape[-1], 3), name, fill="black")
    with atomic_path(path) as tmp:
        out.save(tmp)


# --- II.6 The paper's figures: gradient conflict (Fig. 1a), merge landscape (Fig. 6a), task vectors (Fig. 6b) ---

def loss_gradients(model, diffusion, images, timesteps, env: Env, batch=64, seed=0) -> torch.Tensor:
    """(K, P): ∇_θ of DDPM's loss on `images` at timesteps[k] (one or one per image), the same noise at every k."""
    params, n = list(model.to(env.device).eval().requires_grad_(True).parameters()), len(images)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.zeros(len(timesteps), sum(p.numel() for p in params), device=env.device)  # (K, P)
    for k, t in enumerate(tqdm(timesteps, desc="loss gradients", leave=False, disable=not env.master)):
        for s in range(0, n, batch):
            x0, eps, tb = (v[s:s + batch].to(env.device) for v in (images, noise, torch.as_tensor(t).expand(n)))
            loss = training_loss(model, None, diffusion, x0, tb, eps) * (len(x0) / n)  # this batch's share
            grads[k] += torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, materialize_grads=True)])
    return grads


def cosines(vectors) -> np.ndarray:
    gram = (vectors.double() @ vectors.double().T).cpu().numpy()
    norm = np.sqrt(np.diag(gram))
    if not (norm > 0).all():
        raise UserError(f"vector {int(np.argmin(norm))} is zero: its cosine is undefined; is the model trainable?")
    return np.clip((gram + gram.T) / 2 / np.outer(norm, norm), -1.0, 1.0)


def gradient_conflict(model, diffusion, images, timesteps, env: Env, batch=64, seed=0) -> np.ndarray:
    """DeMe Fig. 1a: the (K, K) matrix cos(g_a, g_b), g_t = ∇_θ of DDPM's simple loss at the fixed timestep t."""
    return cosines(loss_gradients(model, diffusion, images, timesteps, env, batch, seed))


def range_gradients(model, diffusion, images, env: Env, n_ranges, batch=64, seed=0) -> torch.Tensor:
    """(2, N, P): per half of `images` (the halves show sampling noise), g_j = ∇_θ of range j's held-out loss."""
    n = len(images)
    u = (torch.arange(n) + 0.5)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))] / n  # (n,) in (0, 1)
    ts = [lo + (u * (hi - lo)).long() for lo, hi in timestep_ranges(n_ranges, diffusion.T)]
    return torch.stack([loss_gradients(model, diffusion, images[h], [t[h] for t in ts], env, batch, seed + k)
                        for k, h in enumerate((slice(0, n // 2), slice(n // 2, n)))])


def stationarity(grads) -> dict:
    """Do the g_j (N, P) cancel (θ0 stationary)? ratio ‖Σ_j g_j‖ / (Σ_j ‖g_j‖²)^½: 0 cancel, 1 unrelated, √N aligned."""
    norms, total = grads.double().norm(dim=1), grads.double().sum(0).norm()
    return dict(norms=norms.tolist(), sum_norm=total.item(), ratio=(total / norms.square().sum().sqrt()).item(),
                cos=cosines(grads))


def interference(per_range_loss, base_sd, finetuned_sds, scales=(0.5, 1.0, 1.5)) -> np.ndarray:
    """(N, S, N): 100 (L_j(θ0 + s τ_i) / L_j(θ0) - 1), range j's held-out loss change (%) under range i's τ alone."""
    base = np.array(per_range_loss(base_sd))
    return np.array([[100 * (np.array(per_range_loss(merge(base_sd, [sd], [s]))) / base - 1) for s in scales]
                     for sd in finetuned_sds])


def partial_ensembles(theta0, models) -> list:
    """DeMe's ensemble (Eq. 7) with model i on range i alone and θ0 on the rest: which range carries the gain."""
    return [RangeEnsemble([m if j == i else theta0 for j, m in enumerate(models)]) for i in range(len(models))]


def merge_landscape(base_sd, finetuned_sds, i, j, objective_fn, grid) -> np.ndarray:
    """DeMe Fig. 6a: L[p, q] = objective_fn(θ0 + grid[p] τ_i + grid[q] τ_j), Eq. 8 on the plane of two task vectors."""
    points = tqdm(list(itertools.product(grid, repeat=2)), desc="merge landscape", leave=False)  # (w_i, w_j), by rows
    values = [float(objective_fn(merge(base_sd, [finetuned_sds[i], finetuned_sds[j]], w))) for w in points]
    return np.reshape(values, (len(grid), len(grid)))


def task_vector_norms(base_sd, finetuned_sds) -> dict:
    """DeMe Fig. 6b: layers (L), norms (N, L) and total (N,) of τ_i = θ_i - θ0, base (L,) the norms of θ0's layers."""
    def layer_name(key):  # temb, conv_in, down.i, mid, up.i, out, projections (DeMe's), or another model's first name
        parts = key.split(".")
        name = ".".join(parts[:2] if len(parts) > 2 and parts[1].isdigit() else parts[:1])  # down.0, up.2, mid
        return "projections" if parts[-2:-1] == ["proj"] else "out" if parts[0] in ("norm_out", "conv_out") else name

    taus = task_vectors(base_sd, finetuned_sds)
    layer = {key: layer_name(key) for key in taus[0]}
    names = list(dict.fromkeys(layer.values()))
    ups = iter(sorted((n for n in names if n.startswith("up.")), key=lambda n: -int(n.split(".")[1])))
    names = [next(ups) if n.startswith("up.") else n for n in names]  # forward order: up.0 is the full resolution
    layers = [n for n in names if n != "projections"] + ["projections"] * ("projections" in names)
    norms = lambda sd: np.sqrt([sum(sd[k].double().pow(2).sum().item() for k in layer if layer[k] == name)
                                for name in layers])
    total = np.array([torch.stack([v.double().norm() for v in tau.values()]).norm().item() for tau in taus])
    return dict(layers=layers, norms=np.array([norms(tau) for tau in taus]), total=total, base=norms(base_sd))


def _plot(path, size, draw) -> Path:
    try:  # `import matplotlib.x` also looks matplotlib itself up, even when matplotlib.x was imported before
        import matplotlib.figure
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib (the numbers are in the CSV)") from None
    fig = matplotlib.figure.Figure(figsize=size, layout="constrained")
    draw(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp)  # a PNG (tmp keeps the suffix), drawn by Agg
    return Path(path)


def _heatmap(ax, values, xlabels, ylabels, label, limit=1.0, title="", **settings):
    im = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower", aspect="auto")
    step = max(1, len(xlabels) // 20)
    ax.set_xticks(range(0, len(xlabels), step), xlabels[::step], rotation=90 if len(xlabels) > 6 else 0)
    ax.set_yticks(range(0, len(ylabels), step), ylabels[::step])
    ax.figure.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    ax.set(**settings)


def _bars(ax, values, groups, series, ylabel, err=None, title=""):
    """Grouped bars: values (len(series), len(groups)), optional (2, ...) min-max whiskers, one colour per series."""
    width = 0.8 / len(series)
    for k, name in enumerate(series):
        ax.bar(np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width, values[k], width, label=name,
               yerr=None if err is None else err[:, k], capsize=3, color=f"C{k % 10}")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=30 if len(groups) > 4 else 0, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)


def plot_curve(csv_path) -> Path:
    """heldout_curve.png beside the CSV: θ0's held-out loss over pretraining, overall and per range (÷ its last)."""
    curve = np.atleast_1d(np.genfromtxt(csv_path, delimiter=",", names=True))

    def draw(fig):
        left, right = fig.subplots(1, 2)
        left.plot(curve["step"], curve["heldout_loss"], marker="o", ms=3)
        left.set(xlabel="pretraining step", ylabel="held-out loss (selection images)", title="θ0's EMA weights")
        for name in curve.dtype.names[2:]:  # a flat line: a range that has stopped improving
            right.plot(curve["step"], curve[name] / curve[name][-1], marker="o", ms=3, label=name.replace("loss_", ""))
        right.set(xlabel="pretraining step", ylabel="loss / its final value", title="per timestep range")
        right.legend(fontsize=8)
    return _plot(Path(csv_path).with_suffix(".png"), (10, 4), draw)


def _write(a, name, summary, header, rows, size, draw) -> Path:
    print(summary)
    fmt = lambda v: f"{v:.8g}" if isinstance(v, (float, np.floating)) else str(v)
    atomic_write_text("".join(",".join(map(fmt, row)) + "\n" for row in [header, *rows]), a.folder / f"{name}.csv")
    return _plot(a.folder / f"{name}.png", size, draw)


def analyze_conflict(a) -> Path:
    """DeMe Fig. 1a for θ0: gradient_conflict.csv (the K x K cosines) and .png (a heatmap from -1 to 1)."""
    K, T = a.cfg.conflict_timesteps, a.diffusion.T
    ts = [int((i + 0.5) * T / K) for i in range(K)]  # the centres of K equal bins of [0, T)
    cos = gradient_conflict(a.theta0, a.diffusion, a.images, ts, a.env, a.batch, a.cfg.seed)
    far = np.abs(np.subtract.outer(ts, ts)) >= T // 2
    i, j = np.unravel_index(np.argmin(cos), cos.shape)
    draw = lambda fig: _heatmap(fig.add_subplot(), cos, ts, ts, "cos(∇θ L_t, ∇θ L_t′), L_t: DDPM loss at t",
                                xlabel="timestep t", ylabel="timestep t", title="Gradient conflict between timesteps "
                                f"(DeMe Fig. 1a)\nθ0 = {a.cfg.pretrained or 'pretrain/ckpt.pt'}, {len(a.images)} "
                                "held-out images, same noise at every t")
    return _write(a, "gradient_conflict", f"gradient conflict of θ0 ({len(a.images)} held-out images, {len(ts)} "
                  f"timesteps): mean cos of neighbours {np.diag(cos, 1).mean():.3f}, of timesteps >= {T // 2} apart "
                  f"{cos[far].mean():.3f}, min {cos.min():.3f} at t = {ts[i]}, {ts[j]}",
                  ["t", *ts], ([t, *r] for t, r in zip(ts, cos)), (6.4, 5.4), draw)


def analyze_landscape(a) -> Path:
    """DeMe Fig. 6a: merge_landscape.csv (w_i, w_j, held-out loss), .png (contours; θ0, θ_i, θ_j, minimum, merge)."""
    # the merge search's box [0, 1.5] and a little past θ0, with 0 and 1 among the default 15 points
    (i, j), grid = a.pair, tuple(round(float(v), 6) for v in np.linspace(-0.25, 1.5, a.cfg.landscape_points))
    values = merge_landscape(a.base, a.finetuned, i, j, lambda sd: a.losses(sd)[0], grid)
    p, q = np.unravel_index(np.argmin(values), values.shape)
    corners = "".join(f"{name} {values[grid.index(x), grid.index(y)]:.5f}, " for name, x, y in
                      (("θ0", 0.0, 0.0), (f"range {i}", 1.0, 0.0), (f"range {j}", 0.0, 1.0)) if {x, y} <= set(grid))
    record = json.loads(path.read_text()) if (path := run_dir(a.cfg, "merge", "search.json")).exists() else {}
    w = record.get("weights") if record.get("method") in ("task_arithmetic", "average") else None

    def draw(fig):
        ax = fig.add_subplot()
        fig.colorbar(ax.contourf(grid, grid, values.T, levels=21, cmap="viridis_r"), ax=ax,
                     label="held-out denoising loss", format="%.4g")
        ax.plot(0, 0, "o", ms=8, mfc="white", mec="black", label="θ0 (pretrained)")
        ax.plot([1, 0], [0, 1], "^", ms=8, mfc="white", mec="black", label=f"finetuned: range {i}, range {j}")
        ax.plot(grid[p], grid[q], "X", ms=9, mfc="red", mec="white", label=f"grid minimum ({grid[p]:g}, {grid[q]:g})")
        if w and len(w) == a.cfg.n_ranges:
            ax.plot(w[i], w[j], "*", ms=14, mfc="gold", mec="black", label="the run's merge (other weights off-plane)")
        ax.set(xlabel=f"a: weight of τ of {a.names[i]}", ylabel=f"b: weight of τ of {a.names[j]}",
               title=f"Merge landscape (DeMe Fig. 6a)\nθ0 + a·τ(range {i}) + b·τ(range {j})")
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return _write(a, "merge_landscape", f"merge landscape of ranges {i}, {j} (held-out loss): {corners}minimum "
                  f"{values[p, q]:.5f} at ({grid[p]:g}, {grid[q]:g})", [f"w_range{i}", f"w_range{j}", "heldout_loss"],
                  ([x, y, v] for (x, y), v in zip(itertools.product(grid, repeat=2), values.flat)), (6.8, 6.6), draw)


def analyze_norms(a) -> Path:
    """DeMe Fig. 6b: task_vector_norms.csv (per layer: ||θ0||, ||τ_i||; last row the totals) and .png (bars)."""
    norms, n = task_vector_norms(a.base, a.finetuned), a.cfg.n_ranges
    rows = [[name, norms["base"][c], *norms["norms"][:, c]] for c, name in enumerate(norms["layers"])]
    rows.append(["total", float(np.sqrt((norms["base"] ** 2).sum())), *norms["total"]])

    def draw(fig):
        ax, total = fig.subplots(1, 2, width_ratios=[5, 1])
        _bars(ax, norms["norms"], norms["layers"], a.names, "||τ|| of the layer's weights (L2)",
              title="Task-vector norm τ = θ_range − θ0 per layer and timestep range (DeMe Fig. 6b)")
        _bars(total, norms["total"][None], [str(r) for r in range(n)], ["all weights"], "||τ|| of all weights (L2)",
              title="total per range")
    return _write(a, "task_vector_norms", "task-vector norms ||θ_range - θ0||: " + ", ".join(
        f"range {r} {v:.4f}" for r, v in enumerate(norms["total"])), ["layer", "theta0"] +
        [f"tau_range{r}" for r in range(n)], rows, (11, 4.6), draw)


def analyze_stationarity(a) -> Path:
    halves = range_gradients(a.theta0, a.diffusion, a.images, a.env, a.cfg.n_ranges, a.batch,
                             role_seed(a.cfg.seed, "select"))  # (2, N, P)
    st, n, g = stationarity(halves.sum(0)), a.cfg.n_ranges, [f"g_{j}" for j in range(a.cfg.n_ranges)]
    agree = [F.cosine_similarity(u, v, dim=0).item() for u, v in [*zip(*halves), (halves[0].sum(0), halves[1].sum(0))]]
    rows = [[a.names[j], st["norms"][j], agree[j], *st["cos"][j]] for j in range(n)]

    def draw(fig):
        left, right = fig.subplots(1, 2)
        _bars(left, np.array([st["norms"] + [st["sum_norm"]]]), g + ["Σ_j g_j"], ["norm"],
              "gradient norm of the held-out loss at θ0",
              title=f"‖Σ_j g_j‖ / (Σ_j ‖g_j‖²)^½ = {st['ratio']:.2f} (0: stationary, 1: unrelated)")
        _heatmap(right, st["cos"], g, a.names, "cosine", title="cosines between the ranges' gradients")
        fig.suptitle("Is θ0 stationary? Per-range gradients of the held-out loss (selection images)")
    return _write(a, "stationarity", f"stationarity of θ0 ({len(a.images)} selection images): ‖g_j‖ "
                  f"{', '.join(f'{v:.4g}' for v in st['norms'])}, ‖Σ_j g_j‖ {st['sum_norm']:.4g}, ratio "
                  f"{st['ratio']:.3f}; cos between the two halves of the images: "
                  f"{', '.join(f'{v:.2f}' for v in agree[:-1])} (g_j), {agree[-1]:.2f} (Σ_j g_j)",
                  ["gradient", "norm", "cos_between_halves", *[f"cos_range{j}" for j in range(n)]],
                  rows + [["sum over ranges", st["sum_norm"], agree[-1]] + [""] * n], (11, 4.4), draw)


def analyze_seeds(a) -> Path:
    """Each range's τ across seeds: seed_agreement.csv (‖τ_i‖ per seed, cos between seeds, cos with each τ_j), .png."""
    flat = torch.stack([torch.stack([torch.cat([v.double().flatten() for v in tau.values()]) for tau in
                                     task_vectors(a.base, sds)]) for sds in a.by_seed])  # (S, N, P)
    cos = np.array([cosines(flat[:, i])[np.triu_indices(len(flat), 1)] for i in range(flat.shape[1])]).T  # (pairs, N)
    ranges, seeds, n = np.mean([cosines(t) for t in flat], 0), seed_list(a.cfg), a.cfg.n_ranges  # (N, N) over seeds
    pairs, mean, taus = list(itertools.combinations(seeds, 2)), cos.mean(0), [f"τ_{i}" for i in range(n)]

    def draw(fig):
        left, right = fig.subplots(1, 2)
        _bars(left, mean[None], a.names, ["mean"], f"cos(τ_i of one seed, τ_i of another): mean, min-max of "
              f"{len(pairs)} pairs", np.stack([mean - cos.min(0), cos.max(0) - mean])[:, None],
              title="Do seeds agree on each range's task vector?")
        _heatmap(right, ranges, taus, taus, "cosine", title="cos(τ_i, τ_j) of one seed, mean over seeds")
    return _write(a, "seed_agreement", "task vectors across seeds, cos(τ_i, τ_i') per range (mean over pairs): " +
                  ", ".join(f"range {i} {v:.3f}" for i, v in enumerate(mean)),
                  ["range", *[f"norm_seed{s}" for s in seeds], *[f"cos_seeds_{s}-{t}" for s, t in pairs],
                   *[f"cos_with_range{j}" for j in range(n)]],
                  ([a.names[i], *flat[:, i].norm(dim=1).numpy(), *cos[:, i], *ranges[i]] for i in range(n)),
                  (11, 4.4), draw)


def analyze_interference(a) -> Path:
    scales, n = (0.5, 1.0, 1.5), a.cfg.n_ranges
    change = interference(lambda sd: a.losses(sd)[1], a.base, a.finetuned, scales)

    def draw(fig):
        for k, (ax, s) in enumerate(zip(fig.subplots(1, len(scales), squeeze=False)[0], scales)):
            _heatmap(ax, change[:, k], [f"L_{j}" for j in range(n)], [f"θ0 + {s:g} τ_{i}" for i in range(n)],
                     "change vs θ0 (%)", max(1e-9, float(np.abs(change).max())),
                     xlabel="held-out loss of range j (selection images)")
        fig.suptitle("Interference: each range's loss when one task vector is added to θ0")
    return _write(a, "interference", "interference, θ0 + τ_i (rows) on each range's held-out loss, % vs θ0:\n" +
                  "\n".join(f"  τ_{i}: " + " ".join(f"{v:+.2f}" for v in change[i, 1]) for i in range(n)),
                  ["task_vector", "scale", *[f"dloss_range{j}_pct" for j in range(n)]],
                  ([i, s, *change[i, k]] for i in range(n) for k, s in enumerate(scales)),
                  (4.6 * len(scales) + 1, 4.2), draw)


def analyze_partial(a) -> Path:
    models = [build_model(a.theta0.config, sd).eval() for sd in a.finetuned]
    parts = {f"range {i} alone": m for i, m in enumerate(partial_ensembles(a.theta0, models))}
    named = {"theta0": a.theta0, **parts, "ensemble": RangeEnsemble(models)}
    values = {name: selection_quality(a.cfg, a.env, a.diffusion, m) for name, m in tqdm(named.items(), desc="partial")}
    base, names = values["theta0"], list(values)[1:]
    metric = f"{'FID' if eval_metric(a.cfg) == 'fid' else 'pixel Fréchet distance'}, {selection_samples(a.cfg)} samples"
    draw = lambda fig: _bars(fig.add_subplot(), np.array([[values[k] - base for k in names]]), names, [metric],
                             f"{metric} minus θ0's", title="Where the ensemble's gain comes from: θ0 with one "
                             "range's model (selection samples)")
    return _write(a, "partial_ensembles", "partial ensembles, sample metric vs θ0 (selection samples): " +
                  ", ".join(f"{k} {values[k] - base:+.4f}" for k in names), ["model", "value", "vs_theta0"],
                  ([k, v, v - base] for k, v in values.items()), (1.3 * len(values) + 3, 4.4), draw)


def stage_analyze(cfg: Config, env: Env, diffusion=None, theta0=None):
    """analysis/: the paper's figures and the merge's diagnostics as PNG and CSV, selection split, first of --seeds."""
    analyses = {"conflict": analyze_conflict, "landscape": analyze_landscape, "norms": analyze_norms,
                "stationarity": analyze_stationarity, "seeds": analyze_seeds, "interference": analyze_interference,
                "partial": analyze_partial}
    diffusion = diffusion or GaussianDiffusion()
    n_seeds = len(seed_list(cfg))
    figures = ([f for f in analyses if f != "seeds" or n_seeds > 1] if cfg.figures == "all" else  # all it can draw
               [s.strip() for s in cfg.figures.split(",") if s.strip()])
    if not figures or set(figures) - set(analyses):
        raise UserError(f"--figures {cfg.figures!r}: choose among {', '.join(analyses)} (comma-separated), all")
    if "seeds" in figures and n_seeds < 2:
        raise UserError("the seeds figure compares the task vectors of two or more seeds: pass --seeds (the run's)")
    pair = parse_list("landscape-ranges", cfg.landscape_ranges, example="0,3") or [0, cfg.n_ranges - 1]
    if "landscape" in figures and not (len(set(pair)) == len(pair) == 2 and all(0 <= i < cfg.n_ranges for i in pair)):
        raise UserError(f"--landscape-ranges {cfg.landscape_ranges!r}: two different indices in 0..{cfg.n_ranges - 1}")
    runs, needs = [c for _, c in seed_runs(cfg)], [f for f in figures if f not in ("conflict", "stationarity")]
    what = f"the {' and '.join(needs)} figure{'s' * (len(needs) > 1)} need{'s' * (len(needs) == 1)} finished ranges"
    try:  # on env.device, where the gradients move θ0
        by_seed = [[m.to(env.device).state_dict() for m in range_models(c)]
                   for c in (runs if "seeds" in needs else runs[:1] if needs else [])]
        what = "the analysis needs θ0"
        theta0 = unwrap(named_model(cfg, env, "theta0", theta0)).to(env.device)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    if not env.master:  # one process draws the figures
        return
    run = dataclasses.replace(runs[0], seeds=cfg.seeds)  # with --seeds, the first seed's run
    images = heldout_images(cfg, cfg.search_images, "select")
    a = argparse.Namespace(cfg=run, env=env, diffusion=diffusion, theta0=theta0, images=images, pair=pair,
                           folder=run_dir(cfg, "analysis"), batch=max(1, min(64, cfg.batch_size // cfg.grad_accum)),
                           names=[f"range {r}, t∈[{lo},{hi})" for r, (lo, hi) in  # 0-based: θ_0 is not θ0
                                  enumerate(timestep_ranges(cfg.n_ranges, diffusion.T))],
                           losses=lambda sd: heldout_loss(build_model(theta0.config, sd).to(env.device), diffusion,
                                                          images, env, cfg.n_ranges, role_seed(run.seed, "select")),
                           by_seed=by_seed, finetuned=by_seed[0] if by_seed else None,
                           base=by_seed and PixelDDPM(cfg, theta0).merge_base(by_seed[0][0]))
    written = [analyses[name](a) for name in figures]
    print("figures: " + ", ".join(str(p) for p in written) + " (numbers in the .csv beside each)")
    return written


# --- II.7 Stable Diffusion: the same method on a text-conditioned latent UNet (paper: SD v1.4) -----------------------
# θ0 is an SDUNet, the data are VAE latents and CLIP embeddings; the rest (Eq. 4-8, EMA, checkpoints) is the code above.

SIDECAR = "deme_projections.safetensors"  # the projections that StableDiffusion.save_merged cannot fold


def sd_libraries():
    try:
        return __import__("diffusers"), __import__("transformers")
    except ImportError:
        raise UserError("the SD path needs diffusers and transformers: pip install -r requirements-extra.txt") from None


class ChannelProjection(nn.Module):
    """DeMe's projection h -> W h (a 1x1 conv, identity at first) as a block's hook; a module: deepcopy carries it."""

    def __init__(self, channels, like):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels, device=like.device, dtype=like.dtype)[:, :, None, None])

    def forward(self, block, inputs, output):
        if isinstance(output, tuple):  # a down block returns (h, skip tensors): project h, never the skips
            return (F.conv2d(output[0], self.weight), *output[1:])
        return F.conv2d(output, self.weight)  # (B, C, h, w)


class SDUNet(nn.Module):
    """ε_θ(x_t, t, c): a diffusers UNet2DConditionModel with projections as hooks (SD v1: 9, 1.06% of the weights)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.projections = unet, nn.ModuleDict()  # place -> ChannelProjection; θ0 has none
        # plain JSON types: train_loop stores this in checkpoints, which load with weights_only=True
        self.config = dict(kind="stable_diffusion", unet=json.loads(json.dumps(dict(unet.config), default=str)))

    def add_projections(self, names=None):
        unet, c = self.unet, list(self.unet.config.block_out_channels)
        places = {**{f"down_{i}": (b, c[i]) for i, b in enumerate(unet.down_blocks)}, "mid": (unet.mid_block, c[-1]),
                  **{f"up_{i}": (b, c[::-1][i]) for i, b in enumerate(unet.up_blocks)}}  # (block, its channels)
        for name, (block, channels) in places.items():
            if (names is None or name in names) and name not in self.projections:
                self.projections[name] = ChannelProjection(channels, next(unet.parameters()))
                block.register_forward_hook(self.projections[name])
        return self

    def forward(self, x, t, encoder_hidden_states):
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample  # (B, 4, h, w)


class StableDiffusion:
    """A diffusers SD folder as DeMe sees it; with cfg, a checked run and the finetune/merge stages' backbone."""
    name = "SD "

    def __init__(self, folder, env: Env, cfg: Optional[Config] = None):
        diffusers, transformers = sd_libraries()
        folder, self.env, self.cfg = Path(folder), env, cfg
        parts = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler/scheduler_config.json")
        if missing := [p for p in parts if not (folder / p).exists()]:  # from_pretrained makes a tokenizer of nothing
            raise UserError(f"--pretrained {folder} is not a diffusers Stable Diffusion folder (no {missing[0]}); get "
                            f"one with `huggingface-cli download CompVis/stable-diffusion-v1-4 --local-dir DIR`")
        try:
            sched = json.loads((folder / parts[-1]).read_text())
            kind = sched.get("prediction_type", "epsilon"), sched.get("beta_schedule", "linear")
            if kind not in (("epsilon", "linear"), ("epsilon", "scaled_linear")):
                raise UserError(f"{folder} predicts {kind[0]}, {kind[1]} schedule; SD v1.x: epsilon, (scaled_)linear")
            self.diffusion = GaussianDiffusion(sched.get("num_train_timesteps", 1000), sched["beta_start"],
                                               sched["beta_end"], kind[1])
            self.unet = SDUNet(diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")).eval()
            self.vae, self.text_encoder = (m.to(env.device).requires_grad_(False) for m in (  # frozen: only θ trains
                diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae"),
                transformers.CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")))
            self.tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load the pipeline in {folder} ({str(e).strip().splitlines()[0]})") from None
        self.theta0, self.scale = self.unet, self.vae.config.scaling_factor
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent (SD: 8)
        if cfg:  # the run's checks, before any training
            if cfg.sd_resolution % (multiple := self.vae_factor * 2 ** (len(self.unet.unet.down_blocks) - 1)):
                raise UserError(f"--sd-resolution {cfg.sd_resolution} is not a multiple of {multiple} (this UNet's)")
            data, path = self.train_data(), Path(cfg.prompts)  # --prompts: a file of lines or 'a|b|c' (Path(""): ".")
            if not (cfg.merge_weights or cfg.merge_method == "average"):
                self.train_data("select")  # the merge-weight search's pairs
            lines = path.read_text().splitlines() if path.is_file() else cfg.prompts.split("|")
            if cfg.prompts and (path.suffix == ".txt" and not path.is_file() or not any(p.strip() for p in lines)):
                raise UserError(f"--prompts {cfg.prompts!r} gives no prompt; pass a file with one a line, or 'a|b|c'")
            self.prompts = [p.strip() for p in lines if p.strip()] or [c for _, c in data.pairs[-8:]]  # or 8 captions
            self.identity, self.batch = dict(model="sd", resolution=cfg.sd_resolution), cfg.eval_batch

    def embed(self, captions) -> torch.Tensor:
        """CLIP text embeddings (B, L, D), padded to the tokenizer's length as SD's pipeline does."""
        ids = self.tokenizer(list(captions), padding="max_length", truncation=True, return_tensors="pt").input_ids
        with self.env.autocast():
            return self.text_encoder(ids.to(self.env.device))[0].float()

    def encode(self, batch):
        """(images, captions) -> (latents, cond): the VAE posterior's mean (not a sample: resumes repeat exactly)."""
        with self.env.autocast():
            latents = self.vae.encode(batch[0].to(self.env.device)).latent_dist.mean.float() * self.scale
        return latents, {"encoder_hidden_states": self.embed(batch[1])}

    def train_data(self, role="train"):
        return CaptionedImages(self.cfg.data_dir, self.cfg.sd_resolution, role, self.cfg.heldout_fraction)

    def student(self):
        return copy.deepcopy(self.unet).add_projections() if self.cfg.projections else copy.deepcopy(self.unet)

    def grid(self, student):
        def grid(ema_state, path):
            from torchvision.utils import save_image
            x = sd_sample(self, [self.build(ema_state)], self.prompts[:1] * 4, self.cfg, range(4))
            with atomic_path(path) as tmp:
                save_image(x.float() * 0.5 + 0.5, tmp, nrow=4)
        return grid

    def build(self, state):
        model = copy.deepcopy(self.unet)
        model.add_projections({k.split(".")[1] for k in state if k.startswith("projections.")}).load_state_dict(state)
        return model.eval()

    def merge_base(self, finetuned_state):
        """θ0's weights plus identity projections (the finetuned layout), so a projection's task vector is W_i - I."""
        return self.unet.state_dict() | {k: torch.eye(len(v), dtype=v.dtype)[:, :, None, None]
                                         for k, v in finetuned_state.items() if k.startswith("projections.")}

    def selection(self):
        """(latents, text embeddings) of --search-images selection pairs, which no range trained on."""
        data, b = self.train_data("select"), self.cfg.eval_batch
        images, captions = zip(*(data[i] for i in range(min(len(data), self.cfg.search_images))))
        parts = [self.encode((torch.stack(images[s:s + b]), captions[s:s + b])) for s in range(0, len(images), b)]
        return torch.cat([x.cpu() for x, _ in parts]), torch.cat([c["encoder_hidden_states"] for _, c in parts])

    @torch.no_grad()
    def save_merged(self, state, record, folder):
        """merged_unet/ and merged_pipeline/ for diffusers; P after an upsampler conv folds: W' = P W, b' = P b."""
        import diffusers
        from safetensors.torch import save_file
        model = self.build(state)
        unet, rest = model.unet.cpu(), {}  # rest: the projections that cannot fold
        for name, W in ((n, p.weight.detach().cpu()) for n, p in model.projections.items()):
            if name.startswith("up_") and (up := unet.up_blocks[int(name[3:])].upsamplers):  # the last has none
                conv, P = up[0].conv, W[:, :, 0, 0].double()  # (C, C) after the conv (C, C', 3, 3)
                conv.weight.copy_(torch.einsum("oc,cikl->oikl", P, conv.weight.double()))
                conv.bias.copy_(P @ conv.bias.double())
            else:  # down blocks (whose output is also a skip tensor), mid
                rest[name] = W
        unet.save_pretrained(folder / "merged_unet")  # (the projections' hooks on it save nothing)
        pipeline = diffusers.StableDiffusionPipeline.from_pretrained(self.cfg.pretrained, unet=unet)
        pipeline.save_pretrained(folder / "merged_pipeline")
        for sidecar in (folder / "merged_unet" / SIDECAR, folder / "merged_pipeline" / "unet" / SIDECAR):
            save_file(rest, str(sidecar))  # even empty: a stale one from an earlier export would be restored
        if changed := [n for n, W in rest.items() if not torch.equal(W[:, :, 0, 0], torch.eye(len(W), dtype=W.dtype))]:
            print(f"warning: plain diffusers loading of {folder}/merged_* drops the projections {', '.join(changed)}, "
                  f"which cannot be folded; deme.load_sd_unet(DIR) keeps them", file=sys.stderr)
        return state


class CaptionedImages(ImageFolder):
    """Hugging Face's imagefolder: images, metadata.jsonl lines {"file_name": ..., "text": a caption or a list}."""

    def __init__(self, folder, size, role=None, fraction=0.1):
        meta, self.pairs, self.size, self.random_crop = Path(folder, "metadata.jsonl"), [], size, False
        if not meta.is_file():
            raise UserError(f'{meta} is missing; --data-dir needs images and {{"file_name": ..., "text": ...}} lines')
        for n, line in ((n, s) for n, s in enumerate(meta.read_text().splitlines(), 1) if s.strip()):
            try:
                row = json.loads(line)
                name, texts = row["file_name"], row["text"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{meta} line {n} is not a JSON object with file_name and text") from None
            if not Path(folder, name).is_file():
                raise UserError(f"{meta} line {n} names {name}, which is not a file in {folder}")
            if role is None or heldout_role(name, fraction) == role:
                self.pairs += [(Path(folder, name), str(t)) for t in ([texts] if isinstance(texts, str) else texts)]
        if not self.pairs:
            raise UserError(f"{meta} lists no image-caption pairs" +
                            (f" in its {role} split; raise --heldout-fraction or add pairs" if role else ""))
        self.paths = [path for path, _ in self.pairs]  # ImageFolder reads them

    def __getitem__(self, item):
        i = split_item(item)[0]
        try:
            return super().__getitem__(item), self.pairs[i][1]  # (3, H, W) in [-1, 1], str
        except OSError:
            raise UserError(f"{self.paths[i]} is not a readable image; fix or remove it from metadata.jsonl") from None


class Prompted(nn.Module):
    """ε(x_t, t) for fixed prompt embeddings, classifier-free guided: ε_u + s (ε_c - ε_u) (Ho & Salimans 2022)."""

    def __init__(self, model, emb, uncond, scale):
        super().__init__()
        self.model, self.cond, self.scale = model, torch.cat([uncond, emb]), scale

    def forward(self, x, t):
        eps_u, eps_c = self.model(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=self.cond).chunk(2)
        return eps_u + self.scale * (eps_c - eps_u)


@torch.no_grad()
def sd_sample(sd: StableDiffusion, models, prompts, cfg: Config, indices) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] of `prompts` from the noise of `indices`, by one model or N (Eq. 7's ensemble)."""
    emb, uncond, side = sd.embed(prompts), sd.embed([""] * len(prompts)), cfg.sd_resolution // sd.vae_factor
    guided = [Prompted(m.to(sd.env.device).eval(), emb, uncond, cfg.guidance_scale) for m in models]
    latents = sample_batch(cfg, sd.env, sd.diffusion, RangeEnsemble(guided, sd.diffusion.T), indices,  # (N = 1: all t)
                           role_seed(cfg.seed, "samples"), (sd.unet.unet.config.in_channels, side, side), clip=False)
    return sd.vae.decode(latents.to(sd.env.device).float() / sd.scale).sample.clamp(-1, 1)


def load_sd_unet(folder) -> SDUNet:
    """A UNet that save_merged wrote (merged_unet/, or a pipeline folder), with its unfoldable projections as hooks."""
    diffusers, _ = sd_libraries()
    from safetensors.torch import load_file
    folder = Path(folder) / "unet" if (Path(folder) / "model_index.json").is_file() else Path(folder)
    weights = load_file(str(folder / SIDECAR)) if (folder / SIDECAR).is_file() else {}
    model = SDUNet(diffusers.UNet2DConditionModel.from_pretrained(folder)).add_projections(set(weights))
    model.load_state_dict({f"projections.{k}.weight": W for k, W in weights.items()}, strict=False)
    return model.eval()


def stage_sd(cfg: Config, env: Env):
    """DeMe on Stable Diffusion: finetune per range, merge (Eq. 8), export for diffusers, draw --prompts by --models."""
    from torchvision.utils import save_image
    if cfg.flip:
        print("warning: --flip flips VAE latents, which only roughly flips images; consider --no-flip", file=sys.stderr)
    sd = StableDiffusion(cfg.pretrained, env, cfg)
    stage_finetune(cfg, env, sd.diffusion, backbone=sd)  # DeMe Sec. 3.2, as for the DDPM UNet
    if not env.master:  # merging, export and sampling run on rank 0 alone
        return
    try:  # θ_1..θ_N as EMA state dicts; while a range is unfinished (split with --ranges), say which
        states = [ck["ema"] for ck in range_checkpoints(cfg)]
    except UserError as e:
        print(f"{e}; then run again to merge")
        return
    merged = sd.build(stage_merge(cfg, dataclasses.replace(env, rank=0, world=1), sd.diffusion, backbone=sd,
                                  finetuned=states))
    names = [n for n in (s.strip() for s in cfg.models.split(",")) if n in ("theta0", "ensemble", "merged")]
    for name in names or ["merged"]:  # samples/<name>/{i:05d}.png of prompt i: seed and index fix the noise
        models = {"theta0": [sd.unet], "merged": [merged]}.get(name) or [sd.build(s) for s in states]
        folder = run_dir(cfg, "samples", name)
        atomic_write_text("".join(p + "\n" for p in sd.prompts), folder / "prompts.txt")
        todo = [i for i in range(len(sd.prompts)) if not (cfg.resume and (folder / f"{i:05d}.png").exists())]
        for idx in tqdm([todo[s:s + cfg.eval_batch] for s in range(0, len(todo), cfg.eval_batch)], desc=name):
            for i, x in zip(idx, sd_sample(sd, models, [sd.prompts[i] for i in idx], cfg, idx)):  # x: (3, H, W)
                with atomic_path(folder / f"{i:05d}.png", sync=False) as tmp:
                    save_image(x.float() * 0.5 + 0.5, tmp)  # the same rounding as images_to_uint8
        print(f"{len(sd.prompts)} images of {name} in {folder}")


# --- II.8 Benchmark, the plan line, the ablation ---------------------------------------------------------------------

def rates(cfg: Config, env: Env, train_batch, eval_batch, iters=1, warmup=1, inception=False) -> dict:
    """Images/s of a fresh UNet of the run's preset: plain and DeMe (Eq. 4-5) finetuning, forward, sampling, FID."""
    diffusion, dev, model = GaussianDiffusion(), env.device, timing_unet(cfg)
    c, res = model.config["in_channels"], model.config["resolution"]
    x0 = place(torch.rand(train_batch, c, res, res) * 2 - 1, env)  # random images (B, C, H, W), as training holds them

    def train_step(student, teacher=None):  # one step of train_loop, as a closure
        opt, sched, scaler, ema = optimizer(place(student, env).train(), cfg, env, 1e-8, lambda k: 1.0)
        net = prepare(student, env)

        def step():
            t = torch.randint(0, diffusion.T, (train_batch,), device=dev)
            with env.autocast():
                loss = training_loss(net, teacher, diffusion, x0, t, torch.randn(x0.shape, device=dev), cfg.consistency)
            scaler.scale(loss).backward()
            optimizer_step(student, opt, sched, scaler, ema, cfg.grad_clip)
        return step

    x, t = torch.randn(eval_batch, c, res, res, device=dev), torch.randint(0, diffusion.T, (eval_batch,), device=dev)
    plain = copy.deepcopy(model).to(dev).eval()  # θ0 as evaluation places it

    def forward():
        with torch.no_grad(), env.evaluation():
            plain(x, t)
    # sampling as evaluation runs it (sample_batch), 2 DDIM steps (eta 1 draws noise as DDPM does), scaled to S below
    few = dataclasses.replace(cfg, sampler="ddim", sample_steps=2, eta=cfg.eta if cfg.sampler == "ddim" else 1.0)
    deme = train_step(add_channel_projections(copy.deepcopy(model)) if cfg.projections else copy.deepcopy(model),
                      prepare(frozen(model), env) if cfg.consistency > 0 else None)
    fns = {"train_plain": train_step(model), "train_deme": deme, "forward": forward,
           "sampling": lambda: sample_batch(few, env, diffusion, plain, range(eval_batch), cfg.seed, (c, res, res))}
    if inception:  # the Inception's forward with random weights (speed does not need them)
        from torchvision.models.inception import Inception3
        features = Inception3(num_classes=1008, aux_logits=False, init_weights=False).to(dev).eval()
        fns["inception"] = lambda: FIDInception.forward(features, torch.rand(eval_batch, 3, res, res, device=dev))
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda device: None
    times = {name: [] for name in fns}
    for _ in range(warmup + iters):  # in turns (a, b, a, b, ...) so that background load hits all alike
        for name, fn in fns.items():  # (each call starts where the one before synced)
            start = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - start)
    r = {f"{k}_img_s": env.world * (train_batch if k.startswith("train") else eval_batch) / np.median(ts[warmup:])
         for k, ts in times.items()}
    S = cfg.sample_steps if cfg.sampler == "ddim" else diffusion.T
    return dict(r, sampling_img_s=r["sampling_img_s"] * 2 / S, sample_steps=S)


def stage_bench(cfg: Config, env: Env):
    """rates at the run's batches, the merged model's extra parameters and FLOPs, the projected time: bench.json."""
    if not env.master:
        return  # one device is measured; data-parallel runs scale it by the number of processes
    dev, res = env.device, cfg.image_size or PRESETS[cfg.preset]["resolution"]
    train_batch = cfg.bench_batch or cfg.batch_size // (cfg.grad_accum * env.world)
    eval_batch = cfg.bench_batch or cfg.eval_batch
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench: preset {cfg.preset} ({res}x{res}), {where}, {env.precision}, compile {env.compile}, batch "
          f"{train_batch} (training) / {eval_batch} (sampling), median of {cfg.bench_iters}")
    r = rates(cfg, dataclasses.replace(env, world=1), train_batch, eval_batch, cfg.bench_iters,
              2 if env.compile else 1, eval_metric(cfg) == "fid")  # (compiling happens in the first call)
    # the merged model keeps its projections: their parameters and FLOPs, unfolded and with the foldable ones folded
    from torch.utils.flop_counter import FlopCounterMode
    theta0 = timing_unet(cfg).eval()
    merged, folded = (add_channel_projections(copy.deepcopy(theta0)) for _ in range(2))  # identity projections
    r["n_folded"] = fold_channel_projections(folded)
    x1, t1 = torch.randn(1, theta0.config["in_channels"], res, res, device=dev), torch.full((1,), 500, device=dev)
    for name, m in (("theta0", theta0), ("merged", merged), ("folded", folded)):
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            place(m, env)(x1, t1)
        r[f"{name}_flops"], r[f"{name}_params"] = flops.get_total_flops(), sum(p.numel() for p in m.parameters())
    result = dict(device=where, precision=env.precision, compile=env.compile, train_batch=train_batch,
                  eval_batch=eval_batch, **r, projected=projected_time(cfg, r), config=dataclasses.asdict(cfg))
    labels = {"train_plain": "training, plain finetuning",
              "train_deme": "training, DeMe finetuning (CP + frozen θ0 + CL)", "forward": "forward, θ0",
              "sampling": f"DDIM-{r['sample_steps']} sampling, θ0", "inception": "FID Inception features"}
    relative = {"train_deme": f"{r['train_deme_img_s'] / r['train_plain_img_s']:.2f}x plain"}
    rows = [(what, f"{r[f'{k}_img_s']:{'.3g' if k == 'sampling' else '.1f'}} img/s", relative.get(k, ""))
            for k, what in labels.items() if f"{k}_img_s" in r]
    pct = lambda name, what: f"{100 * (r[f'{name}_{what}'] / r[f'theta0_{what}'] - 1):+.2f}%"
    rows += [(f"merged model, {what}", "", f"FLOPs {pct(name, 'flops')}, params {pct(name, 'params')} vs θ0")
             for name, what in (("merged", "projections unfolded"), ("folded", f"{r['n_folded']} projections folded"))]
    print("\n" + markdown_table(["measurement", "rate", "relative"], rows) +
          "\nProjected wall time of this run's recipe on one such device (data loading excluded; data-parallel runs "
          "divide the training and sampling times by the number of processes, minus communication):\n\n" +
          markdown_table(["stage", "time"], [(what, _duration(sec)) for what, sec in result["projected"]]))
    atomic_write_text(json.dumps(result, indent=2), run_dir(cfg, "bench.json"))
    print(f"written: {run_dir(cfg, 'bench.json')}")


def projected_time(cfg: Config, r: dict, stages=("pipeline",)) -> list:
    """[(what, seconds)] left to do of `stages` ("pipeline": all) at the rates `r` on one device, no data loading."""
    def trained(c, folder, steps) -> bool:  # a checkpoint trained to `steps`, which the run reuses
        with contextlib.suppress(Exception):  # missing, or unreadable (the stage itself will say so)
            ck = torch.load(run_dir(c, folder, "ckpt.pt"), map_location="cpu", weights_only=True, mmap=True)
            return ck["step"] >= steps
        return False
    n, batch, S, runs = cfg.n_ranges, cfg.batch_size, r["sample_steps"], [c for _, c in seed_runs(cfg)]
    k, each = len(runs), f", x {len(runs)} seeds" if len(runs) > 1 else ""
    names = [s.strip() for s in cfg.models.split(",") if s.strip() and (cfg.baseline or "baseline" not in s)]
    pre = (not cfg.pretrained or tuple(stages) == ("train",)) and not trained(cfg, "pretrain", cfg.train_steps)
    m = sum(not trained(c, f"range_{i}", c.steps) for c in runs for i in range_indices(c))
    b = sum(not trained(c, baseline_name(c), n * c.steps) for c in runs) if cfg.baseline else 0
    search = not cfg.merge_weights and cfg.merge_method != "average"
    chosen = cfg.search_candidates * selection_samples(cfg)
    ref = {"cifar10": 50_000, "lsun_church": 126_227, "lsun_bedroom": 3_033_042}.get(cfg.dataset, cfg.n_samples)
    # (stage, what, images, the rate they go at); the merged model's and the ensemble's projections add 0.5-3% FLOPs
    rows = [("train", f"pretrain θ0: {cfg.train_steps} steps x {batch}", pre * cfg.train_steps * batch, "train_plain"),
            ("finetune", f"DeMe finetuning: {m} range{'s' * (m > 1)} x {cfg.steps} steps x {batch}",
             m * cfg.steps * batch, "train_deme"),
            ("baseline", f"{baseline_name(cfg)}: {b} x {n * cfg.steps} steps x {batch}", b * n * cfg.steps * batch,
             "train_plain"),
            ("merge", f"merge search: {cfg.search_evals} x {cfg.search_images} held-out images{each}",
             search * k * cfg.search_evals * cfg.search_images, "forward"),
            ("merge", f"its samples: {cfg.search_candidates} candidates x {selection_samples(cfg)}{each}",
             (search and cfg.search_objective == "samples") * k * chosen, "sampling"),
            *[("evaluate", f"sample {name}: {cfg.n_samples} x {S} steps{each}", k * cfg.n_samples, "sampling")
              for name in names],
            ("evaluate", f"FID features: {len(names)} x {cfg.n_samples} samples{each}",
             k * len(names) * cfg.n_samples, "inception"),
            ("evaluate", f"FID reference statistics: {ref} images, once", ref, "inception")]
    plan = [(what, images / r[f"{rate}_img_s"]) for stage, what, images, rate in rows
            if (stage in stages or "pipeline" in stages) and images and f"{rate}_img_s" in r]
    return plan + [("total", sum(s for _, s in plan))]


def _duration(seconds) -> str:
    unit, size = [("s", 1), ("min", 60), ("h", 3600), ("days", 86400)][bisect.bisect([120, 7200, 172800], seconds)]
    return f"{seconds / size:.{int(size > 1)}f} {unit}"


# DeMe Table 3 and Table 1's reweightings at equal compute: each finetunes θ0 N x --steps steps in all, merged if N > 1
ABLATION = {
    "θ0": dict(),
    "N=1, continued finetuning": dict(baseline_weighting="none"),
    "N=1 + CP": dict(n_ranges=1, consistency=0.0, projections=True),
    "N=8 + PS": dict(n_ranges=8, consistency=0.0, projections=False),
    "N=8 + PS + CL": dict(n_ranges=8, projections=False),
    "N=8 + PS + CL + CP": dict(n_ranges=8),
    "N=4 + PS + CL + CP (DeMe)": dict(n_ranges=4),
    "Min-SNR-γ, γ = 5": dict(baseline_weighting="minsnr"),
    "P2, γ = 1, k = 1": dict(baseline_weighting="p2"),
}


def ablation_config(cfg: Config, row: dict) -> Config:
    c = dataclasses.replace(cfg, **row)
    if (c.n_ranges, c.consistency, c.projections) == (cfg.n_ranges, cfg.consistency, cfg.projections):
        return c  # DeMe itself, or a baseline (N x steps on all timesteps): the pipeline's own stages
    slug = f"n{c.n_ranges}_consistency{int(bool(c.consistency))}_projections{int(c.projections)}"
    return dataclasses.replace(c, steps=cfg.n_ranges * cfg.steps // c.n_ranges, ranges="all", merge_weights="",
                               out=str(run_dir(cfg, "ablation", slug)))


def announce_plan(cfg: Config, env: Env, stage: str):
    """One line before the work starts: what this command will run and how long it projects to on this device."""
    if cfg.model == "sd" or stage not in ("pipeline", "train", "finetune", "baseline", "evaluate", "ablation"):
        return
    cap = 8 if env.device.type == "cpu" else math.inf  # on a CPU, 8 images: a step of more takes seconds
    micro = max(1, cfg.batch_size // (cfg.grad_accum * env.world))
    r = rates(cfg, dataclasses.replace(env, compile=False), min(micro, cap), min(cfg.eval_batch, cap))
    if stage != "ablation":
        plan = projected_time(cfg, r, (stage,))[:-1]
    else:  # each ABLATION row that trains (trained ones left out), over the seeds, then the evaluation of every row
        plan, runs = [], seed_runs(cfg)
        for label, row in ABLATION.items():
            n = row.get("n_ranges", cfg.n_ranges)
            stages = ("baseline",) if "baseline_weighting" in row else ("finetune", "merge") if n > 1 else ("finetune",)
            seconds = sum(projected_time(ablation_config(c, row), r, stages)[-1][1] for _, c in runs) if row else 0
            plan += [(f"{label}{f', x {len(runs)} seeds' if cfg.seeds else ''}", seconds)] if seconds else []
        evaluate = dataclasses.replace(cfg, models=",".join(["theta0"] * len(ABLATION)))
        plan.append((f"evaluate {len(ABLATION) * len(runs)} models", projected_time(evaluate, r, ("evaluate",))[-1][1]))
    if env.master and plan:
        where = "a GPU" if env.device.type == "cuda" else f"this CPU ({torch.get_num_threads()} threads)"
        print(f"plan: {'; '.join(f'{what} ~{_duration(s)}' for what, s in plan)}. Projected "
              f"{_duration(sum(s for _, s in plan))} on {where}, {env.precision}, from rates timed just now (trained "
              f"stages in the run folder are reused and left out)", flush=True)


def stage_ablation(cfg: Config, env: Env):
    """Every ABLATION row for each --seeds (reusing the pipeline's stages), evaluated alike: ablation.{json,md,png}."""
    start, diffusion = time.perf_counter(), GaussianDiffusion()
    theta0 = theta0_model(cfg, env, diffusion)

    def model(run: Config, row: dict):  # trains (or reuses) one row's model
        if not row:
            return theta0
        c = ablation_config(run, row)
        if "baseline_weighting" in row:
            stage_baseline(c, env, diffusion, theta0)
            return named_model(c, env, baseline_name(c))
        stage_finetune(c, env, diffusion, theta0)
        if c.n_ranges == 1:  # nothing to merge: the finetuned model itself
            return range_models(c)[0]
        stage_merge(c, env, diffusion, theta0)
        return named_model(c, env, "merged")
    rows = {}
    for s, c in seed_runs(cfg):
        ref = evaluation_reference(c, env)
        rows[s] = [evaluate_model(c, env, diffusion, model(c, row), label, ref)[0] for label, row in ABLATION.items()]
    if env.master:
        trains = {label: ablation_config(cfg, row) for label, row in ABLATION.items() if "n_ranges" in row}
        write_seed_summary(cfg, rows, "ablation", note=" ".join(f"{label}: {c.n_ranges} x {c.steps} steps."
                                                                for label, c in trains.items()))
        print(f"ablation finished in {(time.perf_counter() - start) / 60:.1f} min")


# --- II.9 Exercises: a student copy of the project ------------------------------------------------------------------

# (part, file, function, what to write): the order to do them in; `pytest -m partN` grades part N (README, "Exercises")
EXERCISES = [
    (1, "deme.py", "GaussianDiffusion.q_sample", "x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε (DDPM Eq. 4)"),
    (1, "deme.py", "GaussianDiffusion.ddim_step", "x_{t_prev} from x_t and ε (DDIM Eq. 12, σ_t of Eq. 16)"),
    (2, "deme.py", "deme_loss", "the simple loss plus λ times the consistency loss to θ0 (DeMe Eq. 4-5)"),
    (2, "deme.py", "sample_timesteps", "probabilistic sampling of t, in antithetic pairs (DeMe Eq. 6)"),
    (2, "ddpm_unet.py", "_add_projection", "an identity-initialised, bias-free C x C 1x1 conv (DeMe Sec. 3.2)"),
    (3, "deme.py", "task_vector", "τ_i = θ_i - θ0 (DeMe Sec. 3.3)"),
    (3, "deme.py", "task_arithmetic", "Σ_i w_i τ_i, the sum of DeMe Eq. 8"),
    (3, "deme.py", "RangeEnsemble.forward", "each sample to θ_i with i = floor(t N / T) (DeMe Eq. 7)"),
    (4, "deme.py", "frechet_distance", "||μ1 - μ2||² + tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^(1/2)) (Heusel et al. 2017)"),
]
PART_NAMES = {1: "DDPM", 2: "decoupled finetuning", 3: "merge and ensemble", 4: "evaluation"}
PROJECT_FILES = ("deme.py", "ddpm_unet.py", "test_deme.py", "pytest.ini", "README.md", "requirements.txt",
                 "requirements-extra.txt", "assets")


def exercise_command(out, parts=(1, 2, 3, 4)):
    """A copy of this project in `out` without the exercises' bodies, plus EXERCISES.md; built beside, then renamed."""
    import shutil
    out, root = Path(out), Path(__file__).resolve().parent
    if out.exists():
        raise UserError(f"{out} already exists; choose a new folder for the student copy (--out)")
    if set(parts) - set(PART_NAMES):
        raise UserError(f"--parts {','.join(map(str, parts))}: the parts are 1, 2, 3 and 4")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(root, tmp, ignore=lambda path, names: set(names) - set(PROJECT_FILES) if path == str(root) else ())
    guide = {p: f"## Part {p}: {PART_NAMES[p]}  (`python -m pytest -m part{p} test_deme.py`)\n\n"
             for p in sorted(parts)}  # each part's section of EXERCISES.md
    for k, (p, file, func, what) in enumerate(EXERCISES, 1):
        if p in guide:  # the function's docstring stays, its body raises
            source = (tmp / file).read_text()
            node = ast.parse(source)
            for name in func.split("."):  # "f" or "Class.f"
                node = next(n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
            first, lines = node.body[0], source.split("\n")
            keep = first.end_lineno if ast.get_docstring(node) is not None else first.lineno - 1
            stub = " " * first.col_offset + f"raise NotImplementedError({f'Exercise {k}: {what}'!r})"
            (tmp / file).write_text("\n".join(lines[:keep] + [stub] + lines[node.end_lineno:]))
            guide[p] += f"{k}. `{func}` in {file}: {what}\n"
    template = (root / "assets" / "exercises_template.md").read_text()
    (tmp / "EXERCISES.md").write_text(template.format(parts="".join(section + "\n" for section in guide.values())))
    os.replace(tmp, out)
    print(f"student copy with {sum(e[0] in parts for e in EXERCISES)} exercises in {out}; start with "
          f"{out / 'EXERCISES.md'}")
    return out


# --- II.10 Command line ----------------------------------------------------------------------------------------------

def stage_sample(cfg: Config, env: Env):
    for name in (s.strip() for s in cfg.models.split(",")):
        folder = write_samples(cfg, env, GaussianDiffusion(), named_model(cfg, env, name), Path(name).stem)
        if env.master:
            print(f"{cfg.n_samples} samples of {name} in {folder}")


STAGES = {
    "pipeline": (stage_pipeline, "the whole method: θ0, N finetuned ranges, the baseline, merge, evaluation (default)"),
    "train": (stage_train, "pretrain θ0 from scratch (the CPU pipeline's θ0)"),
    "finetune": (stage_finetune, "finetune one copy of θ0 per timestep range (--ranges)"),
    "baseline": (stage_baseline, "plain finetuning of θ0 for N x steps on all timesteps"),
    "merge": (stage_merge, "merge the finetuned ranges into one model (Eq. 8)"),
    "sample": (stage_sample, "write --n-samples PNGs of each model of --models under samples/NAME/"),
    "evaluate": (stage_evaluate, "compare the models named by --models"),
    "bench": (stage_bench, "throughput of training, DeMe finetuning and sampling on this device; projected run time"),
    "analyze": (stage_analyze, "the paper's figures (Fig. 1a, 6a, 6b) and the merge's diagnostics, as PNG and CSV"),
    "ablation": (stage_ablation, "DeMe Table 3 and Table 1's loss reweightings at equal compute, with --seeds"),
}
GROUPS = {"dataset": "run", "preset": "model", "train_steps": "pretraining θ0 (train stage)",
          "n_ranges": "decoupled finetuning (finetune and baseline stages)", "merge_method": "merge stage",
          "sampler": "evaluation (sample and evaluate stages)", "bench_batch": "benchmark (bench stage)",
          "figures": "analysis (analyze stage)", "prompts": "Stable Diffusion (--model sd)"}
EXAMPLES = """examples:
  python deme.py                                   the whole pipeline on synthetic shapes, on a CPU, in minutes
  python deme.py --dataset cifar10 --download      the paper's CIFAR-10 recipe (GPU)
  python deme.py finetune --dataset cifar10 --ranges 2      one range per machine, then `merge` and `evaluate`
  torchrun --nproc_per_node=8 deme.py --dataset lsun_church --data-dir /data/lsun
  python deme.py fid samples/ stats.npz            FID of two folders or .npz files, like pytorch-fid
  python deme.py exercise --out course/            a student copy with the key functions to write (EXERCISES.md)
"""


def build_parser() -> argparse.ArgumentParser:
    """The stages, each with a --flag per Config field (default SUPPRESS: only given flags override presets)."""
    parser = argparse.ArgumentParser(prog="deme.py", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", title="stages (default: pipeline)")
    common = group = argparse.ArgumentParser(add_help=False)
    for f in dataclasses.fields(Config):
        group = common.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group
        kw, choices = dict(default=argparse.SUPPRESS, help=f.metadata["help"]), f.metadata["choices"]
        if f.type in (bool, Optional[bool]):
            kw.update(action=argparse.BooleanOptionalAction)
        elif f.type is tuple:
            kw.update(type=lambda s: tuple(float(x) for x in s.split(",")), metavar="A,B")
        else:
            typ = float if f.type == Optional[float] else f.type
            kw.update(type=typ, choices=choices, metavar=None if choices else typ.__name__.upper())
        group.add_argument("--" + f.name.replace("_", "-"), **kw)
    common.add_argument("--dry-run", action="store_true", help="every check and the plan; train and write nothing")
    for name, (_, help) in STAGES.items():
        sub.add_parser(name, parents=[common], help=help, description=help)
    fid = sub.add_parser("fid", help="FID between two folders of images or .npz statistics (like pytorch-fid)")
    fid.add_argument("paths", nargs=2, metavar="PATH", help="a folder of images, or an .npz with mu and sigma")
    fid.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    fid.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    fid.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache)")
    fid.add_argument("--dims", type=int, default=2048, help="Inception features (FID: 2048, the pool3 layer)")
    ex = sub.add_parser("exercise", help="write a student copy of this project, key functions to write (EXERCISES.md)")
    ex.add_argument("--out", required=True, help="the new folder of the student copy")
    ex.add_argument("--parts", default="1,2,3,4", help="which parts' exercises to remove, e.g. 2,3 (default: all)")
    return parser


def preflight(cfg: Config, env: Env, stage: str):
    """Every check that could fail after hours of training: run folder, data, held-out splits, FID weights and stats."""
    existing = next(p for p in [Path(cfg.out), *Path(cfg.out).parents] if p.exists())  # --out itself, if made yet
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write to the run folder {cfg.out} ({existing} is not a writable folder); choose "
                        f"another --out")
    if cfg.model == "sd":  # the SD stage checks its pipeline and captions before it trains
        if stage != "pipeline":
            raise UserError(f"--model sd runs as one command (finetune, merge, generate); drop the stage {stage!r} "
                            f"and use --ranges to split the finetuning")
        return
    searches = stage in ("pipeline", "merge", "ablation") and not cfg.merge_weights and cfg.merge_method != "average"
    evaluates = stage in ("pipeline", "evaluate", "ablation")
    samples = (searches and cfg.search_objective == "samples") or stage == "analyze"  # selection samples are scored
    metric = eval_metric(cfg)
    if stage == "ablation" and cfg.n_ranges * cfg.steps % 8:
        raise UserError(f"the ablation splits N x --steps = {cfg.n_ranges * cfg.steps} optimizer steps over 8 ranges; "
                        f"choose --steps so that it divides by 8")
    with env.master_first():  # one process lists a folder or an lmdb first (LSUN: writes its key list once)
        if stage in ("pipeline", "train", "finetune", "baseline", "ablation"):
            micro = check_batch_split(cfg, env.world) * env.world
            if (size := len(make_dataset(cfg))) < micro:
                raise UserError(f"the training split has {size} images, fewer than one micro-batch of {micro}; lower "
                                f"--batch-size")
        if searches or stage == "analyze":
            held_out_split(cfg, cfg.search_images, "select")
        if samples and metric == "pixel":
            held_out_split(cfg, selection_samples(cfg), "select", "--search-samples")
        if evaluates:
            held_out_split(cfg, cfg.report_images, "report")
        if evaluates and metric == "pixel" and cfg.dataset != "synthetic":
            check_pixel_reference(len(make_dataset(cfg, "eval")), cfg.n_samples)
        if cfg.fid_stats and (dims := len(load_stats(cfg.fid_stats)[0])) != FID_DIMS:
            raise UserError(f"--fid-stats {cfg.fid_stats} holds {dims}-d statistics, "
                            f"not FID's {FID_DIMS}-d pool3 statistics; compute them with pytorch-fid --save-stats")
        if (evaluates or samples) and metric == "fid":
            FIDInception(cfg.inception_weights or None)  # found (or downloaded once), hash and layout checked


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "pipeline")
    args = build_parser().parse_args(argv)
    try:
        if args.stage == "exercise":
            return exercise_command(args.out, tuple(parse_list("parts", args.parts, example="1,2")))
        if args.stage == "fid":
            device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
            return fid_command(*args.paths, args.batch_size, device, args.inception_weights, args.dims)
        given = {k: v for k, v in vars(args).items() if k in Config.__dataclass_fields__}
        notes = []
        cfg = resolve_config(given, notes)
        env = setup_env(cfg)
        if env.master:
            print(config_summary(cfg, given, args.stage, notes, saved=not args.dry_run), flush=True)
        preflight(cfg, env, args.stage)
        announce_plan(cfg, env, args.stage)
        if args.dry_run:
            print("dry run: every check passed; nothing was trained, sampled or written")
            return
        if env.master:  # (atomic_path makes the run folder)
            atomic_write_text(json.dumps(dataclasses.asdict(cfg), indent=2), run_dir(cfg, f"config_{args.stage}.json"))
        (stage_sd if cfg.model == "sd" else STAGES[args.stage][0])(cfg, env)
    except UserError as e:
        stop(f"error: {e}", 2)
    except KeyboardInterrupt:
        stop("\ninterrupted; run the same command with --resume to continue", 130)
    except Exception:
        if not distributed():
            raise
        import traceback
        stop(traceback.format_exc().rstrip(), 1)
    if distributed():
        torch.distributed.destroy_process_group()


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def stop(message, code):
    """Ends the program with `message` on stderr; under torchrun at once (the others may wait for it in a barrier)."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    (os._exit if distributed() else sys.exit)(code)


if __name__ == "__main__":
    main()
