"""DINO: self-distillation with no labels (Caron et al., 2021), for the ViT.

A student (backbone + ``DINOHead``) sees every crop of an image, two global and K local ones;
a teacher, an exponential moving average (EMA) of the student with no gradient, sees only the
two global crops. The student is trained to predict, from each crop, the teacher's output on
the *other* global crops (cross-entropy, ``losses.dino_cross_entropy``). Two tricks keep the
teacher from collapsing: *centring* (subtract an EMA ``center`` of the teacher's outputs, which
stops one dimension from dominating) and *sharpening* (a low teacher temperature, which stops
the output from becoming uniform). Collapse is visible in two numbers logged every step: the
teacher's entropy (near 0: one dimension dominates; near log K: uniform) and KL(teacher ||
student) (near 0 in either collapse, since nothing is left to learn).

Defaults are the paper's (ViT-S/16 on ImageNet: ``out_dim=65536``, teacher 0.04, student 0.1,
centre momentum 0.9, EMA 0.996 -> 1 on a cosine, 8 local crops). For small data (Fashion-MNIST,
a few thousand steps) use ``out_dim`` 1024-4096 (65536 prototypes for 60000 images is more
than one per image and slow on a CPU), ``hidden_dim`` 512-1024, and local crops of 12 or 16 px
for 28 px images. Every schedule counts optimizer steps; ``vitssl pretrain --method dino``
converts DINO's epoch counts for the run at hand (``recipes.dino``).

Local crops are smaller than the model's ``img_size``, so the backbone must be built with
``dynamic_img_size=True`` (the positional embedding is interpolated per resolution); DINO
checks this and raises otherwise. Every collective goes through ``vitssl_core.distributed``, so
DINO runs unchanged on one CPU with no process group (the reference code does not).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from . import validate
from .distributed import all_reduce_sum, get_world_size
from .losses import dino_cross_entropy, sharpen
from .optim import MomentumLog, ema_update_, upgrade_momentum_log
from .schedules import cosine_momentum
from .vit import DropPath, ViT

__all__ = ["DINOHead", "DINO"]


# --------------------------------------------------------------------------- the head
class DINOHead(nn.Module):
    """MLP (nlayers, GELU) -> bottleneck -> L2-normalise -> weight-normalised linear to out_dim.

    (B, in_dim) -> (B, out_dim) logits ("prototype scores"). The last layer's norm ``g`` is fixed
    to 1 when ``norm_last_layer`` (the paper's default, more stable), so every prototype is a
    unit vector and a logit is a cosine. (Freezing the last layer is ``DINO``'s business: it
    drops the layer's gradients before the optimizer step.)
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        for name, v in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("nlayers", nlayers),
        ):
            validate.positive_int(name, v)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for _ in range(nlayers - 2):
                layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
            self.mlp = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # W = g * v / ||v|| row by row; parametrizations.weight_norm stores g as original0 (out_dim, 1)
        # and v as original1 (out_dim, bottleneck_dim).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad = not norm_last_layer
        self.norm_last_layer = norm_last_layer

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck_dim) on the unit sphere
        return self.last_layer(x)  # (B, out_dim); weight rows of norm g


def _without_stochastic_layers(backbone: nn.Module) -> nn.Module:
    """``backbone`` with every DropPath and Dropout rate set to 0, in place: how DINO builds its teacher."""
    for m in backbone.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
        elif isinstance(m, nn.Dropout):
            m.p = 0.0
    return backbone


# --------------------------------------------------------------------------- the method
class DINO(nn.Module):
    """DINO: a student (``backbone``, ``head``) and an EMA teacher (``teacher_backbone``, ``teacher_head``).

    ``training_step(([g1, g2, l1, ..., lK], labels))``: global crops (B, C, H, W), local crops
    (B, C, h, w). Logs ``loss``, ``teacher_entropy``, ``kl`` (teacher || student, mean over
    pairs), ``center_norm``, ``teacher_temp``, ``momentum``. The trainer's hooks:
    ``on_before_optimizer_step`` drops the last layer's gradients while it is frozen;
    ``on_step_end`` moves the teacher (EMA, momentum cosine from ``momentum`` to 1) and the step
    counter ``steps_done``; ``export_backbone`` names the teacher as the backbone to ship.

    As in ``main_dino.py``:

    - The teacher is built without stochastic depth or dropout (every rate of the copy set to
      0; the student keeps the backbone's ``drop_path_rate``, DINO's default 0.1), and its
      backbone stays in eval mode whatever ``train()`` is asked (a copy with rate 0 is
      deterministic either way; eval mode keeps it so if a rate is changed later).
    - The last layer is frozen for the first ``freeze_last_layer_steps`` steps by setting its
      gradients to None after the backward (``utils.cancel_gradients_last_layer``), so AdamW
      skips it: no moment, no weight decay, no step count. The layer still takes part in the
      forward and backward, so DDP reduces its gradient as usual. Whether it is frozen is read
      from the ``steps_done`` buffer, which checkpoints carry, so a resumed run freezes exactly
      the steps an uninterrupted one does.
    - ``export_backbone()`` returns the teacher: DINO's ``eval_knn.py`` and ``eval_linear.py``
      read ``checkpoint_key teacher``, and the teacher is the better network (paper, 5.2).

    Kept deviations, and why:

    - Schedules count optimizer steps, not epochs (one convention with the trainer, exact under
      any resume): the teacher temperature rises linearly per step (DINO: one value per epoch)
      and the freeze is ``freeze_last_layer_steps`` long (DINO: ``--freeze_last_layer`` epochs).
      DINO alone cannot know the epoch length, so ``vitssl pretrain`` converts, knowing the data
      set and the batch: freeze min(1 epoch, half the run), warm up max(1, min(30 epochs, half the
      run)) steps (``recipes.dino``). A library user passes steps, or calls ``recipes.dino``.
    - The teacher head follows ``train()``/``eval()``: its only mode-dependent layers are the
      optional BatchNorms (``use_bn_in_head``), and DINO's teacher, never put in eval mode,
      normalises with the batch's statistics; so does this one while training.
    - Gradient clipping is the trainer's: DINO clips each parameter's gradient to 3.0 on its own,
      which is ``TrainConfig(grad_clip=3.0, clip_mode="per_param")``; the trainer's default is
      one global norm.
    - The trainer exempts ``pos_embed`` and ``cls_token`` from weight decay (timm's rule); DINO
      decays every parameter with more than one dimension. A small effect, kept so every method
      shares one rule.
    - The CLI's heads and crops are sized for 28-32 px images and a CPU (``out_dim`` 4096,
      ``hidden_dim`` 1024, 6 local crops of about 3/7 of the side), not ImageNet's 65536 and
      8 x 96 px. The CLI has no per-method optimiser defaults, so DINO's weight decay cosine
      0.04 -> 0.4 and per-parameter clipping at 3.0 come with ``configs/results/dino.yaml``
      (or ``--weight-decay 0.04 --weight-decay-end 0.4 --grad-clip 3 --clip-mode per_param``),
      not with ``--method dino`` alone.
    - The recipe's EMA starts at DINO's default 0.996; DINO's README advises 0.9995 at batch 256
      for runs of 100+ epochs, which in a 30-epoch run of ~7000 steps would leave the teacher
      ~2000 steps (its time constant) behind the student for much of the run.
    """

    def __init__(
        self,
        backbone: ViT,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_local_crops: int = 8,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: int = 0,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        momentum: float = 0.996,
        norm_last_layer: bool = True,
        use_bn_in_head: bool = False,
        freeze_last_layer_steps: int = 0,
    ):
        super().__init__()
        if not isinstance(backbone, ViT):
            raise TypeError(f"backbone must be a vitssl_core.ViT, got {type(backbone).__name__}")
        if isinstance(n_local_crops, bool) or not isinstance(n_local_crops, int) or n_local_crops < 0:
            raise ValueError(f"n_local_crops={n_local_crops!r} must be an int >= 0")
        if n_local_crops > 0 and not backbone.dynamic_img_size:
            raise ValueError(
                f"n_local_crops={n_local_crops} needs a backbone built with dynamic_img_size=True: local crops are "
                f"smaller than img_size={backbone.img_size[0]} and the positional embedding must be interpolated; "
                f"build it e.g. as vit_tiny_28(dynamic_img_size=True), or pass n_local_crops=0"
            )
        for name, v in (
            ("teacher_temp", teacher_temp),
            ("warmup_teacher_temp", warmup_teacher_temp),
            ("student_temp", student_temp),
        ):
            validate.positive_number(name, v)
        for name, v in (
            ("warmup_teacher_temp_steps", warmup_teacher_temp_steps),
            ("freeze_last_layer_steps", freeze_last_layer_steps),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be an int >= 0")
        validate.fraction("center_momentum", center_momentum, closed=True)
        validate.fraction("momentum", momentum, closed=True)

        self.backbone = backbone
        self.head = DINOHead(
            backbone.embed_dim,
            out_dim,
            hidden_dim,
            bottleneck_dim,
            use_bn=use_bn_in_head,
            norm_last_layer=norm_last_layer,
        )
        # The teacher starts as an exact copy and is never optimised: requires_grad False keeps it
        # out of the optimizer, which only sees trainable parameters. Like DINO's, it has no
        # stochastic depth: its targets must not depend on which residual branches a coin dropped.
        self.teacher_backbone = _without_stochastic_layers(copy.deepcopy(backbone)).eval()
        self.teacher_head = copy.deepcopy(self.head)
        for p in self._teacher_params():
            p.requires_grad = False
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K), EMA of the teacher's outputs
        # optimizer steps taken: drives the temperature warm-up and the freeze, and survives a resume
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.n_local_crops = n_local_crops
        self.teacher_temp, self.warmup_teacher_temp = float(teacher_temp), float(warmup_teacher_temp)
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.student_temp = float(student_temp)
        self.center_momentum = float(center_momentum)
        self.base_momentum = float(momentum)
        # The momentum of the last EMA update, for the logs: a buffer like steps_done, so a resumed
        # run logs what an uninterrupted one does (a checkpoint without it loads with the base value).
        self.momentum_log = MomentumLog(momentum)
        self.register_load_state_dict_pre_hook(upgrade_momentum_log)
        self.freeze_last_layer_steps = freeze_last_layer_steps

    def train(self, mode: bool = True) -> "DINO":
        """Set the student's (and the teacher head's) mode; the teacher backbone always stays in eval mode."""
        super().train(mode)
        self.teacher_backbone.eval()
        return self

    def _student_params(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.head.parameters())

    def _teacher_params(self) -> list[nn.Parameter]:
        return list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters())

    # ------------------------------------------------------------------ schedules
    @property
    def momentum(self) -> float:
        """The teacher momentum of the last ``on_step_end`` (``momentum`` before the first); survives a resume."""
        return self.momentum_log.value

    @property
    def last_layer_frozen(self) -> bool:
        """True during the first ``freeze_last_layer_steps`` optimizer steps (read from ``steps_done``)."""
        return int(self.steps_done) < self.freeze_last_layer_steps

    def teacher_temp_at(self, step: int) -> float:
        """Teacher temperature at ``step``: linear warm-up warmup_teacher_temp -> teacher_temp, then constant."""
        if step >= self.warmup_teacher_temp_steps:
            return self.teacher_temp
        return (
            self.warmup_teacher_temp
            + (self.teacher_temp - self.warmup_teacher_temp) * step / self.warmup_teacher_temp_steps
        )

    # ------------------------------------------------------------------ forward pieces
    def _crops(self, batch) -> list[Tensor]:
        crops = (
            batch[0]
            if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], (tuple, list))
            else batch
        )
        expected = 2 + self.n_local_crops
        if not isinstance(crops, (tuple, list)) or not all(isinstance(c, Tensor) and c.ndim == 4 for c in crops):
            raise ValueError(
                "batch must be ([global1, global2, local1, ...], labels) with (B, C, H, W) tensors, "
                "as augment.MultiCrop yields"
            )
        if len(crops) != expected:
            raise ValueError(
                f"got {len(crops)} crops; this DINO expects 2 global + n_local_crops={self.n_local_crops} = {expected}"
            )
        if crops[0].shape != crops[1].shape:
            raise ValueError(
                f"the two global crops differ in shape: {tuple(crops[0].shape)} and {tuple(crops[1].shape)}"
            )
        if any(c.shape[0] != crops[0].shape[0] for c in crops):
            raise ValueError(f"every crop must hold the same batch size, got {[c.shape[0] for c in crops]}")
        return list(crops)

    def _features(self, backbone: ViT, crops: list[Tensor]) -> Tensor:
        """Crops -> (V*B, D) pooled features; consecutive crops of one resolution share a forward pass."""
        feats, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            x = torch.cat(crops[i:j])  # ((j-i)*B, C, H, W)
            feats.append(backbone.forward_head(backbone.forward_features(x), pre_logits=True))
            i = j
        return torch.cat(feats)

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """center <- m center + (1 - m) mean over every rank's rows of teacher_out (n, K)."""
        batch_sum = all_reduce_sum(teacher_out.float().sum(dim=0, keepdim=True))  # (1, K)
        batch_mean = batch_sum / (teacher_out.shape[0] * get_world_size())
        ema_update_([self.center], [batch_mean], self.center_momentum)

    def training_step(self, batch) -> tuple[Tensor, dict[str, float]]:
        crops = self._crops(batch)
        V = len(crops)
        student_out = self.head(self._features(self.backbone, crops)).chunk(V)  # V x (B, K)
        with torch.no_grad():
            teacher_out = self.teacher_head(self._features(self.teacher_backbone, crops[:2]))  # (2B, K)
        temp = self.teacher_temp_at(int(self.steps_done))
        teacher_probs = sharpen(teacher_out, self.center, temp).chunk(2)  # 2 x (B, K), centred and sharpened
        loss = dino_cross_entropy(list(student_out), list(teacher_probs), self.student_temp)
        with torch.no_grad():
            entropy = torch.special.entr(torch.cat(teacher_probs)).sum(dim=-1).mean()
            kl = loss.detach() - entropy  # KL = CE - H(teacher), averaged over the same pairs
            center_norm = self.center.norm()  # the centre the loss used, before this step's update
        self.update_center(teacher_out)
        logs = {
            "loss": float(loss.detach()),
            "teacher_entropy": float(entropy),
            "kl": float(kl),
            "center_norm": float(center_norm),
            "teacher_temp": temp,
            "momentum": self.momentum,
        }
        return loss, logs

    def forward(self, batch) -> tuple[Tensor, dict[str, float]]:
        return self.training_step(batch)

    # ------------------------------------------------------------------ the trainer's hooks
    def on_before_optimizer_step(self, step: int, max_steps: int) -> None:
        """While the last layer is frozen, set its gradients to None (after clipping), so AdamW skips it."""
        if self.last_layer_frozen:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """teacher <- m teacher + (1 - m) student, m = cosine_momentum(momentum, step, max_steps); advance the step."""
        m = cosine_momentum(self.base_momentum, step, max_steps)
        ema_update_(self._teacher_params(), self._student_params(), m)
        self.momentum_log.set(m)
        self.steps_done.fill_(step + 1)

    def export_backbone(self) -> tuple[str, ViT]:
        """("teacher", teacher backbone): the network DINO evaluates and ships, with the student's (timm) keys."""
        return "teacher", self.teacher_backbone
