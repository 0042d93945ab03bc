"""The Vision Transformer backbone (Dosovitskiy et al., 2021), small enough to read top to bottom.

An image is cut into P x P patches, each patch is projected linearly to a D-dimensional token,
a learnable class token is prepended, a positional embedding is added and a stack of pre-norm
Transformer blocks mixes all tokens with self-attention. Every method in this package uses this
one backbone.

Parameter names follow timm's ``VisionTransformer`` exactly (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{i}.norm1``, ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``norm``,
``fc_norm``, ``head``), so weights from timm, DINO, MoCo v3 and MAE load with ``strict=True``.

Shape vocabulary: B batch, C channels, H/W pixels, P patch size, L patches, N = 1 + L tokens,
D width, h heads.

Hooks for masked image modelling live in ``forward_features``: ``keep_idx`` encodes only a
subset of patches (MAE), ``mask`` + ``mask_token`` swaps hidden patches for a learnable token
(SimMIM, BEiT). The backbone owns no mask token itself, so its state dict stays timm's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ViT",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_tiny_28",
    "vit_small_28",
    "vit_mini_28",
    "vit_tiny_32",
    "vit_small_32",
    "architecture",
    "sincos_pos_embed_2d",
    "resample_pos_embed",
]


# --------------------------------------------------------------------------- positional embeddings
def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> Tensor:
    """Fixed 2-D sine-cosine positional embedding (MAE): ((1 if cls) + gh*gw, D), class row zero.

    Half of the channels encode the row, half the column; each half is a 1-D sin/cos embedding
    with frequencies 1 / 10000^(2i/(D/2)).
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by 4 for a 2-D sin-cos embedding")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    omega = torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4.0)
    omega = 1.0 / 10000**omega  # (D/4,)

    def embed_1d(pos: Tensor) -> Tensor:  # (M,) -> (M, D/2)
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )
    # MAE puts the column (w) embedding first, then the row (h) one; we keep that order so the
    # official MAE checkpoints' fixed tables match ours bit for bit.
    emb = torch.cat([embed_1d(cols.reshape(-1)), embed_1d(rows.reshape(-1))], dim=1)  # (L, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def resample_pos_embed(
    pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None, num_prefix_tokens: int = 1
) -> Tensor:
    """Resize a (1, prefix + gh*gw, D) positional embedding to a new patch grid (bicubic, antialiased).

    The prefix (class) tokens are kept as they are; the patch part is treated as a D-channel
    image and interpolated, which is how DeiT, DINO and timm run a ViT at a new resolution.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, N, D), got {tuple(pos_embed.shape)}")
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(math.isqrt(num_patches))
        if side * side != num_patches:
            raise ValueError(f"pos_embed has {num_patches} patch rows, not a square grid; pass old_grid=(gh, gw)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_patches:
        raise ValueError(f"old_grid={old_grid} does not match the {num_patches} patch rows of pos_embed")
    new_grid = tuple(new_grid)
    if new_grid == tuple(old_grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    patches = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    patches = F.interpolate(patches.float(), size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


# --------------------------------------------------------------------------- building blocks
class PatchEmbed(nn.Module):
    """Image to patch tokens: a P x P convolution with stride P is one linear map per patch."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)


class Attention(nn.Module):
    """Multi-head self-attention. Fused kernel by default; a readable manual path returns weights."""

    fused_attn: bool = True  # class-wide switch; tests flip it to compare the two paths

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, N, D/h)
        if self.fused_attn and not return_attention:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
            attn = None
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, N, N): how much each token looks at each
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v  # (B, h, N, D/h)
        x = x.transpose(1, 2).reshape(B, N, D)  # heads side by side again
        x = self.proj_drop(self.proj(x))
        return (x, attn) if return_attention else x


class Mlp(nn.Module):
    """The per-token feed-forward network: D -> mlp_ratio*D -> D with GELU."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel learnable scale on a residual branch (CaiT); small init keeps deep nets stable."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, rescale the survivors."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True)
        else:
            y, attn = self.attn(self.norm1(x)), None
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attention else x


# --------------------------------------------------------------------------- the model
_POS_EMBEDS = ("learned", "sincos")
_POOLS = ("token", "avg")


class ViT(nn.Module):
    """Vision Transformer with timm's keyword names and parameter names.

    ``ViT(img_size=28, patch_size=4, in_chans=1, embed_dim=192, depth=12, num_heads=3)`` maps
    (B, C, H, W) images to (B, num_classes) logits, or to (B, D) features when ``num_classes=0``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = None,
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pos_embed: str = "learned",
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("img_size", img_size),
            ("patch_size", patch_size),
            ("in_chans", in_chans),
            ("embed_dim", embed_dim),
            ("depth", depth),
            ("num_heads", num_heads),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} must be an int >= 0 (0 gives features, no head)")
        if img_size % patch_size != 0:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if pos_embed not in _POS_EMBEDS:
            raise ValueError(f"pos_embed={pos_embed!r} is not one of {_POS_EMBEDS}")
        if global_pool not in _POOLS:
            raise ValueError(f"global_pool={global_pool!r} is not one of {_POOLS}")
        for name, p in (
            ("drop_rate", drop_rate),
            ("proj_drop_rate", proj_drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name}={p} must be in [0, 1)")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={mlp_ratio} must be > 0")

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.in_chans = in_chans
        self.num_prefix_tokens = 1
        self.pos_embed_type = pos_embed
        self.dynamic_img_size = dynamic_img_size

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # A fixed sin-cos table is still a Parameter (frozen), as in MAE, so it sits in the state
        # dict under timm's key and checkpoints carry it.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim), requires_grad=pos_embed == "learned"
        )
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i], init_values)
                for i in range(depth)
            ]
        )
        # timm: with average pooling the final norm moves after the pooling (fc_norm).
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ set-up
    def init_weights(self) -> None:
        """timm/MAE initialisation: truncated normal 0.02 for linears and tokens, xavier for the patch conv."""
        if self.pos_embed_type == "sincos":
            self.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.patch_embed.grid_size)[None])
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # treat the conv as the linear map it is
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def fix_sincos_pos_embed(self) -> None:
        """Replace the positional embedding by MAE's fixed 2-D sin-cos table (no longer trained)."""
        self.pos_embed_type = "sincos"
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.embed_dim, self.grid_size)[None])
        self.pos_embed.requires_grad_(False)

    def init_xavier(self, split_qkv: bool = False) -> None:
        """Re-initialise every ``nn.Linear`` xavier-uniform with zero bias, as MAE and MoCo v3 do.

        ``split_qkv=True`` is MoCo v3's variant: the fused ``qkv`` weight (3D, D) gets the bound
        of one (D, D) projection, sqrt(6 / (D + D)), instead of sqrt(6 / (3D + D)).
        """
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if split_qkv and name.endswith("attn.qkv"):
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names that AdamW should not decay."""
        return {"pos_embed", "cls_token"}

    @property
    def img_size(self) -> tuple[int, int]:
        return self.patch_embed.img_size

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def set_img_size(self, img_size: int) -> None:
        """Resample the positional embedding so the model runs on img_size x img_size images."""
        if not isinstance(img_size, int) or img_size <= 0 or img_size % self.patch_size != 0:
            raise ValueError(f"img_size={img_size!r} must be a positive multiple of patch_size={self.patch_size}")
        grid = (img_size // self.patch_size, img_size // self.patch_size)
        with torch.no_grad():
            if self.pos_embed_type == "sincos":
                new = sincos_pos_embed_2d(self.embed_dim, grid)[None].to(self.pos_embed)
            else:
                new = resample_pos_embed(self.pos_embed.data, grid, self.grid_size)
        self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)
        pe = self.patch_embed
        pe.img_size, pe.grid_size, pe.num_patches = (img_size, img_size), grid, grid[0] * grid[1]

    # ------------------------------------------------------------------ forward pieces
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, C, H, W) with 4 dims, got {x.ndim} dims {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x has {x.shape[1]} channels but the model was built with in_chans={self.in_chans}")
        if not x.is_floating_point():
            raise TypeError(f"x has dtype {x.dtype}; the model takes float images (uint8 pixels: x.float() / 255)")
        weight = self.patch_embed.proj.weight
        cast = torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
        if x.dtype != weight.dtype and not cast:  # else conv2d fails 14 frames deep
            raise TypeError(
                f"x has dtype {x.dtype} but the model's weights are {weight.dtype}; convert the images "
                f"(x.to({weight.dtype})) or the model (model.to({x.dtype}))"
            )
        H, W = x.shape[-2:]
        P = self.patch_size
        if self.dynamic_img_size:
            if H % P or W % P:
                raise ValueError(f"image size {H}x{W} is not divisible by patch_size={P}")
        elif (H, W) != self.img_size:
            raise ValueError(
                f"image size {H}x{W} does not match the model's img_size={self.img_size[0]}; resize the input, "
                f"call model.set_img_size({H}) to interpolate the positional embedding, or build the model "
                f"with dynamic_img_size=True"
            )

    def _pos_embed_for(self, H: int, W: int) -> Tensor:
        """(1, 1+L, D) positional embedding for an H x W input, interpolated if it differs."""
        grid = (H // self.patch_size, W // self.patch_size)
        if grid == self.grid_size:
            return self.pos_embed
        if self.pos_embed_type == "sincos":
            return sincos_pos_embed_2d(self.embed_dim, grid)[None].to(self.pos_embed)
        return resample_pos_embed(self.pos_embed, grid, self.grid_size)

    def prepare_tokens(
        self, x: Tensor, keep_idx: Tensor | None = None, mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> Tensor:
        """Patch-embed, swap in mask tokens, add positions, keep a subset, prepend cls: (B, 1+L', D)."""
        self._check_input(x)
        B, _, H, W = x.shape
        pos = self._pos_embed_for(H, W)
        x = self.patch_embed(x)  # (B, L, D)
        L = x.shape[1]
        if mask is not None:
            if mask_token is None:
                raise ValueError("mask was given without mask_token; pass the (1, 1, D) learnable mask token")
            if mask.shape != (B, L):
                raise ValueError(f"mask must have shape (B, L)=({B}, {L}), got {tuple(mask.shape)}")
            w = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1): 1 means hidden
            x = x * (1 - w) + mask_token.to(x.dtype) * w
        x = x + pos[:, 1:]  # positions are added after masking: the model knows where a hole is
        if keep_idx is not None:
            if keep_idx.ndim != 2 or keep_idx.shape[0] != B:
                raise ValueError(f"keep_idx must have shape (B, L_keep) with B={B}, got {tuple(keep_idx.shape)}")
            x = torch.gather(x, 1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, L_keep, D)
        cls = (self.cls_token + pos[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        return self.pos_drop(torch.cat([cls, x], dim=1))

    def forward_features(
        self, x: Tensor, keep_idx: Tensor | None = None, mask: Tensor | None = None, mask_token: Tensor | None = None
    ) -> Tensor:
        """(B, C, H, W) -> (B, 1+L, D) tokens after the last block and ``norm``.

        ``keep_idx`` (B, L_keep): encode only these patches per sample (MAE). ``mask`` (B, L),
        1 = hidden, with ``mask_token`` (1, 1, D): replace hidden patches before encoding (SimMIM).
        """
        x = self.prepare_tokens(x, keep_idx, mask, mask_token)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, x: Tensor) -> Tensor:
        """(B, N, D) tokens -> (B, D): the class token, or the mean of the patch tokens."""
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, N, D) tokens -> (B, num_classes) logits, or (B, D) pooled features if pre_logits."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head, e.g. before fine-tuning a pre-trained backbone."""
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"global_pool={global_pool!r} is not one of {_POOLS}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ inspection (DINO's API)
    def get_intermediate_layers(self, x: Tensor, n: int = 1, norm: bool = True) -> list[Tensor]:
        """Outputs of the last n blocks, each (B, N, D), normed with the final norm if ``norm``."""
        if not isinstance(n, int) or not 1 <= n <= len(self.blocks):
            raise ValueError(f"n={n!r} must be an int in [1, depth={len(self.blocks)}]")
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x) if norm else x)
        return out

    def get_last_selfattention(self, x: Tensor) -> Tensor:
        """Attention weights of the last block, (B, h, N, N); row 0 is where the class token looks."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        _, attn = self.blocks[-1](x, return_attention=True)
        return attn

    def get_selfattentions(self, x: Tensor) -> list[Tensor]:
        """Attention weights of every block, each (B, h, N, N): for attention-distance studies."""
        x = self.prepare_tokens(x)
        maps = []
        for blk in self.blocks:
            x, attn = blk(x, return_attention=True)
            maps.append(attn)
        return maps


def architecture(backbone: ViT) -> dict:
    """The ``ViT`` keyword arguments that rebuild ``backbone``'s structure, without a head.

    What a checkpoint card stores as ``"model"``: ``ViT(**architecture(b))`` loads ``b``'s state
    dict with ``strict=True``. (``init_values`` only marks that LayerScale exists; the weights hold
    its values.)
    """
    if not isinstance(backbone, ViT):
        raise TypeError(f"backbone must be a vitssl_core.ViT, got {type(backbone).__name__}")
    block = backbone.blocks[0]
    return {
        "img_size": backbone.img_size[0],
        "patch_size": backbone.patch_size,
        "in_chans": backbone.in_chans,
        "num_classes": 0,
        "global_pool": backbone.global_pool,
        "embed_dim": backbone.embed_dim,
        "depth": len(backbone.blocks),
        "num_heads": backbone.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / backbone.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "init_values": 1e-5 if isinstance(block.ls1, LayerScale) else None,
        "fc_norm": isinstance(backbone.fc_norm, nn.LayerNorm),
        "pos_embed": backbone.pos_embed_type,
        "dynamic_img_size": backbone.dynamic_img_size,
    }


# --------------------------------------------------------------------------- presets
def _preset(defaults: dict) -> Callable[..., ViT]:
    def build(**overrides) -> ViT:
        return ViT(**{**defaults, **overrides})

    return build


_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)

vit_tiny = _preset(dict(img_size=224, patch_size=16, **_TINY))
vit_tiny.__doc__ = "ViT-Ti/16 at 224 px (DeiT-Tiny): D=192, 12 blocks, 3 heads, 5.7M parameters."
vit_small = _preset(dict(img_size=224, patch_size=16, **_SMALL))
vit_small.__doc__ = "ViT-S/16 at 224 px: D=384, 12 blocks, 6 heads, 22M parameters."
vit_base = _preset(dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12))
vit_base.__doc__ = "ViT-B/16 at 224 px: D=768, 12 blocks, 12 heads, 86M parameters."
vit_tiny_28 = _preset(dict(img_size=28, patch_size=4, in_chans=1, **_TINY))
vit_tiny_28.__doc__ = "ViT-Tiny for 28x28 grey images (Fashion-MNIST): patch 4, a 7x7 grid of 49 patches."
vit_small_28 = _preset(dict(img_size=28, patch_size=4, in_chans=1, **_SMALL))
vit_small_28.__doc__ = "ViT-Small for 28x28 grey images: patch 4, 49 patches."
vit_mini_28 = _preset(dict(img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=6, num_heads=4))
vit_mini_28.__doc__ = (
    "A CPU-sized ViT for 28x28 grey images: patch 7 (a 4x4 grid of 16 patches), D=128, 6 blocks, "
    "4 heads, 1.2M parameters; the architecture of the shipped checkpoints."
)
vit_tiny_32 = _preset(dict(img_size=32, patch_size=4, in_chans=3, **_TINY))
vit_tiny_32.__doc__ = "ViT-Tiny for 32x32 colour images (CIFAR-10): patch 4, an 8x8 grid of 64 patches."
vit_small_32 = _preset(dict(img_size=32, patch_size=4, in_chans=3, **_SMALL))
vit_small_32.__doc__ = "ViT-Small for 32x32 colour images: patch 4, 64 patches."
