"""Optimizer pieces for BERT pretraining: parameter groups, LAMB that stays correct under ZeRO, LR schedules.

LAMB scales each parameter's Adam-style update by a trust ratio ``||w|| / ||update||`` computed over
that parameter alone. DeepSpeed's ZeRO optimizers (and its BF16 optimizer) hand the client optimizer
one flat fp32 *partition* per parameter group instead of the parameters, so an ordinary LAMB computes
a single ratio over a slice of many parameters (DeepSpeed issues #88, #490, #1217, #1285).

Here the trainer calls :func:`configure_lamb_for_zero` right after ``deepspeed.initialize``. It reads
where each parameter lives inside this rank's flat partitions (a ``bert_ds.zero.layout.FlatLayout``,
read by ``bert_ds.zero.partitions``) and hands that to :class:`Lamb`. In ``step()`` Lamb sums ``w**2`` and
``update**2`` per parameter over its local slices, all-reduces those sums over the data-parallel
group (2 floats per parameter of the group), and applies each parameter's full ratio to its slices.
DeepSpeed calls ``step()`` once per parameter group (ZeRO 1/2) or sub-group (ZeRO 3), so that is one
small all-reduce per group per step. Weights then match unpartitioned LAMB to float tolerance under
ZeRO 1, 2 and 3 (tests/test_lamb_zero.py measures ~4e-7 of the distance training moved them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from enum import Enum
from typing import Any

import torch
import torch.distributed as torch_dist

from bert_ds.config import OptimizerConfig
from bert_ds.zero.layout import FlatLayout
from bert_ds.zero.partitions import partition_layouts

logger = logging.getLogger(__name__)

# Substrings of parameter names that get no weight decay (BERT convention: biases and LayerNorm gains).
NO_DECAY_NAME_PATTERNS = ("bias", "LayerNorm.weight", "layer_norm", "norm.weight")


def build_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and a not-decayed group.

    Biases and LayerNorm weights (names containing any of ``NO_DECAY_NAME_PATTERNS``) get no weight
    decay. Frozen parameters are left out. Both groups keep ``named_parameters()`` order, so the
    layout is the same on every rank and across runs; both are always returned, even if one is empty
    (DeepSpeed drops empty groups itself).

    Args:
        model: the model whose parameters are optimized.
        weight_decay: decoupled weight decay for the decayed group.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]``.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(pattern in name for pattern in NO_DECAY_NAME_PATTERNS):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------------------------
# LAMB
# ---------------------------------------------------------------------------------------------------


def _trust_ratio(w_norm: torch.Tensor, u_norm: torch.Tensor, max_trust_ratio: float | None) -> torch.Tensor:
    """``||w|| / ||u||``, or 1 where either norm is 0; clamped to ``max_trust_ratio``. Works elementwise."""
    ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
    return ratio if max_trust_ratio is None else ratio.clamp(max=max_trust_ratio)


class Lamb(torch.optim.Optimizer):
    """LAMB as NVIDIA's BERT pretraining uses it (apex ``FusedLAMB`` with its defaults), in plain PyTorch, fp32 math.

    For each parameter ``w`` with gradient ``g`` at step ``t``::

        m = beta1 * m + (1 - beta1) * g             # gradient averaging, as apex's default
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)   # only if bias_correction
        update = m_hat / (sqrt(v_hat) + eps) + weight_decay * w  # eps outside sqrt, decoupled decay
        ratio = ||w|| / ||update||  (1.0 if either norm is 0); clamped only if max_trust_ratio is set
        w = w - lr * ratio * update

    The recipe is NVIDIA DeepLearningExamples' BERT (``FusedLAMB(groups, lr=...)``): bias correction on,
    betas (0.9, 0.999), eps 1e-6, weight decay 0.01 on weights and 0 on biases and LayerNorm, no trust-ratio
    clamp, and groups with ``weight_decay == 0`` take the plain Adam step (ratio 1; apex ``use_nvlamb=False``).
    ``use_nvlamb=True`` adapts every parameter (NVLAMB). It is the LAMB paper's Algorithm 2 (You et al. 2019)
    with apex's choices where the paper leaves room.

    Where it differs from apex, and why:

    * apex pre-normalises the gradients by the global norm (``g / max(||g||, max_grad_norm=1)``) inside the
      optimizer. Here DeepSpeed does it before the step, over all partitions (``gradient_clipping``, set by
      ``train.grad_clip``, 1.0 by default): ``g * min(1, 1 / (||g|| + 1e-6))``, the same scaling to 1e-6 relative.
    * no master weights: DeepSpeed hands the optimizer its fp32 master partitions.
    * ``max_trust_ratio`` (default None, as apex) can clamp the ratio: DeepSpeed's FusedLamb clamps at 10.

    Under ZeRO the parameters seen here are flat partitions; see :func:`configure_lamb_for_zero`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        max_trust_ratio: float | None = None,
        use_nvlamb: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if eps <= 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if max_trust_ratio is not None and max_trust_ratio <= 0.0:
            raise ValueError(f"invalid max_trust_ratio: {max_trust_ratio}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            max_trust_ratio=max_trust_ratio,
            use_nvlamb=use_nvlamb,
        )
        super().__init__(params, defaults)
        # flat partition tensor -> its layout; derived from the engine each run, so never checkpointed
        self._flat_layouts: dict[torch.Tensor, FlatLayout] = {}
        # flat partition tensor -> the parameter index of each of its segments, on its device
        self._segment_params: dict[torch.Tensor, torch.Tensor] = {}

    def set_flat_layout(self, flat: torch.Tensor, layout: FlatLayout | None) -> None:
        """Declare that ``flat`` (a tensor in ``param_groups``) holds the parameter slices in ``layout``.

        ``None`` forgets it: the tensor is then treated as one parameter (the naive per-partition LAMB).
        """
        if layout is None:
            self._flat_layouts.pop(flat, None)
            self._segment_params.pop(flat, None)
            return
        if flat.dim() != 1 or flat.numel() != layout.numel:
            raise ValueError(f"layout of {layout.numel} elements given for a tensor of shape {tuple(flat.shape)}")
        self._flat_layouts[flat] = layout
        # built once: a per-step torch.tensor(list) would be a host-to-device copy every step
        self._segment_params[flat] = torch.tensor([seg.param_index for seg in layout.segments], dtype=torch.long, device=flat.device)

    @property
    def flat_layouts(self) -> dict[torch.Tensor, FlatLayout]:
        """The layouts given with :meth:`set_flat_layout` (read-only use)."""
        return self._flat_layouts

    def _adam_update(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Advance the moments of ``p`` and return its update direction (before trust ratio and lr).

        The update is written into ``p.grad`` when that is an fp32 tensor, as apex's FusedLAMB does: the
        gradient is not needed once the moments have it, and under ZeRO a partition-sized temporary is
        hundreds of MB (BERT-large, ZeRO-1 on 2 ranks: 670 MB each). So after :meth:`step`, ``p.grad``
        holds the update, not the gradient; DeepSpeed and the trainer read gradients only before the step.
        """
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("Lamb does not support sparse gradients")
        state = self.state[p]
        if not state:
            state["step"] = 0
            # moments in fp32 whatever the parameter dtype: they are the optimizer's precision
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if group["bias_correction"]:
            bc1 = 1.0 - beta1 ** state["step"]
            bc2 = 1.0 - beta2 ** state["step"]
        else:
            bc1 = bc2 = 1.0
        update = grad if grad.dtype == torch.float32 and grad.shape == exp_avg.shape else torch.empty_like(exp_avg)
        torch.div(exp_avg_sq, bc2, out=update).sqrt_().add_(group["eps"])  # the denominator, in place
        torch.div(exp_avg, update, out=update)
        if bc1 != 1.0:
            update.div_(bc1)
        if group["weight_decay"] != 0.0:
            update.add_(p, alpha=group["weight_decay"])
        return update

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step. Under ZeRO, every rank of the data-parallel group must call it."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # (flat tensor, its update, its group, its layout): applied after the cross-rank reduction
        partitioned: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], FlatLayout]] = []
        for group in self.param_groups:
            adapt = group["use_nvlamb"] or group["weight_decay"] != 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = self._adam_update(p, group)
                layout = self._flat_layouts.get(p)
                if not adapt:
                    # apex: no trust ratio for undecayed tensors unless NVLAMB; plain Adam step
                    p.add_(update.to(p.dtype), alpha=-group["lr"])
                elif layout is not None:
                    partitioned.append((p, update, group, layout))
                else:
                    # norms stay on the device: a .item() here would be a host-device sync per parameter
                    w_norm = torch.linalg.vector_norm(p, dtype=torch.float32)
                    ratio = _trust_ratio(w_norm, torch.linalg.vector_norm(update), group["max_trust_ratio"])
                    p.add_(update.mul_(ratio).to(p.dtype), alpha=-group["lr"])

        if partitioned:
            self._step_partitioned(partitioned)
        return loss

    def _step_partitioned(self, items: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any], FlatLayout]]) -> None:
        """Apply per-parameter trust ratios to flat partitions, summing the norms over all ranks.

        Everything works on views of the local segments (torch's multi-tensor ``_foreach`` kernels, which
        ``clip_grad_norm_`` uses too): no partition-sized temporary. Padding between segments holds zero
        weights and a zero update and is left out.
        """
        # Per flat tensor: partial sums of w**2 and update**2 for each parameter of its group (zero for
        # parameters not held here), as rows [w2, u2].
        partial, update_views = [], []
        for p, update, _, layout in items:
            w_parts = [p[seg.start : seg.start + seg.length] for seg in layout.segments]
            u_parts = [update[seg.start : seg.start + seg.length] for seg in layout.segments]
            update_views.append(u_parts)
            sums = torch.zeros(layout.num_params, 2, device=p.device)
            if layout.segments:
                norms = torch.stack([torch.stack(torch._foreach_norm(w_parts)), torch.stack(torch._foreach_norm(u_parts))], 1)
                sums.index_add_(0, self._segment_params[p], norms.float().square())
            partial.append(sums)

        # One all-reduce per process group (normally just the data-parallel group), not per tensor.
        by_group: dict[int, list[int]] = {}
        for i, (_, _, _, layout) in enumerate(items):
            if layout.process_group is not None:
                by_group.setdefault(id(layout.process_group), []).append(i)
        for indices in by_group.values():
            packed = torch.cat([partial[i] for i in indices])
            torch_dist.all_reduce(packed, op=torch_dist.ReduceOp.SUM, group=items[indices[0]][3].process_group)
            for i, chunk in zip(indices, packed.split([len(partial[i]) for i in indices]), strict=True):
                partial[i] = chunk

        for (p, update, group, layout), sums, u_parts in zip(items, partial, update_views, strict=True):
            if layout.segments:
                norms = sums.sqrt()
                ratios = _trust_ratio(norms[:, 0], norms[:, 1], group["max_trust_ratio"])
                torch._foreach_mul_(u_parts, list(ratios[self._segment_params[p]].unbind()))
            p.add_(update.to(p.dtype), alpha=-group["lr"])


def configure_lamb_for_zero(engine: Any) -> int:
    """Make a :class:`Lamb` client optimizer compute per-parameter trust ratios under ZeRO.

    Call it on every rank right after ``deepspeed.initialize`` (before the first step); calling it again
    (e.g. after loading a checkpoint) replaces the earlier layouts. Without it, Lamb under ZeRO silently
    takes one trust ratio per partition. It does nothing when the optimizer is not our Lamb or when Lamb
    sees whole parameters: ZeRO stage 0 in fp32, or fp16/bf16 at stage 0, where DeepSpeed's unfused fp16
    wrapper keeps one fp32 copy per parameter. bf16 with ZeRO 1 and fp32 gradient accumulation goes
    through DeepSpeed's partitioning ``BF16_Optimizer``, which is handled here too.

    Returns:
        The number of flat partitions that were given a layout (0 when there was nothing to do).
    """
    lamb = engine.basic_optimizer
    if not isinstance(lamb, Lamb):
        return 0
    wrapper = engine.optimizer
    if wrapper is lamb:
        return 0

    layouts = partition_layouts(wrapper)
    if layouts is None:
        return 0

    for flat in list(lamb.flat_layouts):  # idempotent: forget partitions from an earlier call
        lamb.set_flat_layout(flat, None)
    for flat, layout in layouts:
        lamb.set_flat_layout(flat, layout)
    logger.info(
        "LAMB under %s: per-parameter trust ratios over %d flat partitions (%d local parameter slices)",
        type(wrapper).__name__,
        len(layouts),
        sum(len(layout.segments) for _, layout in layouts),
    )
    return len(layouts)


# ---------------------------------------------------------------------------------------------------
# Choosing and building the optimizer
# ---------------------------------------------------------------------------------------------------


class OptimizerImpl(str, Enum):
    """The optimizer implementations bert-ds can use."""

    LAMB = "bert_ds.optim.Lamb"
    ADAMW = "torch.optim.AdamW"
    FUSED_ADAM = "deepspeed.ops.adam.FusedAdam"


OPTIMIZER_NAMES = ("lamb", "adamw")


def select_optimizer_impl(name: str, device_type: str) -> OptimizerImpl:
    """The implementation of optimizer ``name`` on ``device_type``.

    LAMB is :class:`Lamb` on every device and ZeRO stage, so a run's update does not depend on where it
    runs. DeepSpeed's FusedLamb is not the same LAMB (it folds bias correction into the step size, adapts
    biases and LayerNorm, clamps the ratio to [0.01, 10]) and no GPU here can prove a fused kernel equal;
    one can come back behind a test that runs on a GPU. AdamW is elementwise, so DeepSpeed's FusedAdam
    (adam_w_mode) computes the same update as ``torch.optim.AdamW`` and is used on CUDA.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZER_NAMES}")
    if name == "lamb":
        return OptimizerImpl.LAMB
    return OptimizerImpl.FUSED_ADAM if device_type == "cuda" else OptimizerImpl.ADAMW


# Every OptimizerConfig field but ``name``, and the param-group key it sets (None: no effect for that optimizer,
# and config.py warns when it is changed). A field missing here is an error, never silently dropped.
_GROUP_KEYS: dict[str, dict[str, str | None]] = {
    "lamb": {"lr": "lr", "weight_decay": "weight_decay", "betas": "betas", "eps": "eps", "bias_correction": "bias_correction",
             "max_trust_ratio": "max_trust_ratio"},
    "adamw": {"lr": "lr", "weight_decay": "weight_decay", "betas": "betas", "eps": "eps", "bias_correction": None, "max_trust_ratio": None},
}  # fmt: skip


def group_settings(cfg: OptimizerConfig) -> dict[str, Any]:
    """The param-group settings of ``cfg``: every field of the optimizer section, mapped to its optimizer's keys."""
    keys = _GROUP_KEYS[cfg.name]
    settings = {}
    for f in dataclasses.fields(cfg):
        if f.name == "name":
            continue
        if f.name not in keys:
            raise KeyError(f"optimizer.{f.name} is not mapped to a {cfg.name} setting in bert_ds.optim._GROUP_KEYS")
        if keys[f.name] is not None:
            settings[keys[f.name]] = getattr(cfg, f.name)
    settings["betas"] = tuple(settings["betas"])
    if "max_trust_ratio" in settings:
        settings["max_trust_ratio"] = settings["max_trust_ratio"] or None  # 0: no clamp
    return settings


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, device_type: str) -> torch.optim.Optimizer:
    """The run's optimizer over ``model``'s parameter groups, every setting from the ``optimizer`` section.

    Under ZeRO, call :func:`configure_lamb_for_zero` after ``deepspeed.initialize``; after loading any
    optimizer state, :func:`apply_optimizer_config`.
    """
    impl = select_optimizer_impl(cfg.name, device_type)
    logger.info("optimizer %s: using %s", cfg.name, impl.value)
    groups = build_param_groups(model, cfg.weight_decay)
    settings = group_settings(cfg)
    if impl is OptimizerImpl.LAMB:
        optimizer = Lamb(groups, **settings)
    elif impl is OptimizerImpl.ADAMW:
        optimizer = torch.optim.AdamW(groups, **settings)
    else:
        from deepspeed.ops.adam import FusedAdam

        optimizer = FusedAdam(groups, **settings, adam_w_mode=True)
    # the groups' roles (build_param_groups: decayed, then not): load_state_dict replaces their own weight_decay values
    optimizer.bert_ds_decayed_groups = [True, False]
    return optimizer


def apply_optimizer_config(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Make the optimizer's settings this run's again after an optimizer-state load.

    ``load_state_dict`` (DeepSpeed's ZeRO load, and its universal-checkpoint loader) brings back the saved
    parameter groups with every setting they had: a phase-2 run with ``checkpoint.load_optimizer_state``
    would step with phase 1's betas, eps, weight decay and LAMB options, and phase 1's last learning rate
    until the scheduler next sets it. Only the moments and step counts should come from the checkpoint:
    this re-applies the ``optimizer`` section and the schedule's current learning rate (all ranks call it).
    """
    settings = group_settings(cfg)
    decayed = getattr(optimizer, "bert_ds_decayed_groups", [True] + [False] * (len(optimizer.param_groups) - 1))
    lrs = scheduler.get_last_lr()
    for i, group in enumerate(optimizer.param_groups):
        group.update(settings)
        group["weight_decay"] = cfg.weight_decay if decayed[i] else 0.0
        group["lr"] = lrs[i]
        group["initial_lr"] = scheduler.base_lrs[i]  # LambdaLR's record of the base lr; a scheduler rebuilt later reads it


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------------------------------

SCHEDULE_NAMES = ("linear", "polynomial", "cosine", "cosine_with_restarts", "constant", "constant_with_warmup")


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int, **kw: Any
) -> torch.optim.lr_scheduler.LRScheduler:
    """A warmup-then-decay LR schedule, counted in optimizer steps; pass it as ``deepspeed.initialize(lr_scheduler=...)``.

    All schedules come from ``transformers.get_scheduler`` (the same curves as HF's Trainer and the
    BERT reference code, already tested there). The LR of optimizer step ``k`` (0-based) is
    ``base_lr * f(k)``: warmup climbs linearly from 0 at step 0 to the base LR at ``warmup_steps``.

    Args:
        optimizer: the optimizer whose group LRs are scheduled (build it before ``deepspeed.initialize``).
        name: one of ``SCHEDULE_NAMES``.
        warmup_steps: optimizer steps of linear warmup (ignored by ``constant``).
        total_steps: optimizer steps of the whole run; the decay reaches its end here.
        **kw: schedule options: ``power`` and ``lr_end`` (absolute LR, default 1e-7) for ``polynomial``;
            ``num_cycles`` for ``cosine`` (default 0.5, a half cosine) and ``cosine_with_restarts`` (default 1).
    """
    from transformers import get_scheduler

    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown LR schedule {name!r}; expected one of {SCHEDULE_NAMES}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    if name == "constant" and warmup_steps:
        logger.warning("LR schedule 'constant' ignores warmup_steps=%d; use 'constant_with_warmup'", warmup_steps)
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup_steps,
        num_training_steps=total_steps,
        scheduler_specific_kwargs=kw or None,
    )
