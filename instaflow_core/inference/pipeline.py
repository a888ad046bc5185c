"""The SD family's one-step / N-step rectified-flow pipeline: a diffusers `DiffusionPipeline` with the Euler loop
written out, for users who want a diffusers pipeline object over an SD-family student.

Loads any SD-layout diffusers folder, including the released `XCLiu/instaflow_0_9B_from_sd_1_5` and
`XCLiu/2_rectified_flow_from_sd_1_5` (whose model_index.json says StableDiffusionPipeline):
`InstaFlowPipeline.from_pretrained(folder)`. The scheduler is kept for folder compatibility; sampling is Euler on
the velocity the UNet predicts, through the SD family's mapping (models/sd.py, the one place it is applied):

    x <- x + dt * v(x, t_i),  t_i = i / N, dt = 1 / N      (N = 1: X1 = X0 + v(X0, 0))

Every other family's students load as diffusers folders of the teacher's own pipeline class; the project's own
stages sample every family through `inference.generate` (the same Euler loop over the family's velocity).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from instaflow_core.errors import DataError

# imported, so diffusers finds the digits classes a folder's model_index.json names (it looks in sys.modules
# only); folders saved before the digits experiment had its own package name the old module path
from instaflow_core.experiments.digits import model as _digits_model
from instaflow_core.inference.generate import slerp
from instaflow_core.models import flow_scheduler as _flow_scheduler  # noqa: F401 (UNet students' scheduler)
from instaflow_core.models.family import Condition, Model, Velocity
from instaflow_core.models.lora import load_lora, merge_weight_delta, weight_delta
from instaflow_core.models.sd import FAMILY as SD
from instaflow_core.rectified_flow import euler_sample

sys.modules.setdefault("instaflow_core.models.digits", _digits_model)

__all__ = ["InstaFlowPipeline", "load_lora", "merge_weight_delta", "slerp", "weight_delta"]


class InstaFlowPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image with a rectified-flow UNet (InstaFlow one-step, 2-RF multi-step), optional ControlNet."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["controlnet", "safety_checker", "feature_extractor"]

    def __init__(
        self,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        unet: nn.Module,
        scheduler: SchedulerMixin,
        controlnet: Any = None,
        safety_checker: Any = None,
        feature_extractor: Any = None,
    ) -> None:
        super().__init__()
        # safety_checker / feature_extractor: accepted so SD folders (where they are null) load; never run here.
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            controlnet=controlnet,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.control_image_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
        )

    @classmethod
    def from_model(cls, model: Model, controlnet: Any = None) -> InstaFlowPipeline:
        """The pipeline over a loaded SD-family model's own modules (shared, not copied)."""
        return cls(
            vae=model.vae,
            text_encoder=model["text_encoder"],
            tokenizer=model["tokenizer"],
            unet=model.denoiser,
            scheduler=model.scheduler,
            controlnet=controlnet,
        )

    def velocity_model(self, control_scale: float = 1.0) -> Velocity:
        """The pipeline's UNet as `v(x_t, t, cond)` through the SD family (what rectified_flow.py consumes)."""
        return Velocity(SD, self.unet, controlnet=self.controlnet, control_scale=control_scale)

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts -> CLIP hidden states (B, 77, D), as the SD family encodes them."""
        model = Model(SD, {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer})
        with torch.no_grad():
            return SD.encode(model, prompts).embeds

    def _control_image(self, image: Any, batch: int, height: int, width: int, device: torch.device) -> Tensor:
        """A control image (PIL, array or tensor in [0, 1]) -> (batch, 3, H, W) float32."""
        img = self.control_image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        if img.shape[0] == 1:
            img = img.expand(batch, -1, -1, -1)
        elif img.shape[0] != batch:
            raise DataError(f"controlnet image batch {img.shape[0]} does not match the prompt batch {batch}")
        return img.to(device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        latents: Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        image: Any = None,
        controlnet_conditioning_scale: float = 1.0,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generate images. `latents` is X0 ~ N(0, I) (not scaled); CFG only when guidance_scale > 1.

        `image` is the ControlNet conditioning image (needs a `controlnet` component). output_type: "pil",
        "np" (float in [0, 1], (B, H, W, 3)), "pt" or "latent" (the scaled latent X1).
        """
        if num_inference_steps < 1:
            raise DataError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if image is not None and self.controlnet is None:
            raise DataError("a controlnet image was given but the pipeline has no controlnet component")
        device = self._execution_device
        velocity = self.velocity_model(controlnet_conditioning_scale)

        # 1. text embeddings (B, 77, D); the unconditional ones only when guiding
        if prompt_embeds is None:
            if prompt is None:
                raise DataError("give a prompt or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self.encode(prompts)
        n_prompts = prompt_embeds.shape[0]
        batch = n_prompts * num_images_per_prompt
        cond: dict[str, Tensor] = {
            "text": prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, 0)
        }
        uncond: dict[str, Tensor] | None = None
        if guidance_scale > 1.0:
            if negative_prompt_embeds is None:
                neg = negative_prompt if negative_prompt is not None else ""
                neg = [neg] * n_prompts if isinstance(neg, str) else list(neg)
                if len(neg) != n_prompts:
                    raise DataError(f"{len(neg)} negative prompts for {n_prompts} prompts")
                negative_prompt_embeds = self.encode(neg)
            uncond = {"text": negative_prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, 0)}

        # 2. noise X0 (B, 4, h, w): N(0, I), no init_noise_sigma (a flow starts from unit noise)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        shape = (
            batch,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise DataError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(
            device=device, dtype=torch.float32
        )  # integrate in float32 whatever the UNet dtype

        if image is not None:  # the control image rides with the text, so guidance doubles it along
            cond["control"] = self._control_image(image, batch, height, width, device)
            if uncond is not None:
                uncond["control"] = cond["control"]

        def v(x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
            extra = {"control": c["control"]} if "control" in c else {}
            return velocity(x, t, Condition(embeds=c["text"], extra=extra)).float()

        # 3. Euler from t = 0 (noise) to t = 1 (image latent), guidance in one doubled forward: rectified_flow's
        with self.progress_bar(total=num_inference_steps) as progress:
            latents = euler_sample(
                v,
                latents,
                cond,
                num_inference_steps,
                guidance=guidance_scale,
                uncond=uncond,
                on_step=lambda _: progress.update(),
            )

        # 4. decode
        if output_type == "latent":
            images: Any = latents
        else:
            z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            decoded = self.vae.decode(z, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
