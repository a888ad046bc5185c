"""GPU memory of full fine-tuning, per training process: the formula the preflight and the benchmarks share.

    estimate(params, activations, micro_batch=..., ...)   -> MemoryEstimate (bytes per term, `.total`, `.line()`)
    largest_micro_batch(...)                              the largest micro-batch whose estimate fits a budget
    fsdp_processes(...)                                   the fewest FSDP processes whose estimate fits

The terms, for a denoiser of P parameters trained as `training/job.py` trains it (float32 master weights, mixed
precision by autocast, text conditions read from the store so no text encoder is in memory):

    weights      4 P           float32 master copy
    grads        4 P           float32, the parameters' dtype
    AdamW        8 P           two float32 moments (2 P with use_8bit_adam: bitsandbytes' 8-bit states)
    EMA          4 P           the float32 average (`training/ema.py`), on the training device
    DDP buckets  4 P           more than one process without FSDP: DDP's gradient buckets are a second copy
    FSDP         (weights + grads + AdamW + EMA) / N, plus two gathered blocks (the one running and the one
                 prefetched) with their gradients, in the gather dtype
    frozen       4 F           the networks loaded beside the student in float32 (the VAE: F parameters)
    activations  A + B x a     peak bytes autograd keeps for a micro-batch of B (`models/footprint.py` counts A
                 and a from the configs; with gradient checkpointing they include the recomputed unit)
    batch        B x c         the micro-batch's conditions and latents on the device
    reserve      3 GB          CUDA context, cuBLAS / cuDNN workspaces, allocator slack

GB here is 2^30 bytes (what `nvidia-smi` and torch report as GiB); a budget of 80 means 80 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GB = 1024**3
RESERVE_GB = 3.0  # CUDA context (~0.5 GB), workspaces, fragmentation of the caching allocator
# bytes of a gathered FSDP parameter by the section's mixed precision (the gather dtype)
PRECISIONS = {"no": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per training process, by term (see the module docstring)."""

    terms: dict[str, float]
    micro_batch: int
    gradient_checkpointing: bool
    processes: int = 1
    fsdp: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def total_gb(self) -> float:
        return self.total / GB

    def fits(self, budget_gb: float) -> bool:
        return self.total <= budget_gb * GB

    def breakdown(self) -> str:
        """'weights 9.6 GB, grads 9.6 GB, ...': every non-zero term."""
        return ", ".join(f"{k} {gb(v)} GB" for k, v in self.terms.items() if v > 0)

    def line(self) -> str:
        """'needs ~X GB (weights Y GB, ...)' for one micro-batch."""
        return f"needs ~{gb(self.total)} GB ({self.breakdown()})"


def gb(n: float) -> str:
    """Bytes as GB with a precision that shows small tiny-model numbers too."""
    v = n / GB
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3g}"


def estimate(
    params: int,
    activation_fixed: float,
    activation_per_sample: float,
    *,
    micro_batch: int,
    gradient_checkpointing: bool = False,
    mixed_precision: str = "bf16",
    use_8bit_adam: bool = False,
    ema: bool = True,
    processes: int = 1,
    fsdp: bool = False,
    largest_block: int = 0,
    frozen_params: int = 0,
    batch_bytes_per_sample: float = 0.0,
    reserve_gb: float = RESERVE_GB,
) -> MemoryEstimate:
    """The memory of one training process. `activation_fixed` / `activation_per_sample`: peak saved-activation
    bytes A and a (the counts for this `gradient_checkpointing` setting); `largest_block`: parameters of the
    largest unit FSDP gathers; `frozen_params`: float32 networks beside the student (the VAE)."""
    shards = processes if fsdp and processes > 1 else 1
    adam = 2 if use_8bit_adam else 8
    terms: dict[str, float] = {
        "weights": 4 * params / shards,
        "grads": 4 * params / shards,
        ("8-bit AdamW" if use_8bit_adam else "AdamW"): adam * params / shards,
        "EMA": (4 * params / shards) if ema else 0.0,
    }
    if processes > 1 and not fsdp:
        terms["DDP buckets"] = 4 * params
    if shards > 1:
        gathered = PRECISIONS.get(mixed_precision, 4)
        # the running and the prefetched block: weights in the gather dtype, their float32 gradients
        terms["gathered blocks"] = 2 * largest_block * (gathered + 4)
    terms["activations"] = activation_fixed + micro_batch * activation_per_sample
    terms["VAE"] = 4 * frozen_params
    terms["batch"] = micro_batch * batch_bytes_per_sample
    terms["reserve"] = reserve_gb * GB
    return MemoryEstimate(
        terms=terms,
        micro_batch=micro_batch,
        gradient_checkpointing=gradient_checkpointing,
        processes=processes,
        fsdp=fsdp,
    )


def largest_micro_batch(
    budget_gb: float, params: int, activation_fixed: float, activation_per_sample: float, **kwargs: object
) -> int:
    """The largest micro-batch whose estimate fits `budget_gb` (0: not even one sample). `kwargs` as `estimate`
    (without micro_batch)."""
    base = estimate(params, activation_fixed, activation_per_sample, micro_batch=0, **kwargs)  # type: ignore[arg-type]
    room = budget_gb * GB - base.total
    per = activation_per_sample + float(kwargs.get("batch_bytes_per_sample", 0.0) or 0.0)  # type: ignore[arg-type]
    if room < per:
        return 0
    return int(room // per) if per > 0 else 1 << 20


def fsdp_processes(
    budget_gb: float,
    params: int,
    activation_fixed: float,
    activation_per_sample: float,
    *,
    micro_batch: int,
    limit: int = 64,
    **kwargs: object,
) -> int | None:
    """The fewest FSDP processes (GPUs) whose per-process estimate fits `budget_gb` at `micro_batch`, up to
    `limit` (None: none does: the activations alone do not fit)."""
    for n in range(2, limit + 1):
        est = estimate(
            params,
            activation_fixed,
            activation_per_sample,
            micro_batch=micro_batch,
            processes=n,
            fsdp=True,
            **kwargs,  # type: ignore[arg-type]
        )
        if est.fits(budget_gb):
            return n
    return None
