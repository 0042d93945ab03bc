"""Pictures of what a trained ViT does: attention maps, masks, MAE reconstructions, geometry.

The analyses follow the papers that made them standard:

- class-token attention of the last block, per head, and DINO's thresholded mask, which keeps
  the most attended patches that together hold a given share (60 %) of the attention mass
  (Caron et al., 2021, ``visualize_attention.py``);
- MAE's reconstructions (He et al., 2022, ``demo/mae_visualize.ipynb``): masked input,
  prediction, prediction with the visible patches pasted back;
- mean attention distance per layer (Dosovitskiy et al., 2021, Fig. 7): for each query patch,
  the pixel distance to every key patch weighted by attention, averaged over queries, images
  (and heads where said);
- cosine similarity between the positional embeddings of all patch positions (ViT Fig. 7).

Analysis functions return tensors; drawing functions return ``matplotlib.figure.Figure``
objects (no pyplot state), so a notebook shows them and the CLI saves them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from . import validate
from .checkpoint import load_backbone
from .interpret import attention_maps
from .mae import MAE, decoder_state_dict
from .pretrained import load_pretrained, resolve_checkpoint
from .vit import ViT

__all__ = [
    "attention_mask",
    "class_token_attention",
    "draw_attention",
    "draw_attention_distance",
    "draw_position_similarity",
    "draw_reconstruction",
    "item_share",
    "layer_attention_distance",
    "load_image",
    "load_mae",
    "mae_reconstruction",
    "mean_attention_distance",
    "patch_distances",
    "position_similarity",
    "uniform_attention_distance",
]


# --------------------------------------------------------------------------- images
def load_image(path: str | os.PathLike, size: int | tuple[int, int] = 28, in_chans: int = 1) -> Tensor:
    """A PNG/JPEG file -> uint8 (1, C, H, W), resized to ``size`` (grey for C=1, RGB for C=3)."""
    from PIL import Image, UnidentifiedImageError

    if in_chans not in (1, 3):
        raise ValueError(f"in_chans={in_chans!r} must be 1 (grey) or 3 (RGB)")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if in_chans == 1 else "RGB").resize((w, h), Image.BILINEAR)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"image={str(path)!r}: no such file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image={str(path)!r} is not a readable PNG/JPEG image ({err})") from None
    return data.reshape(h, w, in_chans).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, C, H, W)


def _as_float(images: Tensor, normalize: dict | None) -> Tensor:
    """uint8 or float [0, 1] images (B, H, W) or (B, C, H, W) -> normalised float (B, C, H, W)."""
    if not isinstance(images, Tensor) or images.ndim not in (3, 4):
        raise ValueError(
            f"images must be a tensor (B, H, W) or (B, C, H, W), got "
            f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images have dtype {images.dtype}; give uint8 in [0, 255] or float in [0, 1]")
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    x = x.unsqueeze(1) if x.ndim == 3 else x
    if normalize is not None:
        mean = torch.as_tensor(normalize["mean"], dtype=torch.float32).reshape(1, -1, 1, 1)
        std = torch.as_tensor(normalize["std"], dtype=torch.float32).reshape(1, -1, 1, 1)
        x = (x - mean) / std
    return x


# --------------------------------------------------------------------------- attention maps and masks
def class_token_attention(backbone: ViT, images: Tensor, normalize: dict | None = None) -> Tensor:
    """Where the class token looks in the last block, per head: (B, h, gh, gw), each map summing to 1.

    The class token's attention to itself is left out and each head's patch weights are
    renormalised, so the maps of different heads and models share one scale.
    """
    if not isinstance(backbone, ViT):
        raise TypeError(f"backbone must be a vitssl_core.ViT, got {type(backbone).__name__}")
    maps = attention_maps(backbone, images, normalize=normalize)  # (B, h, gh, gw), sums <= 1
    return maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def attention_mask(maps: Tensor, keep: float = 0.6) -> Tensor:
    """DINO's thresholded mask: per map (..., gh, gw), the fewest most-attended patches that hold at
    least ``keep`` of the map's mass. Returns a bool tensor of the same shape.

    As DINO: sort the normalised weights ascending, cumulate, keep where the cumulative sum
    exceeds ``1 - keep``.
    """
    if not isinstance(maps, Tensor) or maps.ndim < 2 or not maps.is_floating_point():
        raise ValueError(
            f"maps must be a float tensor (..., gh, gw), got "
            f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}"
        )
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep!r} must be a share of the attention mass in (0, 1]")
    if (maps < 0).any():
        raise ValueError("maps must be non-negative attention weights")
    flat = maps.flatten(-2)  # (..., L)
    flat = flat / flat.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    values, order = flat.sort(dim=-1)  # ascending
    kept_sorted = values.cumsum(dim=-1) > 1.0 - keep + 1e-7  # the tail that holds >= keep
    kept = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return kept.reshape(maps.shape)


def _check_maps(maps, n: int) -> None:
    """``maps`` is a (B, h, gh, gw) tensor of attention maps with B = ``n`` images."""
    if not isinstance(maps, Tensor) or maps.ndim != 4 or len(maps) != n:
        raise ValueError(
            f"maps must be (B, h, gh, gw) with B = {n}, got "
            f"{tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__}"
        )


def item_share(maps: Tensor, images: Tensor, lit: float = 0.1) -> Tensor:
    """How object-centred each map is, at pixel level: (B, h) = mass on lit pixels / lit fraction.

    ``maps`` (B, h, gh, gw) are class-token maps (each summing to 1); ``images`` (B, H, W) or
    (B, 1, H, W), uint8 or float in [0, 1]. Each patch's mass is spread evenly over its pixels
    (nearest upsampling to H x W), so maps of any patch grid compare on the same pixels; a pixel
    brighter than ``lit`` belongs to the item. A map that looks everywhere equally scores 1; one
    that puts all its mass on the item scores 1 / (lit fraction). Raises ``ValueError`` for an
    image with no lit pixel.
    """
    x = _as_float(images, None)  # (B, C, H, W) in [0, 1]
    _check_maps(maps, len(x))
    if isinstance(lit, bool) or not isinstance(lit, (int, float)) or not 0.0 <= lit < 1.0:
        raise ValueError(f"lit={lit!r} must be a brightness threshold in [0, 1)")
    H, W = x.shape[-2:]
    gh, gw = maps.shape[-2:]
    if H % gh or W % gw:
        raise ValueError(f"a {gh}x{gw} map does not tile a {H}x{W} image")
    item = (x.mean(1) > lit).float()  # (B, H, W)
    fraction = item.flatten(1).mean(1)  # (B,)
    if (fraction == 0).any():
        raise ValueError(f"images {(fraction == 0).nonzero().flatten().tolist()} have no pixel brighter than lit={lit}")
    per_pixel = F.interpolate(maps.float(), size=(H, W), mode="nearest") / ((H // gh) * (W // gw))  # (B, h, H, W)
    on_item = (per_pixel * item[:, None]).sum(dim=(-2, -1))  # (B, h)
    return on_item / fraction[:, None]


# --------------------------------------------------------------------------- attention distance
def patch_distances(grid_size: int | tuple[int, int], patch_size: int) -> Tensor:
    """(L, L) pixel distances between patch centres on a gh x gw grid of P-pixel patches."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    for name, v in (("grid height", gh), ("grid width", gw), ("patch_size", patch_size)):
        validate.positive_int(name, v)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    centres = torch.stack([rows, cols], -1).reshape(-1, 2).double() * patch_size  # (L, 2) px
    return torch.cdist(centres, centres).float()


def mean_attention_distance(attn: Tensor, grid_size: int | tuple[int, int], patch_size: int) -> Tensor:
    """Attention weights (B, h, N, N) -> mean attention distance per head (h,), in pixels.

    With N = 1 + L the class token (row and column 0) is left out and each query's patch
    weights are renormalised; with N = L every token is a patch. The distance of a query is
    ``sum_j a_ij * |c_i - c_j|``; it is averaged over queries and images.
    """
    dist = patch_distances(grid_size, patch_size)  # (L, L)
    L = dist.shape[0]
    if (
        not isinstance(attn, Tensor)
        or attn.ndim != 4
        or attn.shape[-1] != attn.shape[-2]
        or attn.shape[-1] not in (L, L + 1)
    ):
        raise ValueError(
            f"attn must be (B, h, N, N) with N = {L} or {L + 1} for grid {grid_size}, got "
            f"{tuple(attn.shape) if isinstance(attn, Tensor) else type(attn).__name__}"
        )
    a = attn[:, :, -L:, -L:].float()  # patch-to-patch
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a * dist).sum(-1).mean(dim=(0, 2))  # (h,)


def uniform_attention_distance(grid_size: int | tuple[int, int], patch_size: int) -> float:
    """The mean attention distance of a head that attends equally to every patch (itself included):
    the mean distance between two patch centres drawn at random. A trained head below it is local."""
    return float(patch_distances(grid_size, patch_size).double().mean())


@torch.no_grad()
def layer_attention_distance(
    backbone: ViT, images: Tensor, normalize: dict | None = None, batch_size: int = 256
) -> Tensor:
    """Mean attention distance (depth, h) in pixels over ``images``; average over heads for one per layer."""
    if not isinstance(backbone, ViT):
        raise TypeError(f"backbone must be a vitssl_core.ViT, got {type(backbone).__name__}")
    validate.positive_int("batch_size", batch_size)
    x_all = _as_float(images, normalize)
    if len(x_all) == 0:
        raise ValueError("images is empty; attention distance is undefined")
    was_training = backbone.training
    backbone.eval()
    try:
        total = None
        for start in range(0, len(x_all), batch_size):
            x = x_all[start : start + batch_size]
            grid = (x.shape[-2] // backbone.patch_size, x.shape[-1] // backbone.patch_size)
            per_layer = torch.stack(
                [mean_attention_distance(a, grid, backbone.patch_size) * len(x) for a in backbone.get_selfattentions(x)]
            )  # (depth, h)
            total = per_layer if total is None else total + per_layer
    finally:
        backbone.train(was_training)
    return total / len(x_all)


# --------------------------------------------------------------------------- positional embeddings
def position_similarity(model: ViT | Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
    """Cosine similarity of every patch position's embedding with every other: (gh, gw, gh, gw).

    ``model`` is a ViT (its ``pos_embed``; the class-token row is dropped) or a table (L, D) /
    (1, L, D) with ``grid_size`` given. Entry [i, j, k, l] compares position (i, j) with (k, l).
    """
    if isinstance(model, ViT):
        table = model.pos_embed.detach()[0]
        grid = model.grid_size
        table = table[-grid[0] * grid[1] :]  # drop the class token's row if there is one
    elif isinstance(model, Tensor):
        if grid_size is None:
            raise ValueError("grid_size is required when model is a positional table")
        table = model.detach()
        table = table[0] if table.ndim == 3 else table
        grid = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        if table.ndim != 2 or table.shape[0] != grid[0] * grid[1]:
            raise ValueError(
                f"the table must be (L, D) with L = {grid[0] * grid[1]} for grid {grid}, got {tuple(model.shape)}"
            )
    else:
        raise TypeError(f"model must be a vitssl_core.ViT or a tensor, got {type(model).__name__}")
    t = F.normalize(table.float(), dim=-1)
    return (t @ t.T).reshape(*grid, *grid)


# --------------------------------------------------------------------------- MAE reconstructions
def load_mae(checkpoint: str | os.PathLike) -> tuple[MAE, dict[str, Any]]:
    """(MAE with the shipped encoder and decoder, eval mode; the card) from an MAE card whose
    ``"decoder"`` names the decoder weights (``mae_decoder.safetensors``, MAE's key names)."""
    card_path = resolve_checkpoint(checkpoint)
    encoder, card = load_pretrained(card_path)
    decoder = card.get("decoder")
    if card.get("method") != "mae" or not isinstance(decoder, dict) or not decoder.get("weights"):
        raise ValueError(
            f"{card_path.name}: not an MAE card with a shipped decoder (method "
            f"{card.get('method')!r}); reconstructions need the decoder"
        )
    path = card_path.with_name(decoder["weights"])
    if not path.is_file():
        raise FileNotFoundError(f"{card_path.name}: its decoder weights {path.name} are missing")
    args = card.get("method_args", {})
    mae = MAE(
        encoder,
        decoder_embed_dim=args.get("decoder_embed_dim", 512),
        decoder_depth=args.get("decoder_depth", 8),
        decoder_num_heads=args.get("decoder_num_heads", 16),
        mask_ratio=args.get("mask_ratio", 0.75),
        norm_pix_loss=args.get("norm_pix_loss", True),
        init_encoder=False,
    )
    weights = {k: v.float() for k, v in load_backbone(path).items()}
    expected = set(decoder_state_dict(mae.state_dict()))
    if set(weights) != expected:
        raise ValueError(
            f"{path.name} does not hold MAE's decoder keys: missing "
            f"{sorted(expected - set(weights))[:3]}, unexpected {sorted(set(weights) - expected)[:3]}"
        )
    mae.load_state_dict(weights, strict=False)  # the encoder is loaded already
    return mae.eval(), card


@torch.no_grad()
def mae_reconstruction(
    mae: MAE,
    images: Tensor,
    mask_ratio: float = 0.75,
    normalize: dict | None = None,
    seed: int = 0,
    stats: str = "target",
) -> dict[str, Tensor]:
    """MAE's picture: {"original", "masked", "reconstruction", "pasted"} (B, C, H, W) in [0, 1], "mask" (B, L).

    With ``norm_pix_loss`` the decoder predicts each patch normalised by its own mean and
    standard deviation, so pixels need a mean and a scale per patch:

    - ``stats="target"`` uses each patch's true statistics, as MAE's figures do: for a hidden
      patch that means its brightness and contrast come from the original; only the pattern
      inside the patch is predicted.
    - ``stats="visible"`` uses one mean and scale per image, the averages over its visible
      patches: nothing from the hidden pixels reaches the picture.

    ``masked`` shows hidden patches in mid grey (0.5); ``pasted`` puts the visible patches back.
    """
    if not isinstance(mae, MAE):
        raise TypeError(f"mae must be a vitssl_core.MAE, got {type(mae).__name__}")
    if stats not in ("target", "visible"):
        raise ValueError(f"stats={stats!r} is not one of ('target', 'visible')")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio={mask_ratio!r} must be in [0, 1)")
    x = _as_float(images, normalize)  # what the encoder saw in training
    noise = torch.rand(len(x), mae.backbone.num_patches, generator=torch.Generator().manual_seed(seed))
    _, pred, mask = mae(x, mask_ratio, noise)  # pred (B, L, P*P*C), mask (B, L) 1 = hidden
    patches = mae.patchify(x)
    if mae.norm_pix_loss:
        mean = patches.mean(dim=-1, keepdim=True)  # (B, L, 1)
        var = patches.var(dim=-1, keepdim=True)
        if stats == "visible":
            vis = (1 - mask).unsqueeze(-1)
            mean = ((mean * vis).sum(1, keepdim=True) / vis.sum(1, keepdim=True)).expand_as(mean)
            var = ((var * vis).sum(1, keepdim=True) / vis.sum(1, keepdim=True)).expand_as(var)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    m = mask.unsqueeze(-1)
    out = {
        "original": x,
        "masked": mae.unpatchify(patches * (1 - m)),
        "reconstruction": mae.unpatchify(pred),
        "pasted": mae.unpatchify(patches * (1 - m) + pred * m),
    }
    if normalize is not None:  # back to pixels in [0, 1]
        mean = torch.as_tensor(normalize["mean"], dtype=torch.float32).reshape(1, -1, 1, 1)
        std = torch.as_tensor(normalize["std"], dtype=torch.float32).reshape(1, -1, 1, 1)
        out = {k: v * std + mean for k, v in out.items()}
    out = {k: v.clamp(0, 1) for k, v in out.items()}
    hidden = mae.unpatchify(m.expand_as(patches)).bool()
    out["masked"] = out["masked"].masked_fill(hidden, 0.5)  # mid grey: black is the background here
    out["mask"] = mask
    return out


# --------------------------------------------------------------------------- drawing
def _image(ax, img: Tensor, title: str = "") -> None:
    img = img.detach().float().cpu()
    ax.imshow((img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_attention(images: Tensor, maps: Tensor, masks: Tensor | None = None, title: str = "") -> Figure:
    """One row per image: the image, then each head's class-token map (nearest-upsampled) laid over the
    image with one colour bar for all; when ``masks`` (``attention_mask``) is given, each head's mask is
    outlined on its map and a last column shades the image by the share of heads that keep each patch."""
    x = _as_float(images, None)
    _check_maps(maps, len(x))
    B, h, gh, gw = maps.shape
    ncols = 1 + h + (masks is not None)
    fig = Figure(figsize=(1.5 * ncols + 0.8, 1.5 * B + 0.4), layout="constrained")
    axes = fig.subplots(B, ncols, squeeze=False)
    H, W = x.shape[-2:]
    up = F.interpolate(maps.detach().float().cpu(), size=(H, W), mode="nearest")  # (B, h, H, W)
    vmax = float(maps.max())  # one scale for every head and image: the colour bar's
    for i in range(B):
        _image(axes[i, 0], x[i], "image" if i == 0 else "")
        for j in range(h):
            ax = axes[i, 1 + j]
            _image(ax, x[i])
            shown = ax.imshow(up[i, j].numpy(), cmap="inferno", vmin=0, vmax=vmax, alpha=0.65)
            if masks is not None:  # the patches that hold 60 % (``keep``) of this head's mass
                outline = F.interpolate(masks[i : i + 1, j : j + 1].float().cpu(), size=(H, W), mode="nearest")[0, 0]
                ax.contour(outline.numpy(), levels=[0.5], colors="cyan", linewidths=0.9)
            ax.set_title(f"head {j}" if i == 0 else "", fontsize=8)
        if masks is not None:
            keep = F.interpolate(masks[i : i + 1].float().cpu(), size=x.shape[-2:], mode="nearest")[0]  # (h, H, W)
            share = keep.mean(0)  # (H, W): the share of heads whose mask keeps each pixel
            _image(axes[i, -1], x[i] * (0.2 + 0.8 * share), "masks: brighter =\nkept by more heads" if i == 0 else "")
    bar = fig.colorbar(shown, ax=axes[:, 1 : 1 + h].ravel().tolist(), shrink=0.8, pad=0.01)
    bar.set_label("attention per patch", fontsize=8)
    if title:
        fig.suptitle(title + ("; cyan outline: each head's mask" if masks is not None else ""), fontsize=10)
    return fig


def draw_reconstruction(result: dict[str, Tensor], n: int | None = None, title: str = "") -> Figure:
    """Rows of MAE's four panels: original, masked, reconstruction, reconstruction + visible."""
    keys = ("original", "masked", "reconstruction", "pasted")
    if not isinstance(result, dict) or any(k not in result for k in keys):
        raise ValueError(f"result must be the dict mae_reconstruction returns, with keys {keys}")
    B = len(result["original"]) if n is None else min(n, len(result["original"]))
    names = ("original", "masked input", "reconstruction", "reconstruction\n+ visible")
    fig = Figure(figsize=(6.4, 1.6 * B + 0.4), layout="constrained")
    axes = fig.subplots(B, 4, squeeze=False)
    for i in range(B):
        for j, (k, name) in enumerate(zip(keys, names)):
            _image(axes[i, j], result[k][i], name if i == 0 else "")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def draw_attention_distance(
    distances: dict[str, Tensor], reference: float | None = None, patch_size: int | None = None
) -> Figure:
    """Mean attention distance per layer: one panel per model, a dot per head, a line for the mean."""
    if not isinstance(distances, dict) or not distances:
        raise ValueError("distances must be a non-empty dict of name -> (depth, h) tensors")
    fig = Figure(figsize=(3.2 * len(distances), 3.2), layout="constrained")
    axes = fig.subplots(1, len(distances), sharey=True, squeeze=False)[0]
    for ax, (name, d) in zip(axes, distances.items()):
        d = d.detach().float().cpu().numpy()
        layers = list(range(1, d.shape[0] + 1))
        for head in range(d.shape[1]):
            ax.plot(layers, d[:, head], "o", color="0.55", markersize=4, label="a head" if head == 0 else None)
        ax.plot(layers, d.mean(1), "-", color="black", label="mean of heads")
        if reference is not None:
            ax.axhline(reference, ls="--", color="tab:red", lw=1, label="uniform attention")
        if patch_size is not None:
            ax.axhline(patch_size, ls=":", color="tab:blue", lw=1, label="one patch away")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("block")
        ax.set_xticks(layers)
    axes[0].set_ylabel("mean attention distance (px)")
    axes[0].legend(fontsize=7, loc="lower right")
    return fig


def draw_position_similarity(sim: Tensor, title: str = "") -> Figure:
    """ViT Fig. 7 (centre): for each position (i, j), its cosine similarity to every other position."""
    if not isinstance(sim, Tensor) or sim.ndim != 4:
        raise ValueError("sim must be (gh, gw, gh, gw), as position_similarity returns")
    gh, gw = sim.shape[:2]
    fig = Figure(figsize=(0.9 * gw + 1.0, 0.9 * gh + 0.5), layout="constrained")
    axes = fig.subplots(gh, gw, squeeze=False)
    im = None
    for i in range(gh):
        for j in range(gw):
            im = axes[i, j].imshow(sim[i, j].detach().cpu().numpy(), cmap="viridis", vmin=-1, vmax=1)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(str(i + 1), fontsize=8)
            if i == gh - 1:
                axes[i, j].set_xlabel(str(j + 1), fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="cosine similarity")
    fig.supxlabel("input patch column", fontsize=9)
    fig.supylabel("input patch row", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def render(
    kind: str,
    checkpoint: str | os.PathLike,
    image: str | os.PathLike,
    out: str | os.PathLike,
    mask_ratio: float = 0.75,
    seed: int = 0,
) -> Path:
    """What ``vitssl show`` does: draw ``kind`` ("attention" or "reconstruction") for one image file
    with a checkpoint, and save the figure as ``out`` (PNG). Returns the path written."""
    if kind not in ("attention", "reconstruction"):
        raise ValueError(f"kind={kind!r} is not one of ('attention', 'reconstruction')")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"out={str(out)!r} must end in .png")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out={str(out)!r}: the folder {out.parent} does not exist")
    if kind == "attention":
        backbone, card = load_pretrained(resolve_checkpoint(checkpoint))
        img = load_image(image, backbone.img_size, backbone.in_chans)
        maps = class_token_attention(backbone, img, card.get("normalize"))
        fig = draw_attention(
            img,
            maps,
            attention_mask(maps),
            title=f"{card.get('name', checkpoint)}: class-token attention of the last block",
        )
    else:
        mae, card = load_mae(checkpoint)
        img = load_image(image, mae.backbone.img_size, mae.backbone.in_chans)
        result = mae_reconstruction(mae, img, mask_ratio, card.get("normalize"), seed=seed)
        fig = draw_reconstruction(result, title=f"{card.get('name', checkpoint)}: {mask_ratio:.0%} of patches hidden")
    fig.savefig(out, dpi=120)
    return out
