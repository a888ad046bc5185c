"""A problem whose answer is known: conditional Gaussian mixtures, a small MLP velocity net, and the whole
InstaFlow recipe on them (1-RF -> triplets -> 2-RF -> one-step distillation), trained through the same
`training.train` and sampled with the same `rectified_flow` functions as the SD models.

The condition is a class id standing in for a prompt; class `num_classes` is the null class used for
classifier-free guidance (the "" prompt). Each class is itself a mixture of well separated modes, so the
1-RF (trained on independent noise/data pairs) has to bend its paths, and reflow has something to fix.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from instaflow_core import rectified_flow as rf
from instaflow_core.config import TrainConfig, TrainStageConfig
from instaflow_core.training import BatchRequest, train


# ------------------------------------------------------------------------------------------- the data
@dataclass
class GaussianMixture:
    """p(x | c) = mixture of the modes with mode_class == c, equal weights, isotropic std; classes uniform."""

    means: Tensor  # (M, D)
    mode_class: Tensor  # (M,) long
    std: float
    num_classes: int

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(
        self, n: int, generator: torch.Generator | None = None, classes: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """n exact samples: (x (n, D), c (n,)); `classes` fixes the class of each row."""
        if classes is None:
            classes = torch.randint(self.num_classes, (n,), generator=generator)
        per_class = [torch.nonzero(self.mode_class == k).flatten() for k in range(self.num_classes)]
        counts = torch.tensor([len(p) for p in per_class])
        pick = (torch.rand(n, generator=generator) * counts[classes]).long()  # (n,) mode index within class
        table = torch.nn.utils.rnn.pad_sequence(per_class, batch_first=True)  # (K, max modes)
        modes = table[classes, pick]  # (n,)
        x = self.means[modes] + self.std * torch.randn(n, self.dim, generator=generator)
        return x, classes


def make_mixture(
    dim: int = 2,
    num_classes: int = 4,
    modes_per_class: int = 2,
    radius: float = 3.0,
    std: float = 0.2,
    seed: int = 0,
) -> GaussianMixture:
    """Modes spread around a circle (2-D) or a sphere (random directions, D > 2); class k owns modes
    k, k + K, k + 2K ... so every class is spread across the space (multimodal and far from its mean)."""
    m = num_classes * modes_per_class
    if dim == 2:
        ang = torch.arange(m, dtype=torch.float32) * (2 * math.pi / m)
        means = radius * torch.stack([ang.cos(), ang.sin()], dim=1)
    else:
        g = torch.Generator().manual_seed(seed)
        d = torch.randn(m, dim, generator=g)
        means = radius * d / d.norm(dim=1, keepdim=True)
    return GaussianMixture(means, torch.arange(m) % num_classes, std, num_classes)


# ------------------------------------------------------------------------------------------- the model
class MLPVelocity(nn.Module):
    """v(x_t, t, class) for small problems: [x, Fourier(t), embed(class)] -> MLP -> velocity (B, D)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 3, t_freqs: int = 8):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(t_freqs, dtype=torch.float32) / 2)
        self.embed = nn.Embedding(num_classes + 1, hidden)  # last row = null class (CFG)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * t_freqs + hidden, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        tf = t.to(x.dtype)[:, None] * self.freqs  # (B, F)
        h = torch.cat([x, tf.sin(), tf.cos(), self.embed(cond)], dim=1)  # (B, D + 2F + H)
        return self.net(h)  # (B, D)


# ------------------------------------------------------------------------------------------- batches
def _seed(*parts: int) -> int:
    """A generator seed from a few integers, the same in every process and Python version."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def tensor_batches(data: dict[str, Tensor], seed: int = 0) -> Callable[[BatchRequest], Iterator[dict]]:
    """A deterministic, rank-sharded, seekable batch factory over in-memory tensors (same first dim).

    Each epoch is a fresh permutation (seeded by seed, stage and epoch) cut into N // micro full micro-batches;
    global micro-batch g = i * world + rank is rank's i-th, so ranks never share a row within an epoch.
    """
    n = next(iter(data.values())).shape[0]

    def factory(req: BatchRequest) -> Iterator[dict]:
        mb = req.micro_batch_size
        per_epoch = n // mb
        if per_epoch < req.world_size:
            raise ValueError(f"{n} rows are too few for micro-batches of {mb} on {req.world_size} processes")
        perms: dict[int, Tensor] = {}
        i = req.start
        while True:
            g = i * req.world_size + req.rank
            epoch, slot = divmod(g, per_epoch)
            if epoch not in perms:
                gen = torch.Generator().manual_seed(_seed(seed, req.seed, req.stage_index, epoch))
                perms = {epoch: torch.randperm(n, generator=gen)}
            rows = perms[epoch][slot * mb : (slot + 1) * mb]
            yield {k: v[rows] for k, v in data.items()}
            i += 1

    return factory


def noise_data_batches(mixture: GaussianMixture, seed: int = 0) -> Callable[[BatchRequest], Iterator[dict]]:
    """Endless independent pairs (x0 ~ N(0, I), (x1, c) ~ mixture) for the 1-RF; micro-batch g has its own seed."""

    def factory(req: BatchRequest) -> Iterator[dict]:
        i = req.start
        while True:
            g = i * req.world_size + req.rank
            gen = torch.Generator().manual_seed(_seed(seed, req.seed, req.stage_index, g))
            x0 = torch.randn(req.micro_batch_size, mixture.dim, generator=gen)
            x1, c = mixture.sample(req.micro_batch_size, gen)
            yield {"x0": x0, "x1": x1, "cond": c}
            i += 1

    return factory


# ------------------------------------------------------------------------------------------- losses
def drop_cond(cond: Tensor, null_class: int, p: float) -> Tensor:
    """Replace each class by the null class with probability p (trains the unconditional branch for CFG)."""
    if p <= 0:
        return cond
    return torch.where(
        torch.rand(cond.shape, device=cond.device) < p, torch.full_like(cond, null_class), cond
    )


def reflow_loss_fn(
    null_class: int, t_schedule: str = "uniform", p_uncond: float = 0.1, huber_c: float = 0.001
):
    """loss_fn(model, batch) for (re)flow: t from the schedule, class dropout, the stage's loss kind."""

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        x0, x1 = batch["x0"], batch["x1"]
        t = rf.sample_t(x0.shape[0], t_schedule, device=x0.device)
        cond = drop_cond(batch["cond"], null_class, p_uncond)
        return rf.reflow_loss(model, x0, x1, cond, t, kind=batch["stage"].loss, huber_c=huber_c)

    return loss_fn


def distill_loss_fn(huber_c: float = 0.001):
    """loss_fn(model, batch) for one-step distillation at t = 0 (conditions kept: the student serves w = 1)."""

    def loss_fn(model: nn.Module, batch: dict) -> Tensor:
        return rf.distill_loss(model, batch["x0"], batch["x1"], batch["cond"], batch["stage"].loss, huber_c)

    return loss_fn


# ------------------------------------------------------------------------------------------- metrics
def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 256, seed: int = 0, p: int = 1) -> float:
    """Sliced p-Wasserstein distance between two equal-size point sets (n, D), p in {1, 2}.

    p = 1 by default: W2 punishes the few percent of mass that sampling noise moves between far-apart modes
    so hard that its noise floor hides the differences between models; W1 weighs it linearly.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)  # (D, P)
    pa, _ = (a.float() @ dirs).sort(dim=0)  # (n, P)
    pb, _ = (b.float() @ dirs).sort(dim=0)
    d = (pa - pb).abs()
    return float(d.mean()) if p == 1 else float(d.pow(2).mean().sqrt())


@torch.no_grad()
def sample_error(
    model: nn.Module, mixture: GaussianMixture, steps: int, n_per_class: int, seed: int, guidance: float = 1.0
) -> float:
    """Mean over classes of SW1(model's `steps`-step Euler samples of class k, exact samples of class k)."""
    errs = []
    for k in range(mixture.num_classes):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        x0 = torch.randn(n_per_class, mixture.dim, generator=g)
        c = torch.full((n_per_class,), k, dtype=torch.long)
        uncond = torch.full((1,), mixture.num_classes, dtype=torch.long)
        x = rf.euler_sample(model, x0, c, steps, guidance=guidance, uncond=uncond)
        true, _ = mixture.sample(n_per_class, g, classes=c)
        errs.append(sliced_wasserstein(x, true, seed=seed))
    return sum(errs) / len(errs)


def true_floor(mixture: GaussianMixture, n_per_class: int, seed: int) -> float:
    """SW1 between two independent exact sample sets of the same size: the metric's noise floor."""
    errs = []
    for k in range(mixture.num_classes):
        g = torch.Generator().manual_seed(seed * 7 + k + 99)
        c = torch.full((n_per_class,), k, dtype=torch.long)
        a, _ = mixture.sample(n_per_class, g, classes=c)
        b, _ = mixture.sample(n_per_class, g, classes=c)
        errs.append(sliced_wasserstein(a, b, seed=seed))
    return sum(errs) / len(errs)


@torch.no_grad()
def flow_straightness(model: nn.Module, mixture: GaussianMixture, n: int, steps: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed + 12345)
    x0 = torch.randn(n, mixture.dim, generator=g)
    c = torch.randint(mixture.num_classes, (n,), generator=g)
    return rf.straightness(model, x0, c, steps)


@torch.no_grad()
def ode_pairs(model: nn.Module, mixture: GaussianMixture, n: int, steps: int, seed: int) -> dict[str, Tensor]:
    """(x0, cond, x1 = the model's own `steps`-step Euler ODE output): triplets / distillation pairs."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, mixture.dim, generator=g)
    c = torch.randint(mixture.num_classes, (n,), generator=g)
    x1 = torch.cat(
        [rf.euler_sample(model, x0[i : i + 4096], c[i : i + 4096], steps) for i in range(0, n, 4096)]
    )
    return {"x0": x0, "x1": x1, "cond": c}


# ------------------------------------------------------------------------------------------- the recipe
@dataclass
class GMMSettings:
    """Sizes and budgets of the toy experiment (defaults: the benchmark, ~1-3 min on 2 CPU cores)."""

    dim: int = 2
    num_classes: int = 4
    modes_per_class: int = 2
    radius: float = 3.0
    std: float = 0.2
    hidden: int = 128
    depth: int = 3
    seed: int = 0
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 50
    p_uncond: float = 0.1
    rf_steps: int = 3000  # 1-RF on independent pairs
    n_triplets: int = 20000
    ode_steps: int = 100  # Euler steps of the teachers' ODE (triplets and distillation pairs)
    reflow_steps: int = 2000  # 2-RF from the 1-RF on the triplets
    n_distill_pairs: int = 20000
    distill_steps: int = 300  # the SAME budget for both students, each initialised from its teacher
    distill_lr: float = 1e-3
    eval_per_class: int = 2000
    eval_steps: int = 25  # the N of the N-step error
    straightness_steps: int = 50
    straightness_n: int = 2000
    threads: int | None = 1  # torch threads while it runs: a 128-wide MLP is fastest on one (None = leave)


@dataclass
class GMMReport:
    settings: dict
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> metrics
    floor: float = 0.0  # SW1 between two exact sample sets of the eval size
    seconds: dict[str, float] = field(default_factory=dict)
    # the trained models and each teacher's distillation pairs, for follow-up experiments (not serialised)
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    pairs: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)

    def table(self) -> str:
        n = self.settings["eval_steps"]
        head = f"| model | straightness | 1-step SW1 | 2-step SW1 | {n}-step SW1 |"
        lines = [head, "|---|---|---|---|---|"]
        for name, r in self.rows.items():
            lines.append(
                f"| {name} | {r['straightness']:.4f} | {r['err_1']:.4f} | {r['err_2']:.4f} | {r['err_n']:.4f} |"
            )
        lines.append(
            f"| exact samples (noise floor) | 0 | {self.floor:.4f} | {self.floor:.4f} | {self.floor:.4f} |"
        )
        return "\n".join(lines)


def _train_cfg(s: GMMSettings, steps: int, lr: float, loss: str = "l2") -> TrainConfig:
    return TrainConfig(
        stages=[TrainStageConfig(steps=steps, batch_size=s.batch_size, loss=loss)],
        lr=lr,
        warmup_steps=s.warmup_steps,
        grad_clip=1.0,
        ema_decay=0.99,
        checkpoint_every=10**9,  # only the final checkpoint
        log_every=max(1, steps // 4),
        seed=s.seed,
        keep_checkpoints=1,
    )


def distill_student(
    teacher: nn.Module, pairs: dict[str, Tensor], s: GMMSettings, steps: int, ckpt_dir: str
) -> nn.Module:
    """A one-step student initialised from `teacher`, trained `steps` steps on the teacher's ODE pairs."""
    student = copy.deepcopy(teacher).train()
    cfg = _train_cfg(s, steps, s.distill_lr)
    train(student, tensor_batches(pairs, s.seed), distill_loss_fn(), cfg, ckpt_dir)
    return student.eval()


def evaluate(model: nn.Module, mixture: GaussianMixture, s: GMMSettings) -> dict[str, float]:
    model.eval()
    return {
        "straightness": flow_straightness(model, mixture, s.straightness_n, s.straightness_steps, s.seed),
        "err_1": sample_error(model, mixture, 1, s.eval_per_class, s.seed),
        "err_2": sample_error(model, mixture, 2, s.eval_per_class, s.seed),
        "err_n": sample_error(model, mixture, s.eval_steps, s.eval_per_class, s.seed),
    }


def run_gmm_experiment(s: GMMSettings, workdir: str | None = None) -> GMMReport:
    """1-RF -> triplets -> 2-RF -> distill(1-RF), distill(2-RF); every model evaluated against exact samples.

    Every model is trained by `training.train` (checkpoints under `workdir`, a temporary folder if None).
    """
    mixture = make_mixture(s.dim, s.num_classes, s.modes_per_class, s.radius, s.std, seed=s.seed)
    report = GMMReport(settings=asdict(s))
    reflow_fn = reflow_loss_fn(mixture.num_classes, p_uncond=s.p_uncond)
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="gmm-"))
        if s.threads:
            torch.set_num_threads(s.threads)
            stack.callback(torch.set_num_threads, threads)

        @contextlib.contextmanager
        def clock(name: str) -> Iterator[None]:
            t0 = time.perf_counter()
            yield
            report.seconds[name] = round(time.perf_counter() - t0, 2)

        # 1-RF: independent (noise, data) pairs
        torch.manual_seed(s.seed)
        rf1 = MLPVelocity(s.dim, s.num_classes, s.hidden, s.depth)
        with clock("1-RF"):
            cfg = _train_cfg(s, s.rf_steps, s.lr)
            train(rf1, noise_data_batches(mixture, s.seed), reflow_fn, cfg, f"{workdir}/rf1")
        # triplets (x0, class, x1) from the 1-RF's ODE; the 2-RF starts from the 1-RF
        with clock("triplets"):
            triplets = ode_pairs(rf1.eval(), mixture, s.n_triplets, s.ode_steps, s.seed + 1)
        rf2 = copy.deepcopy(rf1).train()
        with clock("2-RF"):
            cfg = _train_cfg(s, s.reflow_steps, s.lr)
            train(rf2, tensor_batches(triplets, s.seed), reflow_fn, cfg, f"{workdir}/rf2")
        # one-step students: each starts from its teacher, learns that teacher's ODE map, same budget
        students = {}
        for name, teacher in (("1-RF", rf1), ("2-RF", rf2)):
            with clock(f"pairs {name}"):
                pairs = ode_pairs(teacher.eval(), mixture, s.n_distill_pairs, s.ode_steps, s.seed + 2)
            with clock(f"distill {name}"):
                students[name] = distill_student(
                    teacher, pairs, s, s.distill_steps, f"{workdir}/distill-{name}"
                )
            report.pairs[name] = pairs
        report.models = models = {
            "1-RF": rf1,
            "2-RF": rf2,
            "distill(1-RF)": students["1-RF"],
            "distill(2-RF)": students["2-RF"],
        }
        with clock("evaluate"):
            for name, model in models.items():
                report.rows[name] = evaluate(model, mixture, s)
            report.floor = true_floor(mixture, s.eval_per_class, s.seed)
    return report
