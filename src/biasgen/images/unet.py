"""A DDPM-style U-Net that predicts the noise ``eps`` of an image (docs/method.md §1, §8).

The network sees only ``(x_t, t)`` (and a class label ``y`` when it has
``num_classes``): ``t`` enters through a sinusoidal embedding of its raw value,
so the model knows nothing of the noise schedule and works with any of them.

    net = UNet(channels=1, base_width=32, channel_mults=(1, 2), attention_levels=(1,), res_blocks=1)
    eps_hat = net(x_t, t)              # x_t: (B, 1, H, W), t: (B,) -> (B, 1, H, W)
    cond = UNet(channels=1, num_classes=10)
    eps_hat = cond(x_t, t, y)          # y: (B,) long in 0..10; label 10 (= num_classes) is "no label"
    net2 = UNet.from_config(net.config)  # the plain dict stored in the JSON sidecar

Level ``i`` runs at resolution ``H / 2**i`` with ``base_width * channel_mults[i]``
channels; ``attention_levels`` lists the levels that get self-attention
(level 0 is full resolution). The paper's CelebA network (docs/method.md §8) is the
``paper_config``: 32x32, width 32, multipliers (1, 2, 4), attention on levels
1 and 2, two res-blocks per level, GroupNorm(8), dropout 0.1.

All layers keep PyTorch's default initialisation, the output convolution
included: a zero-initialised output would make every model the same function
(``eps_hat = 0``) at step 0, so twins with different init seeds would start
out identical instead of converging towards each other first (docs/method.md §2).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BiasgenError

PAPER_CONFIG = dict(
    channels=1, base_width=32, channel_mults=(1, 2, 4), attention_levels=(1, 2), res_blocks=2, dropout=0.1, groups=8
)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of the raw step values ``t`` ``(B,)`` -> ``(B, dim)`` (``dim`` even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between and dropout before the second conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, in_ch, H, W)``, ``emb``: ``(B, emb_dim)`` -> ``(B, out_ch, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the ``H * W`` positions, with a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # each (B, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Block(nn.Module):
    """A ResBlock, followed by self-attention when ``attend``."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int, attend: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout, groups)
        self.attn = Attention(out_ch, groups) if attend else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class Downsample(nn.Module):
    """Stride-2 convolution: ``(B, C, H, W)`` -> ``(B, C, H/2, W/2)``."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling then a convolution: ``(B, C, H, W)`` -> ``(B, C, 2H, 2W)``."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_config(channels, base_width, channel_mults, attention_levels, res_blocks, dropout, groups) -> None:
    """Raise :class:`BiasgenError` naming the fix for any impossible U-Net setting."""
    if channels < 1:
        raise BiasgenError(f"U-Net channels must be >= 1 (1 for grayscale, 3 for RGB), got {channels}.")
    if not channel_mults or any(int(m) != m or m < 1 for m in channel_mults):
        raise BiasgenError(f"U-Net channel_mults must be a non-empty list of positive integers, got {channel_mults}.")
    if res_blocks < 1:
        raise BiasgenError(f"U-Net res_blocks must be >= 1, got {res_blocks}.")
    if not 0 <= dropout < 1:
        raise BiasgenError(f"U-Net dropout must be in [0, 1), got {dropout}.")
    if groups < 1 or base_width < 1 or base_width % groups:
        raise BiasgenError(
            f"U-Net base_width {base_width} must be a positive multiple of the GroupNorm groups {groups}; "
            f"set base_width to a multiple of {groups} (e.g. {max(groups, 1) * 4}) or change groups."
        )
    bad = [a for a in attention_levels if not 0 <= a < len(channel_mults)]
    if bad:
        raise BiasgenError(
            f"U-Net attention_levels {list(attention_levels)} contains {bad}, outside the "
            f"{len(channel_mults)} levels of channel_mults; use levels in 0..{len(channel_mults) - 1}."
        )


class UNet(nn.Module):
    """Predicts ``eps`` from ``(x_t, t)``; see the module docstring for the layout."""

    def __init__(
        self,
        channels: int = 1,  # image channels: 1 grayscale, 3 RGB
        base_width: int = 32,  # channels at level 0; a multiple of `groups`
        channel_mults: tuple = (1, 2, 4),  # width multiplier per level; level i runs at H / 2**i
        attention_levels: tuple = (1, 2),  # levels with self-attention (0 = full resolution)
        res_blocks: int = 2,  # ResBlocks per level on the way down (one more on the way up)
        dropout: float = 0.1,  # dropout inside every ResBlock
        groups: int = 8,  # GroupNorm groups
        num_classes: int = 0,  # class labels 0..num_classes-1 plus the null label num_classes; 0: unconditional
    ):
        super().__init__()
        channel_mults, attention_levels = tuple(channel_mults), tuple(attention_levels)
        _check_config(channels, base_width, channel_mults, attention_levels, res_blocks, dropout, groups)
        if num_classes < 0:
            raise BiasgenError(f"U-Net num_classes must be >= 0 (0: unconditional), got {num_classes}.")
        self.config = dict(
            channels=channels, base_width=base_width, channel_mults=list(channel_mults),
            attention_levels=list(attention_levels), res_blocks=res_blocks, dropout=dropout, groups=groups,
        )  # plain JSON types: rebuild with UNet.from_config
        if num_classes:
            self.config["num_classes"] = num_classes
        emb_dim = 4 * base_width
        self.base_width = base_width
        self.levels = len(channel_mults)
        self.time_mlp = nn.Sequential(nn.Linear(base_width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(channels, base_width, 3, padding=1)

        widths = [base_width * m for m in channel_mults]
        skip_ch = [base_width]  # channels of every skip tensor, in the order they are produced
        ch = base_width
        self.down = nn.ModuleList()
        for i, w in enumerate(widths):
            for _ in range(res_blocks):
                self.down.append(Block(ch, w, emb_dim, dropout, groups, i in attention_levels))
                ch = w
                skip_ch.append(ch)
            if i < self.levels - 1:
                self.down.append(Downsample(ch))
                skip_ch.append(ch)

        deepest_attends = self.levels - 1 in attention_levels
        self.mid = nn.ModuleList([
            Block(ch, ch, emb_dim, dropout, groups, deepest_attends),
            Block(ch, ch, emb_dim, dropout, groups, False),
        ])

        self.up = nn.ModuleList()
        for i in reversed(range(self.levels)):
            for _ in range(res_blocks + 1):
                self.up.append(Block(ch + skip_ch.pop(), widths[i], emb_dim, dropout, groups, i in attention_levels))
                ch = widths[i]
            if i > 0:
                self.up.append(Upsample(ch))

        self.out_norm = nn.GroupNorm(groups, ch)
        self.out = nn.Conv2d(ch, channels, 3, padding=1)
        # created last, so an unconditional network draws exactly the initial weights it always did
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    @classmethod
    def from_config(cls, config: dict) -> "UNet":
        """Build from a plain dict of the constructor's keyword arguments (as in :attr:`config`)."""
        known = set(PAPER_CONFIG) | {"num_classes"}
        unknown = set(config) - known
        if unknown:
            raise BiasgenError(
                f"Unknown U-Net setting(s) {sorted(unknown)}; the allowed keys are {sorted(known)}."
            )
        return cls(**config)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, C, H, W)`` float, ``t``: ``(B,)`` long or float steps, ``y``: ``(B,)`` long class labels in
        ``0..num_classes`` (``num_classes``: no label; None: no label for every image) -> ``eps_hat`` ``(B, C, H, W)``."""
        self._check_input(x, t)
        emb = self.time_mlp(timestep_embedding(t, self.base_width))
        if self.class_emb is not None:
            emb = emb + self.class_emb(null_labels(len(x), self.num_classes, x.device) if y is None else y)
        elif y is not None:
            raise BiasgenError("This U-Net is unconditional (num_classes = 0) and takes no class labels; "
                               "build it with num_classes to condition on labels.")
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, Block) else layer(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, Block) else layer(h)
        return self.out(F.silu(self.out_norm(h)))

    def _check_input(self, x: torch.Tensor, t: torch.Tensor) -> None:
        c = self.config["channels"]
        if x.ndim != 4 or x.shape[1] != c:
            raise BiasgenError(f"The U-Net expects images of shape (B, {c}, H, W), got {tuple(x.shape)}.")
        f = 2 ** (self.levels - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise BiasgenError(
                f"Image size {x.shape[2]}x{x.shape[3]} is not divisible by {f} = 2**(len(channel_mults)-1); "
                f"resize the images to a multiple of {f} (e.g. --resolution) or use fewer channel_mults."
            )
        if t.shape != (x.shape[0],):
            raise BiasgenError(f"The U-Net expects one step per image, t of shape ({x.shape[0]},), got {tuple(t.shape)}.")


def null_labels(n: int, num_classes: int, device=None) -> torch.Tensor:
    """``(n,)`` long: the "no label" class ``num_classes`` of a conditional network."""
    return torch.full((n,), num_classes, dtype=torch.long, device=device)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
