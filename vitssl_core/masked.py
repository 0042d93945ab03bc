"""Masked image modelling with a mask token in the encoder: SimMIM and BEiT-style token prediction.

Unlike MAE (``mae.py``), both methods run the *full* sequence through the ViT, with a learnable
``mask_token`` in place of every hidden patch (the ViT's ``forward_features(x, mask=...,
mask_token=...)`` hook), and predict something for the hidden patches only:

- ``SimMIM`` (Xie et al., 2022, "SimMIM: A Simple Framework for Masked Image Modeling"): patches
  hidden in random squares of 2x2 patches; a linear head regresses the raw pixels of each
  hidden patch; L1 loss over hidden pixels.
- ``BEiT`` (Bao et al., 2022, "BEiT: BERT Pre-Training of Image Transformers"): hidden patches
  chosen by block-wise masking; a linear head classifies each hidden patch into a discrete
  "visual word", and the loss is the cross-entropy of the true words (the article's
  L = - sum_i y_i log y_hat_i, summed over the hidden patches, ``masked_token_cross_entropy``).
  BEiT's words come from DALL-E's dVAE; here a k-means codebook over patches
  (``PatchTokenizer``) plays that role, which fits Fashion-MNIST in seconds.

Mask convention (``vitssl_core.masking``): mask == 1 means hidden.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import validate
from .masking import block_masking, default_min_block, patchify, unit_masking, unpatchify
from .vit import ViT

__all__ = ["BEiT", "PatchTokenizer", "SimMIM", "masked_token_cross_entropy"]


def _check_encoder(encoder) -> None:
    if not isinstance(encoder, ViT):
        raise TypeError(f"encoder must be a vitssl_core.ViT, got {type(encoder).__name__}")


Batch = tuple[Tensor, Tensor] | list | Tensor  # what the DataLoader yields: (images, labels)


def _images(batch: Batch) -> Tensor:
    """The images of a trainer batch ``(images, labels)`` (or a bare tensor)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# --------------------------------------------------------------------------- the loss
def masked_token_cross_entropy(logits: Tensor, target_ids: Tensor, mask: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the true token of every hidden patch: - sum_{i: mask_i = 1} log p_i(target_i).

    logits (B, L, K), target_ids (B, L) long, mask (B, L) with 1 = hidden; visible patches do
    not count. ``reduction="sum"`` is the article's formula; ``"mean"`` divides by the number
    of hidden patches (BEiT's training loss).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} must be 'sum' or 'mean'")
    if logits.ndim != 3:
        raise ValueError(f"logits must be (B, L, K), got {tuple(logits.shape)}")
    if target_ids.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"target_ids {tuple(target_ids.shape)} and mask {tuple(mask.shape)} must both be "
            f"(B, L)={tuple(logits.shape[:2])} to match logits"
        )
    B, L, K = logits.shape
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # a log-softmax in half precision loses the small probabilities
    ce = F.cross_entropy(logits.reshape(B * L, K), target_ids.reshape(B * L), reduction="none")
    mask = mask.to(ce.dtype)
    total = (ce.view(B, L) * mask).sum()  # no boolean indexing: no host sync on GPUs
    return total if reduction == "sum" else total / mask.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- SimMIM
class SimMIM(nn.Module):
    """SimMIM: mask token in, pixels out. ``loss, pred, mask = simmim(imgs)``.

    Masking follows SimMIM's ``MaskGenerator`` (``masking.unit_masking``): the patch grid is cut
    into squares of ``mask_unit`` x ``mask_unit`` patches and ``ceil(units * mask_ratio)`` random
    squares are hidden. SimMIM hides 32-pixel squares over 16-pixel patches, ``mask_unit=2``;
    that is the default whenever the grid is even (vit_mini_28: 4x4 patches of 7 px, 2x2 units
    of 14 px), and 1 (single patches) on an odd grid such as 7x7. An explicit unit must divide
    the grid. ``mask_ratio=0.6`` is SimMIM's.

    Kept deviations from microsoft/SimMIM, and why:

    - The backbone is the package's ViT, shared by every method so that checkpoints compare:
      absolute position embeddings, no LayerScale (SimMIM: 0.1), no shared relative position
      bias, no 1/sqrt(2 * layer) rescale of ``attn.proj`` / ``mlp.fc2``.
    - On a 4x4 grid there are only 4 units, so SimMIM's count rule hides 3 of them: 75 % of the
      patches at ``mask_ratio=0.6`` (SimMIM at 224 px: 30 of 49 units, 61 %). The rule is kept
      as is; a unit is also half the image side here, against 1/7 in SimMIM.
    - The mask is drawn per batch inside ``forward`` (one independent mask per sample), not per
      image in the data loader; the distribution is the same.
    - The decoder is one linear layer per token, SimMIM's 1x1 convolution + PixelShuffle up to
      a fixed order of its outputs (not a deviation). ``mask_token`` is drawn from N(0, 0.02)
      cut at +-2, i.e. not truncated, where SimMIM cuts at +-1 std: negligible. The base
      learning rate is scaled by batch/256 in ``train.py`` (SimMIM: /512): set the lr to match.
    """

    def __init__(self, encoder: ViT, mask_ratio: float = 0.6, mask_unit: int | None = None):
        super().__init__()
        _check_encoder(encoder)
        if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio!r} must be in [0, 1)")
        gh, gw = encoder.grid_size
        if mask_unit is None:
            mask_unit = 2 if gh % 2 == 0 and gw % 2 == 0 else 1
        if (
            isinstance(mask_unit, bool)
            or not isinstance(mask_unit, int)
            or mask_unit < 1
            or gh % mask_unit
            or gw % mask_unit
        ):
            raise ValueError(
                f"mask_unit={mask_unit!r} (patches per side of a hidden square) must be a positive "
                f"int that divides the {gh}x{gw} patch grid"
            )
        units = (gh // mask_unit) * (gw // mask_unit)
        if math.ceil(units * mask_ratio) >= units:
            raise ValueError(
                f"mask_ratio={mask_ratio} hides all {units} units of {mask_unit}x{mask_unit} "
                "patches; lower it or use a smaller mask_unit"
            )
        P = encoder.patch_size
        self.backbone = encoder
        self.mask_ratio = float(mask_ratio)
        self.mask_unit = mask_unit
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        self.decoder = nn.Linear(encoder.embed_dim, P * P * encoder.in_chans)  # token -> its patch's pixels
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder.weight, std=0.02)
        nn.init.zeros_(self.decoder.bias)

    def random_mask(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        """(B, L) mask, 1 = hidden: ``ceil(units * mask_ratio)`` random squares of mask_unit patches."""
        return unit_masking(batch_size, self.backbone.grid_size, self.mask_ratio, self.mask_unit, device=device)

    def forward(self, imgs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> (loss, pred (B, L, P*P*C), mask (B, L)); L1 over hidden pixels only."""
        if mask is None:
            mask = self.random_mask(imgs.shape[0], imgs.device)
        z = self.backbone.forward_features(imgs, mask=mask, mask_token=self.mask_token)  # (B, 1+L, D)
        pred = self.decoder(z[:, 1:])  # (B, L, P*P*C)
        target = patchify(imgs, self.backbone.patch_size)
        per_patch = (pred.float() - target.float()).abs().mean(dim=-1)  # (B, L)
        loss = (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        return loss, pred, mask

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """``batch = (images, labels)``; labels are ignored."""
        loss, _, _ = self(_images(batch))
        return loss, {"loss": loss.detach().item()}


# --------------------------------------------------------------------------- the visual tokenizer
_NORMALIZE = ("patch", "global")


class PatchTokenizer(nn.Module):
    """A k-means codebook over patches: image -> (B, L) token ids ("visual words") and back.

    ``normalize="patch"`` (default) first brings every patch to zero mean and unit variance, as
    MAE's ``norm_pix_loss`` does, so words describe shape (edges, strokes), not brightness, and
    the tokenizer does not care how the images were normalised; ``decode`` then returns those
    normalised patterns. ``normalize="global"`` standardises pixels with the mean and standard
    deviation of the images it was fitted on, so ``decode`` gives images: fit it on images
    preprocessed exactly like the training batches.

    The codebook and statistics are buffers: they travel with the state dict of the module that
    holds the tokenizer (e.g. ``BEiT``) and have no gradient. Build with ``PatchTokenizer.fit``.
    """

    def __init__(self, patch_size: int, vocab_size: int, in_chans: int = 1, normalize: str = "patch"):
        super().__init__()
        for name, value in (("patch_size", patch_size), ("vocab_size", vocab_size), ("in_chans", in_chans)):
            validate.positive_int(name, value)
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize={normalize!r} is not one of {_NORMALIZE}")
        self.patch_size, self.vocab_size, self.in_chans, self.normalize = patch_size, vocab_size, in_chans, normalize
        self.register_buffer("codebook", torch.zeros(vocab_size, patch_size * patch_size * in_chans))  # (K, P*P*C)
        self.register_buffer("pixel_mean", torch.zeros(in_chans))  # used by normalize="global"
        self.register_buffer("pixel_std", torch.ones(in_chans))

    def config(self) -> dict:
        """Constructor keywords, enough to rebuild an empty tokenizer before loading a state dict."""
        return {
            "patch_size": self.patch_size,
            "vocab_size": self.vocab_size,
            "in_chans": self.in_chans,
            "normalize": self.normalize,
        }

    # ------------------------------------------------------------------ features
    def _check_imgs(self, imgs: Tensor) -> Tensor:
        if not isinstance(imgs, Tensor) or imgs.ndim != 4 or imgs.shape[1] != self.in_chans:
            shape = tuple(imgs.shape) if isinstance(imgs, Tensor) else type(imgs).__name__
            raise ValueError(f"imgs must be (B, C={self.in_chans}, H, W), got {shape}")
        return imgs.float()

    def features(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised patches (B, L, P*P*C), the space the codebook lives in."""
        x = patchify(self._check_imgs(imgs), self.patch_size)
        if self.normalize == "patch":
            return (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        mean = self.pixel_mean.repeat(self.patch_size * self.patch_size)  # channel is the fastest index
        std = self.pixel_std.repeat(self.patch_size * self.patch_size)
        return (x - mean) / std

    @staticmethod
    def _nearest(x: Tensor, codebook: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
        """For (M, F) points: index of the nearest code (M,) and the squared distance to it (M,)."""
        c2 = (codebook * codebook).sum(dim=1)  # (K,)
        ids, d2 = [], []
        for xs in x.split(chunk):
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin, add it after.
            d = torch.addmm(c2, xs, codebook.T, alpha=-2.0)  # (m, K)
            best, idx = d.min(dim=1)
            ids.append(idx)
            d2.append((best + (xs * xs).sum(dim=1)).clamp_min(0))
        return torch.cat(ids), torch.cat(d2)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        images: Tensor,
        patch_size: int,
        vocab_size: int = 256,
        iters: int = 20,
        seed: int = 0,
        normalize: str = "patch",
        init: str = "kmeans++",
        max_patches: int = 50_000,
    ) -> PatchTokenizer:
        """Fit the codebook with Lloyd's k-means on (up to ``max_patches``) patches of ``images``.

        images (N, C, H, W) float (uint8 is scaled to [0, 1]); ``init`` is "kmeans++" or
        "random" (codes are random patches); ``iters=0`` keeps the initial codes. Empty clusters
        are re-seeded with the worst-fitted patches. Deterministic for a given ``seed``.
        """
        if init not in ("kmeans++", "random"):
            raise ValueError(f"init={init!r} must be 'kmeans++' or 'random'")
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"iters={iters!r} must be an int >= 0")
        validate.positive_int("max_patches", max_patches)
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be an (N, C, H, W) tensor, got {shape}")
        tok = cls(patch_size, vocab_size, images.shape[1], normalize).to(images.device)
        g = torch.Generator(device="cpu").manual_seed(seed)
        L = (images.shape[2] // patch_size) * (images.shape[3] // patch_size)
        n_img = min(images.shape[0], 4 * -(-max_patches // max(L, 1)))  # enough images; don't patchify all
        if n_img < images.shape[0]:
            images = images[torch.randperm(images.shape[0], generator=g)[:n_img].to(images.device)]
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if normalize == "global":  # statistics of the sampled images
            tok.pixel_mean.copy_(images.mean(dim=(0, 2, 3)))
            tok.pixel_std.copy_(images.std(dim=(0, 2, 3)).clamp_min(1e-6))
        x = tok.features(images).reshape(-1, tok.codebook.shape[1])  # (M, F)
        if x.shape[0] > max_patches:
            x = x[torch.randperm(x.shape[0], generator=g)[:max_patches].to(x.device)]
        if x.shape[0] < vocab_size:
            raise ValueError(f"vocab_size={vocab_size} is larger than the {x.shape[0]} patches to fit on")
        centres = cls._init_codes(x, vocab_size, init, g)
        for _ in range(iters):
            ids, d2 = cls._nearest(x, centres)
            sums = torch.zeros_like(centres).index_add_(0, ids, x)
            counts = torch.bincount(ids, minlength=vocab_size).to(x.dtype)
            empty = counts == 0
            centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
            if empty.any():  # move unused codes onto the patches the codebook fits worst
                worst = d2.topk(int(empty.sum())).indices
                centres[empty] = x[worst]
        tok.codebook.copy_(centres)
        return tok

    @classmethod
    def _init_codes(cls, x: Tensor, k: int, init: str, g: torch.Generator) -> Tensor:
        if init == "random":
            return x[torch.randperm(x.shape[0], generator=g)[:k].to(x.device)].clone()
        # k-means++ (Arthur and Vassilvitskii, 2007) on a subsample: each new code is a patch drawn
        # with probability proportional to its squared distance to the codes chosen so far.
        sub = x[torch.randperm(x.shape[0], generator=g)[: min(x.shape[0], 20 * k)].to(x.device)]
        centres = [sub[torch.randint(sub.shape[0], (1,), generator=g).to(x.device)]]  # (1, F)
        d2 = ((sub - centres[0]) ** 2).sum(dim=1)
        for _ in range(k - 1):
            probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / d2.numel())
            nxt = sub[torch.multinomial(probs.cpu(), 1, generator=g).to(x.device)]
            centres.append(nxt)
            d2 = torch.minimum(d2, ((sub - nxt) ** 2).sum(dim=1))
        return torch.cat(centres)

    # ------------------------------------------------------------------ use
    @torch.no_grad()
    def encode(self, imgs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L) long token ids, the nearest code of every patch (always in fp32)."""
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            f = self.features(imgs)  # (B, L, F)
            ids, _ = self._nearest(f.reshape(-1, f.shape[-1]), self.codebook.float())
        return ids.view(f.shape[0], f.shape[1])

    @torch.no_grad()
    def decode(self, ids: Tensor, grid_size: int | tuple[int, int] | None = None) -> Tensor:
        """(B, L) token ids -> (B, C, H, W): every patch replaced by its code (un-standardised for
        ``normalize="global"``, the normalised pattern for ``"patch"``)."""
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids must be a (B, L) long tensor, got {getattr(ids, 'shape', type(ids).__name__)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, vocab_size={self.vocab_size})")
        x = self.codebook[ids]  # (B, L, P*P*C)
        if self.normalize == "global":
            x = x * self.pixel_std.repeat(self.patch_size**2) + self.pixel_mean.repeat(self.patch_size**2)
        return unpatchify(x, self.patch_size, self.in_chans, grid_size)

    @torch.no_grad()
    def distortion(self, imgs: Tensor) -> float:
        """Mean squared error per value between the normalised patches and their codes."""
        f = self.features(imgs)
        _, d2 = self._nearest(f.reshape(-1, f.shape[-1]), self.codebook.float())
        return float(d2.mean() / f.shape[-1])

    @torch.no_grad()
    def code_usage(self, imgs: Tensor) -> float:
        """Fraction of the vocabulary that the patches of ``imgs`` use."""
        return float(torch.unique(self.encode(imgs)).numel() / self.vocab_size)

    def save(self, path: str | os.PathLike) -> None:
        """Write config and codebook to ``path`` (a torch file, loadable with weights_only)."""
        torch.save({"config": self.config(), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> PatchTokenizer:
        """Read a tokenizer written by ``save``."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        tok = cls(**blob["config"])
        tok.load_state_dict(blob["state_dict"])
        return tok


# --------------------------------------------------------------------------- BEiT
class BEiT(nn.Module):
    """BEiT-style masked token prediction: ``loss, logits, mask = beit(imgs)``.

    About ``num_masked`` hidden patches per image (default ``round(mask_ratio * L)``; BEiT hides
    75 of 196, about 0.4) chosen by BEiT's block-wise masking (``masking.block_masking``: blocks
    of at least ``min_block`` patches, aspect ratio in [0.3, 1/0.3], strictly smaller than the
    grid, and no top-up, so a mask can fall a few patches short); the encoder sees the image with
    the ``mask_token`` at hidden patches, ``lm_head`` predicts the tokenizer's id of each hidden
    patch, cross-entropy over hidden patches only. The tokenizer is frozen and saved with the
    state dict; to reload, build ``BEiT(encoder, PatchTokenizer(**tok.config()))`` and load.

    Kept deviations from microsoft/unilm ``beit/``, and why:

    - Visual words come from a k-means codebook over normalised patches (``PatchTokenizer``,
      256 words by default), not DALL-E's dVAE (8192 words): a dVAE for 28-pixel images would
      be a project of its own, and k-means fits in seconds. With ``normalize="patch"`` (the
      default) its words describe patch shape, not brightness, so unlike BEiT's dVAE targets they
      hardly move with the colour jitter.
    - ``min_block`` defaults to ``default_min_block(grid)``: BEiT's 16 of 196 patches (a 4x4
      block on its 14x14 grid) kept at the same share of a smaller grid, so 4 on 7x7 and 1 on
      the 4x4 grid of vit_mini_28 (where 16 would be the whole grid).
    - The backbone is the package's ViT, shared by every method: absolute position embeddings,
      no relative position bias, no LayerScale (BEiT: 0.1) and no ``fix_init_weight`` (the
      1/sqrt(2 * layer) rescale of ``attn.proj`` / ``mlp.fc2``).
    - The mask is drawn per batch inside ``forward`` (independently per sample), not per image
      in the data loader; the distribution is the same. The data recipe (``vitssl`` CLI) is
      BEiT's crop scale (0.08, 1) and ColorJitter 0.4, brightness and contrast only on grey
      images (saturation means nothing on one channel); the smallest crops are 8x8 pixels of a
      28-pixel image, kept as BEiT has them.
    """

    def __init__(
        self,
        encoder: ViT,
        tokenizer: PatchTokenizer,
        num_masked: int | None = None,
        mask_ratio: float = 0.4,
        min_block: int | None = None,
    ):
        super().__init__()
        _check_encoder(encoder)
        if not isinstance(tokenizer, PatchTokenizer):
            raise TypeError(f"tokenizer must be a PatchTokenizer, got {type(tokenizer).__name__}")
        if tokenizer.patch_size != encoder.patch_size or tokenizer.in_chans != encoder.in_chans:
            raise ValueError(
                f"tokenizer (patch_size={tokenizer.patch_size}, in_chans={tokenizer.in_chans}) does "
                f"not match the encoder (patch_size={encoder.patch_size}, in_chans={encoder.in_chans})"
            )
        L = encoder.num_patches
        if num_masked is None:
            if not 0.0 < mask_ratio < 1.0:
                raise ValueError(f"mask_ratio={mask_ratio!r} must be in (0, 1)")
            num_masked = max(1, round(mask_ratio * L))
        if isinstance(num_masked, bool) or not isinstance(num_masked, int) or not 1 <= num_masked < L:
            raise ValueError(f"num_masked={num_masked!r} must be an int in [1, L={L})")
        min_block = default_min_block(encoder.grid_size) if min_block is None else min_block
        if isinstance(min_block, bool) or not isinstance(min_block, int) or min_block < 1:
            raise ValueError(f"min_block={min_block!r} must be a positive int or None")
        self.backbone = encoder
        self.tokenizer = tokenizer.requires_grad_(False)
        self.num_masked, self.min_block = num_masked, min_block
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        self.lm_head = nn.Linear(encoder.embed_dim, tokenizer.vocab_size)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    def forward_with_targets(self, imgs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> (loss, logits (B, L, K), mask (B, L) with 1 = hidden, target ids (B, L))."""
        if mask is None:
            mask = block_masking(
                imgs.shape[0], self.backbone.grid_size, self.num_masked, self.min_block, device=imgs.device
            )
        target = self.tokenizer.encode(imgs)  # (B, L) visual words of the intact image
        z = self.backbone.forward_features(imgs, mask=mask, mask_token=self.mask_token)  # (B, 1+L, D)
        logits = self.lm_head(z[:, 1:])  # (B, L, K)
        loss = masked_token_cross_entropy(logits, target, mask, reduction="mean")
        return loss, logits, mask, target

    def forward(self, imgs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> (loss, logits (B, L, K), mask (B, L) with 1 = hidden)."""
        return self.forward_with_targets(imgs, mask)[:3]

    def training_step(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """``batch = (images, labels)``; logs the loss and the token accuracy on hidden patches."""
        loss, logits, mask, target = self.forward_with_targets(_images(batch))
        hit = (logits.detach().argmax(dim=-1) == target).float()
        acc = (hit * mask).sum() / mask.sum().clamp_min(1.0)  # a block mask may (rarely) hide nothing
        return loss, {"loss": loss.detach().item(), "token_acc": acc.item()}
