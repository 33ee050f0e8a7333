"""The DDPM UNet of Ho et al. (2020) with DeMe's channel-wise projections, and its checkpoint formats.

In this order: the network (the original TensorFlow code as ported by pesser/pytorch_diffusion, in that port's key
layout, so the published checkpoints load with strict=True); DeMe's identity-initialised C x C projections after
every down level, the mid block and every up level (keys '<place>.proj.weight'; absent places are nn.Identity);
the diffusers UNet2DModel layout (converted on load, exported back without projections); files: the one atomic write,
the one hash-checked download, checkpoint loading (weights_only).
"""
import contextlib
import hashlib
import json
import math
import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """A user's mistake; the command line prints its one-line message without a traceback."""


# Constructor arguments of UNet: the published models (Ho et al. 2020, Appendix B), and `tiny` for CPU work.
PRESETS = {
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
                    resolution=32),
    "lsun256": dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0,
                    resolution=256),
    "tiny": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, resolution=16),
}

# EMA checkpoints of the original DDPM release in the TF-port layout (pesser/pytorch_diffusion).
PRETRAINED = {
    "cifar10": dict(url="https://heibox.uni-heidelberg.de/f/2e4f01e2d9ee49bab1d5/?dl=1",
                    md5="1fa350b952534ae442b1d5235cce5cd3", file="ema_diffusion_cifar10_model-790000.ckpt",
                    preset="cifar10"),
    "lsun_church": dict(url="https://heibox.uni-heidelberg.de/f/44ccb50ef3c6436db52e/?dl=1",
                        md5="fdc68a23938c2397caba4a260bc2445f", file="ema_diffusion_lsun_church_model-4432000.ckpt",
                        preset="lsun256"),
    "lsun_bedroom": dict(url="https://heibox.uni-heidelberg.de/f/b95206528f384185889b/?dl=1",
                         md5="1921fa46b66a3665e450e42f36c2720f", file="ema_diffusion_lsun_bedroom_model-2388000.ckpt",
                         preset="lsun256"),
    # θ0 of the CPU pipeline, shipped in assets/: the tiny preset trained to convergence on the synthetic shapes by
    # this project's own train stage (README: "A converged θ0"); its MD5 is checked on every load
    "tiny_synthetic": dict(file="theta0_tiny_synthetic.pt", md5="7ee37a82669d907e9ec4777c89efa883", preset="tiny",
                           local=True),
}
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


# --- The network ------------------------------------------------------------------------------------------------------

def timestep_embedding(t, dim):
    """Sinusoidal timestep embedding of DDPM (Ho et al. 2020, Sec. 4), sin then cos, computed in float32."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, dim)


def Normalize(channels):
    """GroupNorm with 32 groups and eps 1e-6, as in the original DDPM code."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResBlock(nn.Module):
    """Residual block: conv(silu(norm(x))) + timestep projection, conv(dropout(silu(norm(h)))), plus skip."""

    def __init__(self, in_channels, out_channels, temb_channels, dropout):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, softmax(q^T k / sqrt(C)) v, with a residual add."""

    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        # The 1x1 convs applied as matrix products over the positions: the same math, and faster than 1x1 convs.
        q, k, v = (F.linear(h, conv.weight.flatten(1), conv.bias)[:, None] for conv in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, 1, HW, C) -> (B, HW, C), scale 1/sqrt(C)
        a = F.linear(a, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, HW, C)
        return x + a.transpose(1, 2).reshape(B, C, H, W)


class Resample(nn.Module):
    """Halve H and W (zero-pad right and bottom by one, then a 3x3 conv with stride 2 and no padding), or, with `up`,
    double them (nearest-neighbour upsampling, then a 3x3 conv)."""

    def __init__(self, channels, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.pad(x, (0, 1, 0, 1)))


def preset_config(name):
    """The PRESETS entry `name`, or one line naming the known presets."""
    if name not in PRESETS:
        raise UserError(f"unknown UNet preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


class UNet(nn.Module):
    """The noise predictor eps_theta(x_t, t) of DDPM (Ho et al. 2020, Appendix B), in the original key layout."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, in_channels=3,
                 out_channels=3):
        super().__init__()
        self.config = dict(ch=int(ch), ch_mult=[int(m) for m in ch_mult], num_res_blocks=int(num_res_blocks),
                           attn_resolutions=[int(r) for r in attn_resolutions], dropout=float(dropout),
                           resolution=int(resolution), in_channels=int(in_channels), out_channels=int(out_channels))
        if any(c % 32 for c in [ch] + [ch * m for m in ch_mult]):
            raise UserError(f"UNet channels ch = {ch} and ch * ch_mult = {[ch * m for m in ch_mult]} must be multiples "
                            "of 32 (GroupNorm has 32 groups); choose another ch or ch_mult")
        self.num_levels = L = len(ch_mult)
        temb_ch = 4 * ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for i in range(L):
            level = nn.Module()
            c_in, c_out = ch * in_mult[i], ch * ch_mult[i]
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResBlock(c_in, c_out, temb_ch, dropout))
                c_in = c_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(c_out))
            if i != L - 1:
                level.downsample = Resample(c_out, up=False)
                res //= 2
            level.proj = nn.Identity()  # DeMe channel projection, see add_channel_projections
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(c_in, c_in, temb_ch, dropout)
        self.mid.attn_1 = AttnBlock(c_in)
        self.mid.block_2 = ResBlock(c_in, c_in, temb_ch, dropout)
        self.mid.proj = nn.Identity()
        up = []  # built from the lowest resolution upwards, stored in resolution order (up[0] is full resolution)
        for i in reversed(range(L)):
            level = nn.Module()
            c_out = ch * ch_mult[i]
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for j in range(num_res_blocks + 1):
                c_skip = ch * (in_mult[i] if j == num_res_blocks else ch_mult[i])
                level.block.append(ResBlock(c_in + c_skip, c_out, temb_ch, dropout))
                c_in = c_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(c_out))
            if i != 0:
                level.upsample = Resample(c_out, up=True)
                res *= 2
            level.proj = nn.Identity()
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    @classmethod
    def from_preset(cls, name, **overrides):
        """Build a UNet from a PRESETS entry, with constructor arguments overridden by keyword."""
        return cls(**{**preset_config(name), **overrides})

    @property
    def has_projections(self):
        """Whether any DeMe channel-wise projection is present (folded ones are gone)."""
        return any(isinstance(module.proj, nn.Conv2d) for _, module in projection_places(self))

    def forward(self, x, t):
        """Predict the noise eps_theta(x_t, t) for x (B, C, H, W) in [-1, 1] and integer timesteps t (B,)."""
        B = x.shape[0]
        factor = 2 ** (self.num_levels - 1)
        assert x.ndim == 4 and x.shape[1] == self.config["in_channels"], f"input {tuple(x.shape)}: not (B, C, H, W)"
        assert x.shape[2] % factor == 0 == x.shape[3] % factor, f"input {tuple(x.shape)}: H, W not multiples of {factor}"
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        t = t.expand(B) if t.numel() == 1 else t
        assert t.numel() == B, f"{t.numel()} timesteps for a batch of {B}"
        temb = timestep_embedding(t, self.config["ch"]).to(self.conv_in.weight.dtype)  # (B, ch)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))  # (B, 4ch)
        hs = [self.conv_in(x)]  # skip tensors, consumed last-in first-out by the up path
        h = hs[0]
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h, temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
                hs.append(h)
            h = level.proj(h)  # main path only: the skip list keeps the un-projected tensor
        h = self.mid.block_1(h, temb)
        h = self.mid.block_2(self.mid.attn_1(h), temb)
        h = self.mid.proj(h)
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)  # (B, C + C_skip, H, W) -> (B, C, H, W)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
            h = level.proj(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)


# --- DeMe channel-wise projections (DeMe Sec. 3.2; placement as in the official code) ---------------------------------

def projection_places(model):
    """(name, module) of every place that can hold a projection: down levels, mid block, up levels."""
    places = [(f"down.{i}", level) for i, level in enumerate(model.down)] + [("mid", model.mid)]
    return places + [(f"up.{i}", level) for i, level in enumerate(model.up)]


def _add_projection(module, channels, like):
    """Put an identity-initialised bias-free 1x1 conv W (C x C) at `module.proj`."""
    proj = nn.Conv2d(channels, channels, 1, bias=False).to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(channels, dtype=like.dtype, device=like.device)[:, :, None, None])
    module.proj = proj


def _place_channels(model, name):
    """Channel count of the main-path feature map at a projection place."""
    return model.config["ch"] * model.config["ch_mult"][-1 if name == "mid" else int(name.split(".")[1])]


def add_channel_projections(model):
    """Add DeMe's identity-initialised channel projections in place where none is (so calling it twice is a no-op)."""
    like = model.conv_in.weight
    for name, module in projection_places(model):
        if not isinstance(module.proj, nn.Conv2d):
            _add_projection(module, _place_channels(model, name), like)
    return model


@torch.no_grad()
def fold_channel_projections(model):
    """Fold each projection that follows an upsample conv into that conv (W' = P W, b' = P b); return how many."""
    folded = 0
    for i, level in enumerate(model.up):
        if i == 0 or not isinstance(level.proj, nn.Conv2d):
            continue
        conv, P = level.upsample.conv, level.proj.weight[:, :, 0, 0].double()  # P: (C, C)
        conv.weight.copy_(torch.einsum("oc,cikl->oikl", P, conv.weight.double()))
        conv.bias.copy_(P @ conv.bias.double())
        level.proj = nn.Identity()
        folded += 1
    return folded


# --- State dicts: original layout <-> diffusers UNet2DModel -----------------------------------------------------------

_RESNET_TO_DIFFUSERS = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}
_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_FROM_DIFFUSERS = {v: k for k, v in _RESNET_TO_DIFFUSERS.items()}
_ATTN_FROM_DIFFUSERS = {**{v: k for k, v in _ATTN_TO_DIFFUSERS.items()},
                        "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # names before diffusers 0.14
_RESNET, _ATTN = (_RESNET_TO_DIFFUSERS, _RESNET_FROM_DIFFUSERS), (_ATTN_TO_DIFFUSERS, _ATTN_FROM_DIFFUSERS)
_SAME = ({}, {})
# (original key, diffusers key, renames of the last module): {s} down or up, {i} the level (diffusers counts up levels
# from the lowest resolution, the original from the highest), {j} a block, {r} the rest of the key
_KEY_MAP = [("{s}.{i}.block.{j}.{r}", "{s}_blocks.{i}.resnets.{j}.{r}", _RESNET),
            ("{s}.{i}.attn.{j}.{r}", "{s}_blocks.{i}.attentions.{j}.{r}", _ATTN),
            ("down.{i}.downsample.{r}", "down_blocks.{i}.downsamplers.0.{r}", _SAME),
            ("up.{i}.upsample.{r}", "up_blocks.{i}.upsamplers.0.{r}", _SAME),
            ("mid.block_1.{r}", "mid_block.resnets.0.{r}", _RESNET),
            ("mid.block_2.{r}", "mid_block.resnets.1.{r}", _RESNET),
            ("mid.attn_1.{r}", "mid_block.attentions.0.{r}", _ATTN),
            ("temb.dense.0.{r}", "time_embedding.linear_1.{r}", _SAME),
            ("temb.dense.1.{r}", "time_embedding.linear_2.{r}", _SAME), ("norm_out.{r}", "conv_norm_out.{r}", _SAME)]
_FIELDS = {"{s}": r"(?P<s>down|up)", "{i}": r"(?P<i>\d+)", "{j}": r"(?P<j>\d+)", "{r}": r"(?P<r>.+)"}


def _rename(rest, table):
    """Rename the module part of 'module.param' through table."""
    name, _, param = rest.rpartition(".")
    return f"{table.get(name, name)}.{param}"


def _strip_prefixes(sd):
    """Drop the 'module.' (DataParallel/DDP) and '_orig_mod.' (torch.compile) components from every key."""
    return {".".join(p for p in k.split(".") if p not in ("module", "_orig_mod")): v for k, v in sd.items()}


def _convert_key(key, L, to_diffusers):
    """One state-dict key from the original layout to diffusers UNet2DModel's (to_diffusers) or back."""
    for native, diffusers, renames in _KEY_MAP:
        src, dst = (native, diffusers) if to_diffusers else (diffusers, native)
        m = re.fullmatch("".join(_FIELDS.get(p, re.escape(p)) for p in re.split(r"(\{\w\})", src)), key)
        if m:
            g = m.groupdict()
            if "i" in g and g.get("s", src[:2]) == "up":
                g["i"] = L - 1 - int(g["i"])
            table = renames[0 if to_diffusers else 1]
            return dst.format(**{**g, "r": _rename(g["r"], table) if table else g["r"]})
    return key


def _is_attn_linear(native_key):
    """Whether a native key is a q/k/v/proj_out weight (a 1x1 conv here, a Linear in diffusers)."""
    return re.search(r"(\.attn\.\d+|\.attn_1)\.(q|k|v|proj_out)\.weight$", native_key) is not None


def convert_diffusers_state_dict(sd):
    """Map a diffusers UNet2DModel state dict to the original layout (original key names <-> UNet2DModel's)."""
    sd = _strip_prefixes(sd)
    levels = [int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.(\d+)\.", k))]
    if not levels:
        raise UserError("state dict has no down_blocks.* keys, so it is not a diffusers UNet2DModel")
    L = max(levels) + 1
    out = {}
    for key, value in sd.items():
        native = _convert_key(key, L, to_diffusers=False)
        out[native] = value[:, :, None, None] if _is_attn_linear(native) and value.ndim == 2 else value
    return out


def diffusers_config(config):
    """The diffusers UNet2DModel config (config.json) of a UNet config; these values give the DDPM numerics."""
    L, res = len(config["ch_mult"]), config["resolution"]
    attn = [res // 2 ** i in config["attn_resolutions"] for i in range(L)]
    return {
        "_class_name": "UNet2DModel", "act_fn": "silu", "add_attention": True, "attention_head_dim": None,
        "block_out_channels": [config["ch"] * m for m in config["ch_mult"]], "center_input_sample": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn], "downsample_padding": 0,
        "dropout": config["dropout"], "flip_sin_to_cos": False, "freq_shift": 1, "layers_per_block":
        config["num_res_blocks"], "in_channels": config.get("in_channels", 3), "mid_block_scale_factor": 1,
        "norm_eps": 1e-6, "norm_num_groups": 32, "out_channels": config.get("out_channels", 3),
        "resnet_time_scale_shift": "default", "sample_size": res, "time_embedding_type": "positional",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]}


# Config fields that change the numerics: (what the DDPM UNet needs, diffusers' default when the field is absent).
_DIFFUSERS_FIXED = {
    "act_fn": ("silu", "silu"), "add_attention": (True, True), "center_input_sample": (False, False),
    "class_embed_type": (None, None), "downsample_padding": (0, 1), "downsample_type": ("conv", "conv"),
    "flip_sin_to_cos": (False, True), "freq_shift": (1, 0), "mid_block_scale_factor": (1, 1),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"), "norm_eps": (1e-6, 1e-5), "norm_num_groups": (32, 32),
    "num_class_embeds": (None, None), "resnet_time_scale_shift": ("default", "default"),
    "time_embedding_dim": (None, None), "time_embedding_type": ("positional", "positional"),
    "upsample_type": ("conv", "conv"),
}


def config_from_diffusers(cfg, where="config.json"):
    """The UNet config of a diffusers UNet2DModel config.json; UserError if it is not Ho et al.'s architecture."""
    for field, (need, default) in _DIFFUSERS_FIXED.items():
        if cfg.get(field, default) != need:
            raise UserError(f"{where}: {field} = {cfg.get(field, default)!r}, but the DDPM UNet needs {need!r}; "
                            "this is not a DDPM (Ho et al.) UNet2DModel")
    channels = list(cfg.get("block_out_channels", (224, 448, 672, 896)))
    down = list(cfg.get("down_block_types", ("DownBlock2D",) + ("AttnDownBlock2D",) * 3))
    up = list(cfg.get("up_block_types", ("AttnUpBlock2D",) * 3 + ("UpBlock2D",)))
    size = cfg.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) else size
    head_dim = cfg.get("attention_head_dim", 8)
    attn = [d == "AttnDownBlock2D" for d in down]
    mirror = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if (set(down) - {"DownBlock2D", "AttnDownBlock2D"} or up != mirror or size is None
            or any(c % channels[0] for c in channels)):
        raise UserError(f"{where}: blocks {down} / {up}, channels {channels}, sample_size {size} do not describe a "
                        "DDPM UNet (plain or Attn down/up blocks mirrored, channels multiples of the first)")
    if head_dim is not None and any(c != head_dim for c, a in zip(channels + channels[-1:], attn + [True]) if a):
        raise UserError(f"{where}: attention_head_dim = {head_dim} means multi-head attention; the DDPM UNet has one "
                        "head (attention_head_dim null)")
    return dict(ch=channels[0], ch_mult=[c // channels[0] for c in channels],
                num_res_blocks=cfg.get("layers_per_block", 2),
                attn_resolutions=[size // 2 ** i for i, a in enumerate(attn) if a], dropout=cfg.get("dropout", 0.0),
                resolution=size, in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3))


# --- Files ------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path, sync=True):
    """The one atomic write: the block writes a temporary file beside `path` (same suffix, so writers pick the
    format), which is synced (`sync`; the many sample PNGs skip it) and renamed over `path` only when the block
    completes, and removed when it fails: a crash never leaves half a file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    try:
        yield tmp
        if sync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path):
    """torch.save, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def download(url, path, digest, algorithm="md5"):
    """The one hash-checked download: `url` to `path` (atomically), kept only if the file's `algorithm` digest starts
    with `digest`; one line naming the manual fix when offline or when the file differs."""
    with atomic_path(path) as tmp:
        try:
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
        except Exception as e:  # offline, proxy, HTTP errors, disk full: all mean the same thing to the user
            raise UserError(f"could not download {url} ({type(e).__name__}: {' '.join(str(e).split())}); fetch it by "
                            f"hand and save it as {path}") from None
        got = file_digest(tmp, algorithm)
        if not got.startswith(digest):
            raise UserError(f"the download of {url} has {algorithm.upper()} {got}, expected {digest}...; try again, "
                            f"or fetch it by hand and save it as {path}")
    return path


def _is_tensor_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def load_state_dict_file(path, key=None):
    """Read a dict of tensors from .pt/.pth/.ckpt/.bin (weights_only) or .safetensors; training checkpoints give
    their 'ema' entry, else 'model' (or `key` when given)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; check the path")
    if path.endswith(".safetensors"):
        try:
            import safetensors.torch
        except ImportError:
            raise UserError(f"{path} is a safetensors file and the safetensors package is missing; "
                            "run `pip install safetensors`") from None
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:  # the parser raises its own error types for truncated or corrupt files
            raise UserError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt, "
                            "fetch it again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only met something other than tensors and plain containers
        raise UserError(f"{path} holds more than tensors and was refused for safety (torch.load weights_only=True); "
                        "load only files you trust, saved as a state dict of tensors") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}); it is truncated or corrupt, "
                        "fetch it again") from None
    if _is_tensor_dict(obj) and key is None:
        return obj
    keys = [key] if key is not None else ["ema", "model", "state_dict"]
    for k in keys:
        if isinstance(obj, dict) and _is_tensor_dict(obj.get(k)):
            return obj[k]
    found = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise UserError(f"{path}: found no state dict of tensors under {' or '.join(map(repr, keys))} (it holds {found}); "
                    "pass a weights file or a training checkpoint with an 'ema' or 'model' entry")


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _build(config, projections):
    """A UNet on the meta device (no memory, no init) with projections at the given places."""
    with torch.device("meta"):
        model = UNet(**config)
        for name, module in projection_places(model):
            if name in projections:
                _add_projection(module, _place_channels(model, name), model.conv_in.weight)
    return model


def model_from_state_dict(sd, preset=None):
    """Build a UNet that fits sd (original or diffusers layout, projections where sd has them) and load it
    strictly; preset is a PRESETS name, a UNet config dict, or None to infer it from the tensor shapes."""
    sd = _strip_prefixes(sd)
    if any(k.startswith("down_blocks.") for k in sd):
        sd = convert_diffusers_state_dict(sd)
    projections = {m.group(1) for k in sd if (m := re.fullmatch(r"(down\.\d+|mid|up\.\d+)\.proj\.weight", k))}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if preset is None:
        matches = [name for name, cfg in PRESETS.items() if _shapes(_build(cfg, projections)) == got]
        if not matches:
            raise UserError(f"the checkpoint's tensor shapes (conv_in.weight {got.get('conv_in.weight')}, "
                            f"{len(got)} tensors) fit none of the presets {', '.join(PRESETS)}; pass the preset or "
                            "the UNet config it was trained with")
        preset = matches[0]
    config = preset_config(preset) if isinstance(preset, str) else preset
    model = _build(config, projections)
    want = _shapes(model)
    problems = [f"{k}: checkpoint {got[k]} vs model {want[k]}" for k in want if k in got and got[k] != want[k]][:4]
    problems += [f"missing {k}" for k in want if k not in got][:4]
    problems += [f"unexpected {k}" for k in got if k not in want][:4]
    if problems:
        raise UserError(f"checkpoint does not fit the UNet {preset if isinstance(preset, str) else config}: "
                        f"{'; '.join(problems)}; pass the preset or config it was trained with")
    model.load_state_dict({k: v.detach().to("cpu", torch.float32, copy=True) for k, v in sd.items()},
                          strict=True, assign=True)
    return model


def file_digest(path, algorithm="md5"):
    """Hex digest of a file (hashlib's `algorithm`), read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_file(name):
    """Path of a PRETRAINED checkpoint: in assets/ (MD5-checked), or in the torch hub cache, downloaded once
    (MD5-checked) when missing."""
    info = PRETRAINED[name]
    if info.get("local"):
        path = os.path.join(ASSETS, info["file"])
        md5 = file_digest(path) if os.path.isfile(path) else None
        if md5 != info["md5"]:
            raise UserError(f"{path} is {'missing' if md5 is None else f'not the shipped file (MD5 {md5})'}; restore "
                            f"it with `git checkout -- assets/{info['file']}`, or pass your own θ0 as --pretrained PATH")
        return path
    path = os.path.join(torch.hub.get_dir(), "checkpoints", info["file"])
    if os.path.isfile(path):
        return path  # a file already in place is trusted: the MD5 is checked only right after downloading
    return str(download(info["url"], path, info["md5"]))


def load_pretrained(name_or_path, preset=None):
    """A UNet in eval mode, float32 on the CPU, from a PRETRAINED name, a weights file, or a diffusers directory."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path in PRETRAINED:
        path, preset = _hub_file(name_or_path), preset or PRETRAINED[name_or_path]["preset"]
    elif os.path.isdir(name_or_path):
        root = name_or_path
        if not os.path.isfile(os.path.join(root, "config.json")) and os.path.isdir(os.path.join(root, "unet")):
            root = os.path.join(root, "unet")  # a whole DDPMPipeline directory
        config_path = os.path.join(root, "config.json")
        weights = [w for ext in ("safetensors", "bin") if os.path.isfile(w := os.path.join(
            root, f"diffusion_pytorch_model.{ext}"))]
        if not os.path.isfile(config_path) or not weights:
            raise UserError(f"{name_or_path}: a diffusers model directory needs config.json and "
                            "diffusion_pytorch_model.safetensors or .bin; neither a file nor such a directory")
        with open(config_path) as f:
            preset = preset or config_from_diffusers(json.load(f), config_path)
        path = weights[0]
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        raise UserError(f"{name_or_path}: no such file or directory, and not a pretrained name "
                        f"({', '.join(PRETRAINED)})")
    return model_from_state_dict(load_state_dict_file(path), preset).eval()


def export_diffusers(model, directory):
    """Write config.json and the weights of a projection-free UNet so that diffusers' UNet2DModel loads them."""
    kept = [name for name, m in projection_places(model) if isinstance(m.proj, nn.Conv2d)
            and not torch.equal(m.proj.weight.flatten(1), torch.eye(len(m.proj.weight)).to(m.proj.weight))]
    if kept:
        raise UserError(f"cannot export to diffusers: UNet2DModel has no channel projections and this model's "
                        f"{', '.join(kept)} are not the identity; keep it in the native layout "
                        "(atomic_save(model.state_dict(), path); load_pretrained(path))")
    sd = {k: v[:, :, 0, 0] if _is_attn_linear(k) else v for k, v in model.state_dict().items()
          if not k.endswith(".proj.weight")}  # the identity projections are dropped: they change nothing
    sd = {_convert_key(k, model.num_levels, to_diffusers=True): v.detach().to("cpu").contiguous()
          for k, v in sd.items()}
    config = json.dumps(diffusers_config(model.config), indent=2, sort_keys=True).encode()
    try:
        import safetensors.torch
        with atomic_path(os.path.join(directory, "diffusion_pytorch_model.safetensors")) as tmp:
            tmp.write_bytes(safetensors.torch.save(sd, metadata={"format": "pt"}))
    except ImportError:
        atomic_save(sd, os.path.join(directory, "diffusion_pytorch_model.bin"))
    with atomic_path(os.path.join(directory, "config.json")) as tmp:
        tmp.write_bytes(config)
