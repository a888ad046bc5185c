"""A denoiser's training footprint from its configs alone: no weights read, no memory taken, no arithmetic done.

    parameter_count(index, configs, name)      component `name` built on the meta device: its parameter count
    largest_block(index, configs, name)        the parameters of its largest block (`_no_split_modules`): what
                                               FSDP gathers at a time
    forward_flops(family, index, configs, latent_shape)   FLOPs of one forward, on fake tensors
    count_activations(family, index, configs, latent_shape, ...)
                                               the denoiser built on fake tensors (torch's FakeTensorMode: shapes
                                               and dtypes, no storage) and run forward through the family's own
                                               velocity at batch 1 and 2, counting the bytes autograd saves for
                                               backward: `ActivationBytes(fixed, per_sample)`

The activations are counted, not modelled: every tensor the forward saves for backward (parameters excluded, each
storage once), under the training's autocast (bf16 / fp16: the low-precision weight copies autocast saves are
the `fixed` part; they do not grow with the batch) and with gradient checkpointing as diffusers does it. With
checkpointing, backward recomputes one checkpointed unit at a time and holds its activations meanwhile: the
largest unit's (counted by running each unit once unchecked inside the checkpoint function) is added, so the
count is the peak of saved activations, not only what the forward leaves.

Fake tensors on the CPU pick the CPU's kernels: SDPA saves its output and log-sum-exp (linear in the tokens, as
flash / memory-efficient attention on a GPU), and the CPU autocast lists decide which ops run in low precision
(CUDA's differ in a few normalisation ops). benchmarks/footprint.py checks the count against a real CPU forward at
real width (docs/what-ran.md). FLUX.1's 12B at 1024 px counts in seconds.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from instaflow_core.errors import DataError
from instaflow_core.models.family import Condition, ModelFamily, component_class

# the precisions a training section names -> the autocast dtype (None: float32 throughout)
AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ActivationBytes:
    """Peak bytes of saved activations for a micro-batch of B samples: `fixed + B * per_sample`."""

    fixed: int
    per_sample: int

    def at(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample


def network_class(index: dict[str, Any], configs: dict[str, dict[str, Any]], name: str) -> type:
    """The class of component `name` from model_index.json and its config (no folder needed)."""
    if name not in configs:
        raise DataError(f"no {name}/config.json")
    return component_class("", name, index, configs[name])


def build_network(index: dict[str, Any], configs: dict[str, dict[str, Any]], name: str) -> nn.Module:
    """Component `name` from its config, under whatever device / tensor mode the caller set (meta, fake)."""
    cls = network_class(index, configs, name)
    if cls.__module__.startswith("transformers"):
        config = cls.config_class.from_dict(
            {k: v for k, v in configs[name].items() if k not in ("architectures", "transformers_version")}
        )
        return cls(config)
    return cls.from_config(configs[name])


def _quiet_diffusers() -> contextlib.AbstractContextManager:
    """diffusers warns about fp32-kept modules on every `from_config`; not news for a count."""
    try:
        from diffusers.utils import logging as dlog
    except ImportError:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        level = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            yield
        finally:
            dlog.set_verbosity(level)

    return quiet()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype for the block: modules built inside are created in it (no float32 copy first)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def parameter_count(index: dict[str, Any], configs: dict[str, dict[str, Any]], name: str) -> int:
    """Parameters of component `name`, built from its config on the meta device (shapes only)."""
    with _quiet_diffusers(), torch.device("meta"):
        net = build_network(index, configs, name)
    return sum(p.numel() for p in net.parameters())


def largest_block(index: dict[str, Any], configs: dict[str, dict[str, Any]], name: str) -> int:
    """Parameters of the largest unit FSDP gathers at a time when it wraps the network's `_no_split_modules`
    classes: each parameter belongs to its innermost wrapped module (the root holds the rest)."""
    with _quiet_diffusers(), torch.device("meta"):
        net = build_network(index, configs, name)
    kinds = set(getattr(net, "_no_split_modules", None) or ())
    wrapped = [n for n, m in net.named_modules() if n and type(m).__name__ in kinds]
    units: dict[str, int] = {}
    for pname, p in net.named_parameters():
        owner = max((w for w in wrapped if pname.startswith(w + ".")), key=len, default="")
        units[owner] = units.get(owner, 0) + p.numel()
    return max(units.values(), default=0)


class _SavedBytes:
    """A saved-tensors hook that sums, per storage, the bytes autograd keeps (parameters excluded)."""

    def __init__(self, skip: set[Any]) -> None:
        self.skip, self.sizes = skip, {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        from torch.multiprocessing.reductions import StorageWeakRef

        ref = StorageWeakRef(t.untyped_storage())
        if ref not in self.skip:
            self.sizes[ref] = max(self.sizes.get(ref, 0), t.untyped_storage().nbytes())
        return t

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def _checkpointing(net: nn.Module, skip: set[Any], largest: list[int]) -> Callable[..., Any]:
    """diffusers' checkpoint function, counting each unit's own activations first (what backward's
    recomputation holds while the unit runs backward): the largest goes into `largest[0]`."""
    from torch.utils.checkpoint import checkpoint

    def func(module: Callable[..., Any], *args: Any) -> Any:
        inner = _SavedBytes(skip)
        with inner.hooks():
            module(*args)
        largest[0] = max(largest[0], inner.total)
        return checkpoint(
            module.__call__ if isinstance(module, nn.Module) else module, *args, use_reentrant=False
        )

    return func


def saved_activations(
    family: ModelFamily,
    net: nn.Module,
    cond_shapes: dict[str, tuple[int, ...]],
    latent_shape: tuple[int, ...],
    batch: int,
    *,
    mixed_precision: str = "bf16",
    gradient_checkpointing: bool = False,
) -> int:
    """Peak saved-activation bytes of one training forward of `net` (real or fake tensors, its parameters
    requiring grad) through the family's velocity on random inputs: what autograd keeps for backward (parameters
    and buffers excluded, each storage once), plus with checkpointing the largest unit's recomputed activations."""
    from torch.multiprocessing.reductions import StorageWeakRef

    if mixed_precision not in AUTOCAST:
        raise DataError(f"mixed_precision={mixed_precision!r}: choose one of {sorted(AUTOCAST)}")
    checkpointing = gradient_checkpointing and bool(getattr(net, "_supports_gradient_checkpointing", False))
    skip = {StorageWeakRef(t.untyped_storage()) for t in (*net.parameters(), *net.buffers())}
    largest = [0]
    if checkpointing:
        net.enable_gradient_checkpointing(_checkpointing(net, skip, largest))
    device = next(net.parameters()).device
    counter = _SavedBytes(skip)
    x = torch.randn(batch, *latent_shape, device=device)
    t = torch.full((batch,), 0.5, device=device)
    cond = Condition.from_tensors(
        {k: torch.randn(batch, *shape, device=device) for k, shape in cond_shapes.items()}
    )
    dtype = AUTOCAST[mixed_precision]
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    try:
        with counter.hooks(), amp:
            family.velocity(net, x, t, cond)
    finally:
        if checkpointing:
            net.disable_gradient_checkpointing()
    return counter.total + largest[0]


def count_activations(
    family: ModelFamily,
    index: dict[str, Any],
    configs: dict[str, dict[str, Any]],
    latent_shape: tuple[int, ...],
    *,
    mixed_precision: str = "bf16",
    gradient_checkpointing: bool = False,
    weights_dtype: torch.dtype = torch.float32,
) -> ActivationBytes:
    """Peak saved-activation bytes of training the family's denoiser at latents `latent_shape` (C, h, w), master
    weights in `weights_dtype` (float32, as training keeps them) under `mixed_precision` autocast: counted on fake
    tensors at batch 1 and 2."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cond_shapes = family.condition_shapes(configs)
    with _quiet_diffusers(), warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter("ignore")  # autocast's notes on ops it leaves in float32
        with default_dtype(weights_dtype):  # built in it: a fake module cannot be cast in place
            net = build_network(index, configs, family.denoiser).train().requires_grad_(True)
        at = [
            saved_activations(
                family, net, cond_shapes, tuple(latent_shape), b,
                mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing,
            )
            for b in (1, 2)
        ]  # fmt: skip
    per_sample = max(0, at[1] - at[0])
    return ActivationBytes(fixed=max(0, at[0] - per_sample), per_sample=per_sample)


def forward_flops(
    family: ModelFamily,
    index: dict[str, Any],
    configs: dict[str, dict[str, Any]],
    latent_shape: tuple[int, ...],
) -> int:
    """FLOPs of one denoiser forward at batch 1 through the family's velocity (matmuls, convolutions, attention:
    torch's FlopCounterMode), counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with _quiet_diffusers(), warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
        warnings.simplefilter("ignore")
        net = build_network(index, configs, family.denoiser)
        shapes = family.condition_shapes(configs)
        cond = Condition.from_tensors({k: torch.randn(1, *s) for k, s in shapes.items()})
        x, t = torch.randn(1, *latent_shape), torch.full((1,), 0.5)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            family.velocity(net, x, t, cond)
    return int(counter.get_total_flops())


def condition_bytes(family: ModelFamily, configs: dict[str, dict[str, Any]], itemsize: int = 4) -> int:
    """Bytes of one prompt's condition on the training device (float32 by default)."""
    total = 0
    for shape in family.condition_shapes(configs).values():
        n = 1
        for d in shape:
            n *= int(d)
        total += n * itemsize
    return total
