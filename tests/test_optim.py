"""Fast, single-process tests of bert_ds.optim: LAMB against the paper's formulas, partitioned LAMB on
simulated ranks, partition layout arithmetic, parameter groups, LR schedules and optimizer selection.

The multi-process check against real DeepSpeed ZeRO is tests/test_lamb_zero.py.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from bert_ds import optim
from bert_ds.config import OptimizerConfig
from bert_ds.optim import (
    Lamb,
    OptimizerImpl,
    build_optimizer,
    build_param_groups,
    build_scheduler,
    configure_lamb_for_zero,
    select_optimizer_impl,
)
from bert_ds.zero.layout import FlatLayout, Segment, contiguous_partition_segments, sharded_params_segments

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (10,), (4, 4)]
NUM_STEPS = 5
LR = 0.05
WD = 0.01


def make_problem(seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Initial weights (shapes SHAPES) and NUM_STEPS gradients for each."""
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=gen) for shape in SHAPES]
    grads = [[torch.randn(shape, generator=gen) * 0.1 for shape in SHAPES] for _ in range(NUM_STEPS)]
    return weights, grads


# Parameters 0-2 are decayed, 3-5 are not (like weights vs biases/LayerNorm).
DECAYED = [0, 1, 2]
NOT_DECAYED = [3, 4, 5]


def reference_lamb(
    weights: list[torch.Tensor],
    grads: list[list[torch.Tensor]],
    *,
    bias_correction: bool,
    use_nvlamb: bool,
    max_trust_ratio: float | None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
) -> list[torch.Tensor]:
    """LAMB from the paper's Algorithm 2 (You et al. 2019), NVIDIA variant, in float64, one tensor at a time.

    m_t = b1 m + (1 - b1) g;  v_t = b2 v + (1 - b2) g^2;  m^ = m_t / (1 - b1^t);  v^ = v_t / (1 - b2^t)
    r_t = m^ / (sqrt(v^) + eps);  u = r_t + lambda w;  w <- w - lr * phi(||w||) / ||u|| * u, phi = identity,
    ratio 1 if ||w|| or ||u|| is 0; apex adapts only decayed tensors unless NVLAMB.
    """
    b1, b2 = betas
    out = []
    for i, w in enumerate(weights):
        wd = WD if i in DECAYED else 0.0
        w = w.double().clone()
        m = torch.zeros_like(w)
        v = torch.zeros_like(w)
        for t in range(1, len(grads) + 1):
            g = grads[t - 1][i].double()
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat = m / (1 - b1**t) if bias_correction else m
            v_hat = v / (1 - b2**t) if bias_correction else v
            u = m_hat / (v_hat.sqrt() + eps) + wd * w
            ratio = 1.0
            if wd != 0.0 or use_nvlamb:
                w_norm, u_norm = w.norm().item(), u.norm().item()
                if w_norm > 0 and u_norm > 0:
                    ratio = w_norm / u_norm
                if max_trust_ratio is not None:
                    ratio = min(ratio, max_trust_ratio)
            w = w - LR * ratio * u
        out.append(w)
    return out


def run_lamb(weights: list[torch.Tensor], grads: list[list[torch.Tensor]], **kw) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    groups = [
        {"params": [params[i] for i in DECAYED], "weight_decay": WD},
        {"params": [params[i] for i in NOT_DECAYED], "weight_decay": 0.0},
    ]
    opt = Lamb(groups, lr=LR, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("use_nvlamb", [False, True])
@pytest.mark.parametrize("max_trust_ratio", [10.0, None, 0.5])
def test_lamb_matches_the_papers_formulas_over_several_steps(bias_correction, use_nvlamb, max_trust_ratio):
    weights, grads = make_problem()
    kw = dict(bias_correction=bias_correction, use_nvlamb=use_nvlamb, max_trust_ratio=max_trust_ratio)
    got = run_lamb(weights, grads, **kw)
    want = reference_lamb(weights, grads, **kw)
    for g, w, w0 in zip(got, want, weights, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
        assert not torch.equal(g, w0)  # every tensor moved


def test_lamb_defaults_follow_apex_fused_lamb():
    defaults = Lamb([torch.nn.Parameter(torch.zeros(1))]).defaults
    assert defaults["betas"] == (0.9, 0.999)
    assert defaults["eps"] == 1e-6
    assert defaults["weight_decay"] == 0.01
    assert defaults["bias_correction"] is True
    assert defaults["use_nvlamb"] is False
    assert defaults["max_trust_ratio"] is None  # apex clamps nothing; DeepSpeed's FusedLamb clamps at 10


def test_zero_weights_take_the_plain_adam_step():
    # ||w|| = 0 (a freshly zeroed bias in a decayed group): ratio 1, so step 1 moves by lr * g / (|g| + eps)
    p = torch.nn.Parameter(torch.zeros(4))
    g = torch.tensor([0.5, -0.25, 1e-3, -2.0])
    p.grad = g.clone()
    Lamb([p], lr=0.1, weight_decay=WD, eps=1e-6).step()
    torch.testing.assert_close(p.detach(), -0.1 * g / (g.abs() + 1e-6))


def test_zero_update_leaves_the_weights_alone():
    # zero gradient and no decay: ||update|| = 0 gives ratio 1 and an update of exactly 0
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.zeros(3)
    Lamb([p], lr=0.1, weight_decay=0.0, use_nvlamb=True).step()
    assert torch.equal(p.detach(), torch.ones(3))


@pytest.mark.parametrize("max_trust_ratio", [10.0, None])
def test_trust_ratio_is_clamped_to_max_trust_ratio(max_trust_ratio):
    # step 1's Adam direction is ~sign(g), norm ~2, against ||w|| = 2000: a raw ratio of ~1000
    p = torch.nn.Parameter(torch.full((4,), 1000.0))
    p.grad = torch.tensor([1.0, -1.0, 1.0, -1.0])
    update = p.grad / (p.grad.abs() + 1e-6)
    raw_ratio = 2000.0 / update.norm().item()
    Lamb([p], lr=1e-3, weight_decay=0.0, use_nvlamb=True, max_trust_ratio=max_trust_ratio).step()
    ratio = raw_ratio if max_trust_ratio is None else max_trust_ratio
    torch.testing.assert_close(p.detach(), 1000.0 - 1e-3 * ratio * update)


def test_not_decayed_groups_skip_the_trust_ratio_unless_nvlamb():
    weights, grads = make_problem()
    plain = run_lamb(weights, grads, use_nvlamb=False)
    nvlamb = run_lamb(weights, grads, use_nvlamb=True)
    for i in DECAYED:
        assert torch.equal(plain[i], nvlamb[i])
    for i in NOT_DECAYED:
        assert not torch.allclose(plain[i], nvlamb[i])


def test_parameters_without_gradient_are_not_touched():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.ones(2)
    opt = Lamb([a, b], lr=0.1)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2))
    assert b not in opt.state


# ---------------------------------------------------------------------------------------------------
# Partition layouts (pure arithmetic)
# ---------------------------------------------------------------------------------------------------


def test_contiguous_partition_segments_example_from_the_docstring():
    numels, offsets = [6, 3, 5], [0, 6, 9]
    assert contiguous_partition_segments(numels, offsets, 0, 7) == [Segment(0, 6, 0, 0), Segment(6, 1, 1, 0)]
    assert contiguous_partition_segments(numels, offsets, 7, 7) == [Segment(0, 2, 1, 1), Segment(2, 5, 2, 0)]


def test_sharded_params_segments_example_from_the_docstring():
    assert sharded_params_segments([5, 2], [3, 1], 0) == [Segment(0, 3, 0, 0), Segment(3, 1, 1, 0)]
    assert sharded_params_segments([5, 2], [3, 1], 1) == [Segment(0, 2, 0, 3), Segment(3, 1, 1, 1)]


def _coverage(numels, segments_per_rank):
    """How many times each element of each parameter is held, over all ranks."""
    counts = [torch.zeros(n, dtype=torch.long) for n in numels]
    for segments in segments_per_rank:
        for seg in segments:
            counts[seg.param_index][seg.param_start : seg.param_start + seg.length] += 1
    return counts


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("padding", [0, 3])
def test_contiguous_partitions_hold_every_element_exactly_once(world_size, padding):
    numels = [7, 1, 64, 13, 2, 100, 5]
    offsets, pos = [], 0
    for n in numels:
        offsets.append(pos)
        pos += n + padding
    size = math.ceil(pos / world_size)
    per_rank = [contiguous_partition_segments(numels, offsets, r * size, size) for r in range(world_size)]
    assert all(torch.all(c == 1) for c in _coverage(numels, per_rank))
    for segments in per_rank:
        FlatLayout(tuple(segments), len(numels), size, None)  # validates order and bounds
    if world_size > 1:
        # some parameter straddles ranks: the case a per-partition LAMB gets wrong
        assert sum(len(s) for s in per_rank) > len(numels)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_sharded_partitions_hold_every_element_exactly_once(world_size):
    numels = [7, 1, 64, 13, 2, 100, 5]
    shards = [math.ceil(n / world_size) for n in numels]
    per_rank = [sharded_params_segments(numels, shards, r) for r in range(world_size)]
    assert all(torch.all(c == 1) for c in _coverage(numels, per_rank))
    for segments in per_rank:
        FlatLayout(tuple(segments), len(numels), sum(shards), None)


def test_flat_layout_rejects_overlapping_or_out_of_range_segments():
    with pytest.raises(ValueError):
        FlatLayout((Segment(0, 4, 0, 0), Segment(3, 2, 1, 0)), 2, 10, None)
    with pytest.raises(ValueError):
        FlatLayout((Segment(0, 4, 0, 0),), 2, 3, None)
    with pytest.raises(ValueError):
        FlatLayout((Segment(0, 4, 2, 0),), 2, 10, None)


# ---------------------------------------------------------------------------------------------------
# Partitioned LAMB on ranks simulated by threads (the real multi-process test is test_lamb_zero.py)
# ---------------------------------------------------------------------------------------------------


class _ThreadGroup:
    """Stands in for a process group when the ranks are threads of this process."""

    def __init__(self, rank: int, shared: SimpleNamespace) -> None:
        self.rank = rank
        self.shared = shared


def _thread_all_reduce(tensor, op=None, group=None):
    shared = group.shared
    shared.buffers[group.rank] = tensor.clone()
    shared.barrier.wait()
    total = sum(shared.buffers)  # the same order on every rank, so the same result
    shared.barrier.wait()  # all have read before anyone's next call overwrites its buffer
    tensor.copy_(total)


def _flat_group(tensors: list[torch.Tensor], padding: int, world_size: int) -> tuple[torch.Tensor, list[int]]:
    """Flatten with ``padding`` zeros after each tensor and a tail padded to a multiple of world_size."""
    parts, offsets, pos = [], [], 0
    for t in tensors:
        offsets.append(pos)
        parts += [t.flatten(), torch.zeros(padding)]
        pos += t.numel() + padding
    parts.append(torch.zeros(-pos % world_size))
    return torch.cat(parts), offsets


def run_partitioned_lamb(weights, grads, world_size: int, scheme: str, naive: bool = False, **kw) -> list[torch.Tensor]:
    """Run Lamb as ZeRO would on ``world_size`` simulated ranks; return the reassembled parameters.

    scheme "contiguous": each group is flattened (with inter-parameter padding) and cut into equal
    parts (ZeRO 1/2). scheme "sharded": every parameter is cut into world_size shards (ZeRO 3).
    """
    shared = SimpleNamespace(barrier=threading.Barrier(world_size, timeout=60), buffers=[None] * world_size)
    group_indices = [DECAYED, NOT_DECAYED]
    numels = [[weights[i].numel() for i in idx] for idx in group_indices]

    def partition(tensors: list[torch.Tensor], g: int, rank: int) -> tuple[torch.Tensor, list[Segment]]:
        if scheme == "contiguous":
            flat, offsets = _flat_group(tensors, padding=2, world_size=world_size)
            size = flat.numel() // world_size
            return flat[rank * size : (rank + 1) * size].clone(), contiguous_partition_segments(
                numels[g], offsets, rank * size, size
            )
        shards = [math.ceil(n / world_size) for n in numels[g]]
        padded = [torch.cat([t.flatten(), torch.zeros(s * world_size - t.numel())]) for t, s in zip(tensors, shards, strict=True)]
        flat = torch.cat([p[rank * s : (rank + 1) * s] for p, s in zip(padded, shards, strict=True)])
        return flat, sharded_params_segments(numels[g], shards, rank)

    def rank_main(rank: int) -> list[torch.Tensor]:
        flats, layouts = [], []
        for g, idx in enumerate(group_indices):
            flat, segments = partition([weights[i] for i in idx], g, rank)
            flats.append(flat)
            layouts.append(FlatLayout(tuple(segments), len(idx), flat.numel(), _ThreadGroup(rank, shared)))
        opt = Lamb(
            [{"params": [flats[0]], "weight_decay": WD}, {"params": [flats[1]], "weight_decay": 0.0}], lr=LR, **kw
        )
        if not naive:
            for flat, layout in zip(flats, layouts, strict=True):
                opt.set_flat_layout(flat, layout)
        for step_grads in grads:
            for g, idx in enumerate(group_indices):
                flats[g].grad = partition([step_grads[i] for i in idx], g, rank)[0]
            opt.step()
        return flats

    with ThreadPoolExecutor(world_size) as pool:
        per_rank = list(pool.map(rank_main, range(world_size)))

    # reassemble each parameter from the slices the ranks hold
    out = [torch.empty(w.numel()) for w in weights]
    for rank, flats in enumerate(per_rank):
        for g, idx in enumerate(group_indices):
            _, segments = partition([weights[i] for i in idx], g, rank)
            for seg in segments:
                out[idx[seg.param_index]][seg.param_start : seg.param_start + seg.length] = flats[g][
                    seg.start : seg.start + seg.length
                ]
    return [o.view_as(w) for o, w in zip(out, weights, strict=True)]


@pytest.mark.parametrize("scheme", ["contiguous", "sharded"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("use_nvlamb", [False, True])
def test_partitioned_lamb_matches_per_parameter_lamb(monkeypatch, scheme, world_size, use_nvlamb):
    monkeypatch.setattr(torch.distributed, "all_reduce", _thread_all_reduce)
    weights, grads = make_problem(seed=1)
    want = run_lamb(weights, grads, use_nvlamb=use_nvlamb)
    got = run_partitioned_lamb(weights, grads, world_size, scheme, use_nvlamb=use_nvlamb)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


class _AllocationLog(TorchDispatchMode):
    """Records the size of every tensor an op allocates (outputs that share no storage with its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out


def test_partitioned_lamb_step_allocates_nothing_partition_sized(monkeypatch):
    """A flat partition is hundreds of MB for BERT-large; the step must not make copies of it."""
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, op=None, group=None: None)
    numels = [4000, 3000, 2500, 500]
    flat = torch.randn(sum(numels) + 16)  # 16 elements of padding at the end
    flat[-16:] = 0
    segments, pos = [], 0
    for index, numel in enumerate(numels):
        segments.append(Segment(pos, numel, index, 0))
        pos += numel
    opt = Lamb([{"params": [flat], "weight_decay": WD}], lr=LR)
    opt.set_flat_layout(flat, FlatLayout(tuple(segments), len(numels), flat.numel(), object()))
    before = flat.clone()
    for _ in range(2):  # the first step also allocates the moments
        flat.grad = torch.randn(flat.numel()) * 0.1
        flat.grad[-16:] = 0
        with _AllocationLog() as log:
            opt.step()
    assert not torch.equal(flat, before)
    assert max(log.sizes) < min(numels), f"the step allocated a tensor of {max(log.sizes)} elements"


@pytest.mark.parametrize("scheme", ["contiguous", "sharded"])
def test_naive_per_partition_lamb_does_not_match(monkeypatch, scheme):
    monkeypatch.setattr(torch.distributed, "all_reduce", _thread_all_reduce)
    weights, grads = make_problem(seed=1)
    want = torch.cat([w.flatten() for w in run_lamb(weights, grads)])
    got = torch.cat([w.flatten() for w in run_partitioned_lamb(weights, grads, 2, scheme, naive=True)])
    start = torch.cat([w.flatten() for w in weights])
    # about 5% here (the tensors have similar norms); the partitioned runs above agree to 1e-6
    assert (got - want).norm() / (want - start).norm() > 0.02


def test_set_flat_layout_rejects_a_layout_of_the_wrong_size():
    flat = torch.zeros(10)
    with pytest.raises(ValueError):
        Lamb([flat]).set_flat_layout(flat, FlatLayout((Segment(0, 4, 0, 0),), 1, 9, None))


# ---------------------------------------------------------------------------------------------------
# configure_lamb_for_zero without a DeepSpeed engine
# ---------------------------------------------------------------------------------------------------


def test_configure_lamb_for_zero_is_a_no_op_for_other_optimizers_and_stage_0():
    p = torch.nn.Parameter(torch.zeros(3))
    adamw = torch.optim.AdamW([p])
    assert configure_lamb_for_zero(SimpleNamespace(basic_optimizer=adamw, optimizer=adamw)) == 0
    lamb = Lamb([p])
    # ZeRO stage 0, fp32: the engine steps the client optimizer directly
    assert configure_lamb_for_zero(SimpleNamespace(basic_optimizer=lamb, optimizer=lamb)) == 0
    assert lamb.flat_layouts == {}


def test_configure_lamb_for_zero_refuses_an_unknown_wrapper():
    lamb = Lamb([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(NotImplementedError, match="object"):
        configure_lamb_for_zero(SimpleNamespace(basic_optimizer=lamb, optimizer=object()))


# ---------------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = torch.nn.Linear(4, 4)
        self.LayerNorm = torch.nn.LayerNorm(4)  # BERT's (HF) spelling
        self.layer_norm = torch.nn.LayerNorm(4)
        self.final_norm = torch.nn.LayerNorm(4, bias=False)
        self.embeddings = torch.nn.Embedding(10, 4)
        self.frozen = torch.nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_exclude_bias_and_layer_norm_from_weight_decay():
    model = _Block()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = build_param_groups(model, weight_decay=0.01)
    assert decay["weight_decay"] == 0.01
    assert no_decay["weight_decay"] == 0.0
    assert [names[id(p)] for p in decay["params"]] == ["dense.weight", "embeddings.weight"]
    assert [names[id(p)] for p in no_decay["params"]] == [
        "dense.bias",
        "LayerNorm.weight",
        "LayerNorm.bias",
        "layer_norm.weight",
        "layer_norm.bias",
        "final_norm.weight",
    ]


def test_param_groups_skip_frozen_parameters():
    model = _Block()
    grouped = {id(p) for group in build_param_groups(model, 0.01) for p in group["params"]}
    assert id(model.frozen.weight) not in grouped
    assert id(model.frozen.bias) not in grouped
    assert len(grouped) == sum(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# LR schedules
# ---------------------------------------------------------------------------------------------------

WARMUP, TOTAL = 10, 110  # so the decay phase is 100 steps long


def lrs_at(name: str, steps: list[int], **kw) -> list[float]:
    """The LR each listed optimizer step (0-based) runs with, for base LR 1.0."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, name, WARMUP, TOTAL, **kw)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    out, done = [], 0
    for step in steps:
        for _ in range(step - done):
            opt.step()
            sched.step()
        done = step
        out.append(opt.param_groups[0]["lr"])
    return out


STEPS = [0, 5, WARMUP, 35, 60, TOTAL]  # start, mid-warmup, warmup end, quarter, midpoint, end


@pytest.mark.parametrize(
    "name, kw, expected",
    [
        ("linear", {}, [0.0, 0.5, 1.0, 0.75, 0.5, 0.0]),
        ("polynomial", {"power": 2.0, "lr_end": 0.0}, [0.0, 0.5, 1.0, 0.5625, 0.25, 0.0]),
        ("polynomial", {"power": 0.5, "lr_end": 0.1}, [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.75**0.5, 0.1 + 0.9 * 0.5**0.5, 0.1]),
        ("cosine", {}, [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.0]),
        ("cosine_with_restarts", {"num_cycles": 2}, [0.0, 0.5, 1.0, 0.5, 1.0, 0.0]),
        ("constant", {}, [1.0] * 6),
        ("constant_with_warmup", {}, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ],
)
def test_schedule_lr_at_warmup_end_midpoint_and_end(name, kw, expected):
    assert lrs_at(name, STEPS, **kw) == pytest.approx(expected, abs=1e-12)


def test_schedule_scales_every_param_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = Lamb([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 2e-3}])
    sched = build_scheduler(opt, "linear", WARMUP, TOTAL)
    for _ in range(5):
        opt.step()  # no gradients: only keeps the scheduler's step-order check quiet
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-3, 1e-3])


def test_schedule_rejects_unknown_names_and_bad_step_counts():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="unknown LR schedule"):
        build_scheduler(opt, "exponential", 10, 100)
    with pytest.raises(ValueError, match="warmup_steps"):
        build_scheduler(opt, "linear", 200, 100)


# ---------------------------------------------------------------------------------------------------
# Optimizer selection
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, device_type, expected",
    [
        ("lamb", "cuda", OptimizerImpl.LAMB),  # the same LAMB on every device and ZeRO stage: no FusedLamb
        ("lamb", "cpu", OptimizerImpl.LAMB),
        ("adamw", "cuda", OptimizerImpl.FUSED_ADAM),
        ("adamw", "cpu", OptimizerImpl.ADAMW),
    ],
)
def test_select_optimizer_impl(name, device_type, expected):
    assert select_optimizer_impl(name, device_type) is expected


def test_select_optimizer_impl_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown optimizer"):
        select_optimizer_impl("sgd", "cpu")


def _cfg(**kw) -> OptimizerConfig:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AdamW with a LAMB-only setting warns; here it is on purpose
        return OptimizerConfig(**kw)


# a value other than the default for every field of the optimizer section
CHANGED = {"lr": 3e-4, "weight_decay": 0.05, "betas": [0.8, 0.95], "eps": 1e-9, "bias_correction": False, "max_trust_ratio": 4.0}


def test_every_optimizer_setting_reaches_the_optimizer():
    """Each field of the optimizer section is passed on; a new field that is not is an error, never dropped."""
    assert set(CHANGED) == {f.name for f in dataclasses.fields(OptimizerConfig)} - {"name"}
    lamb = build_optimizer(_Block(), _cfg(name="lamb", **CHANGED), device_type="cpu")
    assert type(lamb) is Lamb
    for group, decayed in zip(lamb.param_groups, (True, False), strict=True):
        assert group["lr"] == 3e-4 and group["betas"] == (0.8, 0.95) and group["eps"] == 1e-9
        assert group["bias_correction"] is False and group["max_trust_ratio"] == 4.0
        assert group["weight_decay"] == (0.05 if decayed else 0.0)
    adamw = build_optimizer(_Block(), _cfg(name="adamw", **CHANGED), device_type="cpu")
    assert type(adamw) is torch.optim.AdamW
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in adamw.param_groups] == [(3e-4, (0.8, 0.95), 1e-9, 0.05), (3e-4, (0.8, 0.95), 1e-9, 0.0)]
    assert build_optimizer(_Block(), _cfg(), "cpu").param_groups[0]["max_trust_ratio"] is None  # 0 in the config: no bound


def test_an_optimizer_setting_without_a_home_is_an_error(monkeypatch):
    monkeypatch.setitem(optim._GROUP_KEYS, "lamb", {k: v for k, v in optim._GROUP_KEYS["lamb"].items() if k != "eps"})
    with pytest.raises(KeyError, match="optimizer.eps is not mapped"):
        optim.group_settings(_cfg())


@pytest.mark.parametrize("bias_correction", [True, False])
def test_bias_correction_setting_changes_the_first_step(bias_correction):
    """optimizer.bias_correction is honoured (it was declared and documented, and ignored): step 1 of the plain Adam
    path moves by lr * g / (|g| + eps) with correction, by lr * 0.1 g / (sqrt(0.001) |g| + eps) without."""
    block = _Block()
    trainable = [p for p in block.parameters() if p.requires_grad]
    for p in trainable:
        torch.nn.init.constant_(p, 0.0)
        p.grad = torch.full_like(p, 0.5)
    opt = build_optimizer(block, _cfg(lr=0.1, weight_decay=0.0, bias_correction=bias_correction), "cpu")
    opt.step()
    g = torch.tensor(0.5)
    want = -0.1 * g / (g + 1e-6) if bias_correction else -0.1 * (0.1 * g) / ((0.001 * g * g).sqrt() + 1e-6)
    for p in trainable:
        torch.testing.assert_close(p.detach(), torch.full_like(p, float(want)))


def apex_nvidia_lamb(weights, grads, lr=LR, betas=(0.9, 0.999), eps=1e-6, wd=WD, max_grad_norm=1.0):
    """NVIDIA's BERT LAMB, written from apex FusedLAMB's kernel (multi_tensor_lamb.cu) with NVIDIA's defaults: the
    gradients of all tensors pre-normalised by max(global norm / max_grad_norm, 1), bias-corrected moments, eps outside
    the square root, decoupled decay, no clamp, and no trust ratio for tensors without weight decay. fp64."""
    w = [x.double().clone() for x in weights]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    for t, step_grads in enumerate(grads, 1):
        g = [x.double() for x in step_grads]
        norm = torch.sqrt(sum((x * x).sum() for x in g))
        clip = norm / max_grad_norm if norm > max_grad_norm else 1.0
        for i in range(len(w)):
            decay = wd if i in DECAYED else 0.0
            gi = g[i] / clip
            m[i] = betas[0] * m[i] + (1 - betas[0]) * gi
            v[i] = betas[1] * v[i] + (1 - betas[1]) * gi * gi
            update = (m[i] / (1 - betas[0] ** t)) / ((v[i] / (1 - betas[1] ** t)).sqrt() + eps) + decay * w[i]
            w_norm, u_norm = w[i].norm(), update.norm()
            ratio = w_norm / u_norm if decay != 0 and w_norm > 0 and u_norm > 0 else 1.0
            w[i] = w[i] - lr * ratio * update
    return w


def test_lamb_with_deepspeeds_gradient_clipping_is_nvidias_bert_lamb():
    """Our Lamb, stepped on gradients clipped the way DeepSpeed's gradient_clipping (train.grad_clip = 1.0) does it
    before the optimizer, equals NVIDIA's recipe (apex FusedLAMB defaults) to float precision."""
    weights, grads = make_problem()
    grads = [[g * 3.0 for g in step] for step in grads]  # global norm well above 1: the pre-normalisation matters
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    groups = [{"params": [params[i] for i in DECAYED], "weight_decay": WD},
              {"params": [p for i, p in enumerate(params) if i not in DECAYED], "weight_decay": 0.0}]  # fmt: skip
    opt = Lamb(groups, lr=LR)  # every other setting at its default: the recipe
    for step in grads:
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in step))
        coef = 1.0 / (float(norm) + 1e-6)  # deepspeed.runtime.utils.clip_grad_norm_: max_norm / (total_norm + 1e-6)
        for p, g in zip(params, step, strict=True):
            p.grad = g * coef if coef < 1 else g.clone()
        opt.step()
    want = apex_nvidia_lamb(weights, grads)
    for got, w, w0 in zip(params, want, weights, strict=True):
        torch.testing.assert_close(got.detach().double(), w, rtol=2e-5, atol=2e-7)
        assert not torch.equal(got.detach(), w0)


def test_optimizer_settings_are_the_runs_again_after_loading_another_runs_state():
    """load_state_dict brings back the saved groups' lr, betas, eps, decay and LAMB options; apply_optimizer_config
    makes them this run's again and keeps the loaded moments and step counts."""
    phase1 = build_optimizer(_Block(), _cfg(lr=1e-2, betas=[0.8, 0.9], eps=1e-4, weight_decay=0.1, max_trust_ratio=2.0), "cpu")
    for p in (p for g in phase1.param_groups for p in g["params"]):
        p.grad = torch.ones_like(p)
    phase1.step()
    phase2_cfg = _cfg(lr=5e-3, betas=[0.9, 0.999], eps=1e-6, weight_decay=0.01, bias_correction=False)
    block = _Block()
    phase2 = build_optimizer(block, phase2_cfg, "cpu")
    scheduler = build_scheduler(phase2, "linear", warmup_steps=4, total_steps=10)
    phase2.load_state_dict(phase1.state_dict())
    assert phase2.param_groups[0]["betas"] == (0.8, 0.9)  # what a phase-2 step would have used
    optim.apply_optimizer_config(phase2, phase2_cfg, scheduler)
    for group, decay in zip(phase2.param_groups, (0.01, 0.0), strict=True):
        assert (group["betas"], group["eps"], group["weight_decay"], group["bias_correction"], group["max_trust_ratio"]) == (
            (0.9, 0.999), 1e-6, decay, False, None)
        assert group["lr"] == 0.0 and group["initial_lr"] == 5e-3  # warmup step 0 of phase 2's own schedule
    state = phase2.state[block.dense.weight]
    assert state["step"] == 1 and torch.count_nonzero(state["exp_avg"]) > 0  # the moments are phase 1's
