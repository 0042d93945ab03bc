"""Masked Autoencoders (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners").

Hide most patches (75 %) at random, encode only the visible ones with the ViT, then let a
small decoder put a shared mask token at every hidden position and regress the hidden pixels.
The encoder never sees a mask token, so its cost falls with the mask ratio; the loss is the
mean squared error over hidden patches only, against pixels normalised per patch
(``norm_pix_loss``).

The module follows facebookresearch/mae ``models_mae.py``: methods in the algorithm's order
(patchify, random_masking, forward_encoder, forward_decoder, forward_loss, forward), and
``forward`` returns ``(loss, pred, mask)``. Its state dict has exactly the keys of
``MaskedAutoencoderViT``: the encoder's timm keys at the top level (``cls_token``,
``pos_embed``, ``patch_embed.proj.weight``, ``blocks.0...``, ``norm.weight``) next to
``mask_token``, ``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks``,
``decoder_norm`` and ``decoder_pred``, so an official pre-training checkpoint loads with
``strict=True``.

Mask convention (``vitssl_core.masking``): mask == 1 means hidden; ids_restore undoes the shuffle.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import validate
from .masking import patchify, random_masking, unpatchify
from .vit import Block, ViT, sincos_pos_embed_2d

__all__ = ["MAE", "is_decoder_key", "decoder_state_dict"]

_BACKBONE = "backbone."
# MAE's own top-level names; every other key belongs to the encoder.
DECODER_NAMES = ("mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred")


def _strip_backbone_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict post-hook: ``<prefix>backbone.blocks.0...`` -> ``<prefix>blocks.0...``.

    Our keys are also put in MaskedAutoencoderViT's order: encoder tensors (cls_token,
    pos_embed), MAE's tensors (mask_token, decoder_pos_embed), encoder modules, decoder modules.
    """
    items = list(state_dict.items())
    state_dict.clear()
    ours = []
    for key, value in items:
        if not key.startswith(prefix):
            state_dict[key] = value
            continue
        name = key[len(prefix) :]
        backbone = name.startswith(_BACKBONE)
        name = name[len(_BACKBONE) :] if backbone else name
        group = (0 if backbone else 1) if "." not in name else (2 if backbone else 3)
        ours.append((group, prefix + name, value))
    for _, key, value in sorted(ours, key=lambda t: t[0]):  # stable: order within a group kept
        state_dict[key] = value


def is_decoder_key(key: str) -> bool:
    """Whether a key of MAE's state dict belongs to the decoder (its mask token included), not the encoder."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str (a state-dict key), got {type(key).__name__}")
    return key.split(".", 1)[0] in DECODER_NAMES


def decoder_state_dict(state: dict) -> dict:
    """The decoder's entries of an MAE state dict (``mask_token``, ``decoder_*``), in their order."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors (a state dict), got {type(state).__name__}")
    return {k: v for k, v in state.items() if is_decoder_key(k)}


def _add_backbone_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: the inverse renaming; keys already under ``backbone.`` are left alone."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        if not is_decoder_key(name) and not name.startswith(_BACKBONE):
            state_dict[prefix + _BACKBONE + name] = state_dict.pop(key)


class MAE(nn.Module):
    """Masked autoencoder around a ``ViT`` encoder: ``loss, pred, mask = mae(imgs)``.

    The encoder is held as ``self.backbone`` (a real submodule: ``.to``, ``.train``, parameters
    and the optimizer see it as usual). Only the state dict is renamed, by two hooks that drop
    and restore the ``backbone.`` prefix, so it reads like MAE's ``MaskedAutoencoderViT``. We
    chose hooks over registering the encoder's children on MAE directly because the encoder stays
    the single owner of its parameters: ``backbone.set_img_size`` or ``load_state_dict(...,
    assign=True)`` replace a Parameter, and a second reference held by MAE would go stale.

    With ``init_encoder=True`` (the default, for pre-training from scratch) the encoder is set
    up as ``models_mae.py`` sets up its own: ``pos_embed`` becomes the fixed 2-D sin-cos table
    (not trained) and every Linear is re-initialised xavier-uniform with zero bias (MAE follows
    the JAX ViT here; timm's truncated normal 0.02 is 3x narrower at D=128). Pass
    ``init_encoder=False`` to keep a given encoder's weights, e.g. to continue pre-training.
    The decoder is always initialised as in MAE: xavier linears, fixed sin-cos positions.

    Deviations from facebookresearch/mae that we keep:

    - ``cls_token`` and ``mask_token`` are not weight-decayed (MAE's ``add_weight_decay`` decays
      every tensor of more than one dimension); one no-decay rule serves every method here, and
      both tokens are a few hundred numbers.
    """

    def __init__(
        self,
        encoder: ViT,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        mlp_ratio: float = 4.0,
        init_encoder: bool = True,
    ):
        super().__init__()
        if not isinstance(encoder, ViT):
            raise TypeError(f"encoder must be a vitssl_core.ViT, got {type(encoder).__name__}")
        for name, value in (
            ("decoder_embed_dim", decoder_embed_dim),
            ("decoder_depth", decoder_depth),
            ("decoder_num_heads", decoder_num_heads),
        ):
            validate.positive_int(name, value)
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim={decoder_embed_dim} is not divisible by decoder_num_heads={decoder_num_heads}"
            )
        if decoder_embed_dim % 4:
            raise ValueError(f"decoder_embed_dim={decoder_embed_dim} must be divisible by 4 (2-D sin-cos positions)")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r} must be in [0, 1)")
        self.mask_ratio = float(mask_ratio)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.backbone = encoder
        if init_encoder:
            encoder.fix_sincos_pos_embed()
            encoder.init_xavier()
        P, C = encoder.patch_size, encoder.in_chans

        # --- decoder: sees every position, visible latents and mask tokens alike
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos = sincos_pos_embed_2d(decoder_embed_dim, encoder.grid_size)[None]  # (1, 1+L, Dd), fixed
        self.decoder_pos_embed = nn.Parameter(pos, requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, P * P * C)  # one token -> one patch of pixels
        self._init_decoder()
        self.register_state_dict_post_hook(_strip_backbone_prefix)
        self.register_load_state_dict_pre_hook(_add_backbone_prefix)

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_norm, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # MAE follows the JAX ViT here
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def encoder(self) -> ViT:
        """The ViT encoder (the same object as ``backbone``)."""
        return self.backbone

    # ------------------------------------------------------------------ the algorithm, in order
    def patchify(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, P*P*C), MAE's pixel order."""
        return patchify(imgs, self.backbone.patch_size)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, P*P*C) -> (B, C, H, W)."""
        return unpatchify(x, self.backbone.patch_size, self.backbone.in_chans, self.backbone.grid_size)

    def random_masking(
        self, batch_size: int, mask_ratio: float, noise: Tensor | None = None, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """ids_keep (B, L_keep), mask (B, L) with 1 = hidden, ids_restore (B, L)."""
        return random_masking(batch_size, self.backbone.num_patches, mask_ratio, noise=noise, device=device)

    def forward_encoder(
        self, imgs: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode the visible patches only: latent (B, 1+L_keep, D), mask (B, L), ids_restore (B, L)."""
        if not isinstance(imgs, Tensor) or imgs.ndim != 4 or tuple(imgs.shape[-2:]) != self.backbone.img_size:
            shape = tuple(imgs.shape) if isinstance(imgs, Tensor) else type(imgs).__name__
            raise ValueError(
                f"imgs must be (B, {self.backbone.in_chans}, {self.backbone.img_size[0]}, "
                f"{self.backbone.img_size[1]}) for this MAE, got {shape}"
            )
        ids_keep, mask, ids_restore = self.random_masking(imgs.shape[0], mask_ratio, noise, imgs.device)
        latent = self.backbone.forward_features(imgs, keep_idx=ids_keep)  # (B, 1+L_keep, D)
        return latent, mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Latent (B, 1+L_keep, D) -> per-patch pixel predictions (B, L, P*P*C) in patch order."""
        x = self.decoder_embed(latent)  # (B, 1+L_keep, Dd)
        B, N, Dd = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L + 1 - N, -1)  # one per hidden patch
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # back to patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1+L, P*P*C)
        return x[:, 1:]  # drop the class token

    def target(self, imgs: Tensor) -> Tensor:
        """Regression target (B, L, P*P*C): patches, each normalised by its own mean and variance
        (unbiased, + 1e-6, as in MAE) when ``norm_pix_loss``."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error per patch, averaged over hidden patches only (mask == 1)."""
        loss = (pred.float() - self.target(imgs).float()) ** 2
        loss = loss.mean(dim=-1)  # (B, L): mean over the pixels of a patch
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> (loss scalar, pred (B, L, P*P*C), mask (B, L) with 1 = hidden)."""
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    # ------------------------------------------------------------------ trainer and figures
    def training_step(self, batch: tuple[Tensor, Tensor] | list | Tensor) -> tuple[Tensor, dict[str, float]]:
        """``batch = (images (B, C, H, W), labels)``; labels are ignored."""
        imgs = batch[0] if isinstance(batch, (tuple, list)) else batch
        loss, _, _ = self(imgs)
        return loss, {"loss": loss.detach().item()}

    @torch.no_grad()
    def reconstruct(
        self, imgs: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """For figures: (masked_imgs, reconstruction, pasted), each (B, C, H, W).

        ``masked_imgs`` has hidden patches set to 0; ``reconstruction`` is the decoder's output
        in pixel space (with ``norm_pix_loss`` each predicted patch is un-normalised with that
        patch's own mean and variance, as MAE's figures do); ``pasted`` is the reconstruction
        with the visible patches pasted back from the input.
        """
        _, pred, mask = self(imgs, mask_ratio, noise)
        patches = self.patchify(imgs)  # (B, L, P*P*C)
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            var = patches.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        m = mask.unsqueeze(-1).to(patches.dtype)  # (B, L, 1)
        masked_imgs = self.unpatchify(patches * (1 - m))
        reconstruction = self.unpatchify(pred.to(patches.dtype))
        pasted = self.unpatchify(patches * (1 - m) + pred.to(patches.dtype) * m)
        return masked_imgs, reconstruction, pasted
