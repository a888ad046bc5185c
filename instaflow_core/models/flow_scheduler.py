"""A diffusers scheduler for rectified-flow UNets: the project's Euler steps, inside diffusers' own pipelines.

A student UNet trained by reflow / distillation predicts the velocity v = X1 - X0 at the SD timestep
tau = (1 - t) * 1000 (models.sd.unet_timestep: 1000 = noise). diffusers' SD / SDXL schedulers read the UNet's
output as noise (epsilon) and start from sigma-scaled noise, so they do not run such a UNet right. This one does:

    init_noise_sigma     1                               X0 ~ N(0, I), as `rectified_flow.noise_from_seeds`
    scale_model_input    identity
    set_timesteps(N)     tau_i = (1 - i / N) * 1000      i = 0 .. N-1 (t_i = i / N, our Euler nodes)
    step(v, tau_i, x)    x + v / N                       `rectified_flow.euler_sample`'s update

so `StableDiffusionXLPipeline(..., scheduler=RectifiedFlowEulerScheduler())(prompt, num_inference_steps=N)` is
the project's N-step Euler sampler (classifier-free guidance as the pipeline applies it: v_u + w (v_c - v_u)).
It is a `SchedulerMixin` + `ConfigMixin`, saved as scheduler/scheduler_config.json; a folder's model_index.json
names it as ["instaflow_core.models.flow_scheduler", "RectifiedFlowEulerScheduler"]. diffusers resolves classes
outside its own libraries from `sys.modules` only: import this module (or `instaflow_core.inference.pipeline`,
or the family module that saved the folder) before `DiffusionPipeline.from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import Tensor

__all__ = ["RectifiedFlowEulerOutput", "RectifiedFlowEulerScheduler"]


@dataclass
class RectifiedFlowEulerOutput(BaseOutput):
    """`prev_sample`: x after one Euler step (B, C, h, w), the name diffusers' pipelines read."""

    prev_sample: Tensor


class RectifiedFlowEulerScheduler(SchedulerMixin, ConfigMixin):
    """Euler steps along a velocity UNet from t = 0 (noise, tau = 1000) to t = 1 (image latent), N uniform steps."""

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: str | torch.device | None = None, **_: Any
    ) -> None:
        """timesteps (N,) float32: tau_i = (1 - i / N) * num_train_timesteps, i = 0 .. N-1."""
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        n = int(num_inference_steps)
        t = torch.arange(n, dtype=torch.float64) / n  # our t_i = i / N
        self.timesteps = ((1.0 - t) * self.config.num_train_timesteps).to(device=device, dtype=torch.float32)
        self.num_inference_steps = n
        self._step_index = None
        self._begin_index = None

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        """The identity: a flow UNet sees X_t itself."""
        return sample

    def _index_of(self, timestep: Tensor | float) -> int:
        tau = float(timestep)
        matches = (self.timesteps.float() - tau).abs() < 1e-3
        hits = matches.nonzero()
        return int(hits[0]) if len(hits) else 0

    def step(
        self,
        model_output: Tensor,
        timestep: Tensor | float,
        sample: Tensor,
        return_dict: bool = True,
        **_: Any,
    ) -> RectifiedFlowEulerOutput | tuple[Tensor]:
        """x + v / N: one Euler step of the velocity `model_output` (integrated in the sample's dtype)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = (
                self._begin_index if self._begin_index is not None else self._index_of(timestep)
            )
        prev = sample + model_output.to(sample.dtype) / self.num_inference_steps
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return RectifiedFlowEulerOutput(prev_sample=prev)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)
