"""The SD3 family: Stable Diffusion 3 / 3.5 (an MMDiT transformer over 16-channel latents, three text encoders).

condition   embeds (B, 77 + 256, D_t5): CLIP-L's and CLIP-G's penultimate hidden states concatenated on the feature
            axis (768 + 1280), zero-padded to T5's width (4096), then T5-XXL's last hidden states (256 tokens)
            joined after them on the sequence axis; zeros in T5's place when the folder has no text_encoder_3
            (as StableDiffusion3Pipeline does). pooled (B, 2048): the two CLIPs' projected pooled outputs
            concatenated. No mask (the joint attention takes none).
velocity    the transformer runs on sigma = 1 - t (its timestep sigma * 1000, 1000 = noise) and predicts
            noise - image, the derivative of x = (1 - sigma) image + sigma noise along sigma; ours is
            image - noise along t, so v = -transformer(x_t, (1 - t) * 1000, text, pooled). Latents stay unpacked
            (B, 16, h, w): the transformer patches them itself.
latents     x8 VAE, latent = (vae latent - shift_factor) * scaling_factor (1.5305, 0.0609 for SD 3.5), what the
            pipeline's output_type="latent" returns
teacher     "flow-euler": the repo's FlowMatchEulerDiscreteScheduler (shift 3.0 for SD 3.5 Medium) on its own
            sigma grid, exactly StableDiffusion3Pipeline's loop; "euler": the same scheduler at shift 1 on our
            uniform grid sigma_i = 1 - i/N, i.e. `rectified_flow.euler_sample` on the teacher's velocity (a student
            initialised from the teacher starts as this flow, the teacher's 1-RF). Both with classifier-free
            guidance v_u + w (v_c - v_u) for w > 1.
student     a StableDiffusion3Pipeline folder (FlowMatchEulerDiscreteScheduler kept): with one step the shifted grid
            is [1, 0] whatever the shift, so `DiffusionPipeline.from_pretrained(student)(..., num_inference_steps=1)`
            is our one step X0 + v(X0, 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin
from torch import Tensor, nn

from instaflow_core.errors import ConfigError, DataError
from instaflow_core.models.family import Condition, Model, ModelFamily, read_index, to_dtype
from instaflow_core.models.geometry import Geometry
from instaflow_core.models.sd import autocast, save_tokenizer_files
from instaflow_core.models.sources import hub_snapshot, missing_files

TIMESTEPS = 1000.0  # the transformer's timestep = sigma * 1000 (num_train_timesteps of the repo's scheduler)
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
CLIP_TOKENS = 77
SCHEDULERS = ("flow-euler", "euler")  # the first is the teacher's own (evaluation's default for the teacher)
# the key prefixes of the text encoders a single-file SD3 checkpoint may hold (diffusers' single-file layout)
SINGLE_FILE_ENCODERS = {
    "text_encoder": "text_encoders.clip_l.",
    "text_encoder_2": "text_encoders.clip_g.",
    "text_encoder_3": "text_encoders.t5xxl.",
}


def transformer_timestep(t: Tensor | float) -> Tensor:
    """Our t in [0, 1] (0 = noise) -> the SD3 transformer's timestep sigma * 1000 with sigma = 1 - t (1000 = noise)."""
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.float()
    return (1.0 - t) * TIMESTEPS


@torch.no_grad()
def clip_penultimate(
    text_encoder: nn.Module, tokenizer: Any, prompts: list[str], max_length: int = CLIP_TOKENS
) -> tuple[Tensor, Tensor]:
    """Prompts -> (penultimate hidden states (B, 77, D), projected pooled output (B, P)) of a CLIP text encoder
    with projection, padded to `max_length` with the tokenizer's own pad token (tokenizer_2's is "!")."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    out = text_encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


@torch.no_grad()
def t5_states(
    text_encoder: nn.Module, tokenizer: Any, prompts: list[str], max_length: int = T5_TOKENS
) -> Tensor:
    """Prompts -> T5's last hidden states (B, max_length, D), padded to max_length (the pipeline's tokenisation)."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def make_scheduler(name: str, base_config: Any, steps: int) -> tuple[SchedulerMixin, dict[str, Any]]:
    """(a fresh scheduler, the keywords of its `set_timesteps`) for generation.scheduler `name`:

    flow-euler  the repo's FlowMatchEulerDiscreteScheduler and its own grid (`steps`, shift, and `mu` added by
                the caller when the config shifts dynamically), as StableDiffusion3Pipeline sets it
    euler       the same scheduler class at shift 1 on the explicit grid sigma_i = 1 - i/N: our Euler steps
    """
    if name == "flow-euler":
        return FlowMatchEulerDiscreteScheduler.from_config(base_config), {"num_inference_steps": steps}
    if name == "euler":
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(dict(base_config).get("num_train_timesteps", 1000)), shift=1.0
        )
        return sched, {"sigmas": [1.0 - i / steps for i in range(steps)]}
    raise ConfigError(
        f"generation.scheduler={name!r}: the sd3 teacher's sampler takes one of {list(SCHEDULERS)}"
    )


def _named(index: dict[str, Any], component: str) -> bool:
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None


class SD3Family(ModelFamily):
    name: ClassVar[str] = "sd3"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    denoiser: ClassVar[str] = "transformer"
    required: ClassVar[tuple[str, ...]] = (
        "transformer",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    )
    optional: ClassVar[tuple[str, ...]] = ("text_encoder_3", "tokenizer_3")
    schedulers: ClassVar[tuple[str, ...]] = SCHEDULERS
    # the joint attention's image and text projections (what diffusers' SD3 LoRA scripts train)
    lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    )  # fmt: skip

    def index_problems(self, index: dict[str, Any]) -> list[str]:
        """The base rule (every required component named), and T5 as a pair: an encoder with its tokenizer."""
        out = super().index_problems(index)
        t5 = [c for c in self.optional if _named(index, c)]
        if len(t5) == 1:
            other = next(c for c in self.optional if c not in t5)
            out.append(f"model_index.json names {t5[0]} but not {other} (T5 needs both, or neither)")
        return out

    # ---- conditions -----------------------------------------------------------------------------------
    def encode(self, model: Model, prompts: list[str]) -> Condition:
        te = model["text_encoder"]
        max_len = int(getattr(model["tokenizer"], "model_max_length", CLIP_TOKENS) or CLIP_TOKENS)
        max_len = min(max_len, CLIP_TOKENS)
        h_l, pooled_l = clip_penultimate(te, model["tokenizer"], prompts, max_len)  # (B, 77, 768), (B, 768)
        h_g, pooled_g = clip_penultimate(model["text_encoder_2"], model["tokenizer_2"], prompts, max_len)
        clip = torch.cat([h_l, h_g.to(h_l.device)], dim=-1).to(te.dtype)  # (B, 77, 2048)
        t5_encoder, t5_tokenizer = model.get("text_encoder_3"), model.get("tokenizer_3")
        if t5_encoder is not None and t5_tokenizer is not None:
            t5 = t5_states(t5_encoder, t5_tokenizer, prompts)  # (B, 256, 4096)
            t5 = t5.to(device=clip.device, dtype=te.dtype)
        else:  # no T5: zeros of the transformer's joint width, as StableDiffusion3Pipeline
            width = int(model.denoiser.config.joint_attention_dim)
            t5 = torch.zeros((len(prompts), T5_TOKENS, width), device=clip.device, dtype=te.dtype)
        if clip.shape[-1] > t5.shape[-1]:
            raise DataError(
                f"the CLIP states ({clip.shape[-1]} wide) are wider than T5's ({t5.shape[-1]}): not an SD3 model"
            )
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, 4096)
        embeds = torch.cat([clip, t5], dim=-2)  # (B, 333, 4096)
        pooled = torch.cat([pooled_l, pooled_g.to(pooled_l.device)], dim=-1)  # (B, 2048)
        return Condition(embeds=embeds, pooled=pooled)

    def condition_shapes(self, configs: dict[str, dict[str, Any]]) -> dict[str, tuple[int, ...]]:
        """(77 CLIP + 256 T5 tokens, the joint width 4096) embeds, (768 + 1280) pooled: with or without T5 (zeros)."""
        tr = configs["transformer"]
        return {
            "embeds": (CLIP_TOKENS + T5_TOKENS, int(tr["joint_attention_dim"])),
            "pooled": (int(tr["pooled_projection_dim"]),),
        }

    # ---- velocity -------------------------------------------------------------------------------------
    def velocity(
        self,
        net: nn.Module,
        x_t: Tensor,
        t: Tensor,
        cond: Condition,
        controlnet: nn.Module | None = None,
        control_scale: float = 1.0,
    ) -> Tensor:
        if controlnet is not None:
            raise DataError("ControlNets of the sd3 family are not supported")
        if cond.pooled is None:
            raise DataError("an sd3 condition needs pooled text embeddings (the two CLIPs' projections)")
        dtype = net.dtype
        out = net(
            hidden_states=x_t.to(dtype),  # (B, 16, h, w), patched inside
            timestep=transformer_timestep(t),  # (B,) sigma * 1000
            encoder_hidden_states=cond.embeds.to(dtype),  # (B, 333, 4096)
            pooled_projections=cond.pooled.to(dtype),  # (B, 2048)
            return_dict=False,
        )[0]  # noise - image along sigma
        return (-out).to(x_t.dtype)

    # ---- latents --------------------------------------------------------------------------------------
    def geometry(self, configs: dict[str, dict[str, Any]]) -> Geometry:
        tr = configs.get("transformer")
        if not tr:
            raise DataError("no transformer/config.json (not a diffusers SD3 folder)")
        size = tr.get("sample_size", 128)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        patch = int(tr.get("patch_size", 2))
        vae_levels = len((configs.get("vae") or {}).get("block_out_channels") or [0] * 4)
        max_pos = tr.get("pos_embed_max_size")
        return Geometry(
            in_channels=int(tr.get("in_channels", 16)),
            sample_size=(int(h), int(w)),
            vae_factor=2 ** (vae_levels - 1),
            unet_factor=patch,
            factor_name="transformer patching",
            max_latent=int(max_pos) * patch if max_pos else None,
        )

    # ---- the teacher ----------------------------------------------------------------------------------
    def teacher_sample(
        self,
        model: Model,
        x0: Tensor,
        cond: Condition,
        uncond: Condition | None,
        *,
        steps: int,
        guidance: float,
        scheduler: str,
        mixed_precision: str = "no",
        cfg_batched: bool = True,
    ) -> Tensor:
        """StableDiffusion3Pipeline's loop for a batch: a fresh scheduler, uncond and cond in one doubled forward
        (or two with `cfg_batched=False`), the scheduler integrating in float32. The pipeline's noise is our X0
        (its initial sigma is 1) and its output latents are ours."""
        net = model.denoiser
        device = x0.device
        sched, grid = make_scheduler(scheduler, model.scheduler.config, steps)
        if sched.config.get("use_dynamic_shifting", False):  # the resolution-dependent shift, as the pipeline
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            patch = int(net.config.patch_size)
            c = sched.config
            grid["mu"] = calculate_shift(
                (x0.shape[-2] // patch) * (x0.shape[-1] // patch),
                c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5), c.get("max_shift", 1.16),
            )  # fmt: skip
        sched.set_timesteps(device=device, **grid)
        do_cfg = guidance > 1.0
        dtype = net.dtype
        text, pooled = cond.embeds.to(dtype), cond.pooled.to(dtype)  # type: ignore[union-attr]
        neg = neg_pooled = None
        if do_cfg:
            assert uncond is not None, "guidance > 1 needs the unconditional condition"
            neg, neg_pooled = uncond.embeds.to(dtype), uncond.pooled.to(dtype)  # type: ignore[union-attr]
            if cfg_batched:  # uncond first, as diffusers
                text, pooled = torch.cat([neg, text]), torch.cat([neg_pooled, pooled])
        x = x0.float()
        for t in sched.timesteps:
            with autocast(device, mixed_precision):
                if do_cfg and cfg_batched:
                    x_in = torch.cat([x, x]).to(dtype)  # (2B, 16, h, w)
                    pred = net(
                        hidden_states=x_in, timestep=t.expand(x_in.shape[0]), encoder_hidden_states=text,
                        pooled_projections=pooled, return_dict=False,
                    )[0]  # fmt: skip
                else:
                    x_in = x.to(dtype)
                    ts = t.expand(x_in.shape[0])
                    pred = net(
                        hidden_states=x_in, timestep=ts, encoder_hidden_states=text, pooled_projections=pooled,
                        return_dict=False,
                    )[0]  # fmt: skip
                    if do_cfg:
                        pred_u = net(
                            hidden_states=x_in, timestep=ts, encoder_hidden_states=neg, pooled_projections=neg_pooled,
                            return_dict=False,
                        )[0]  # fmt: skip
                        pred = torch.cat([pred_u, pred])
            pred = pred.float()
            if do_cfg:
                pred_u, pred_c = pred.chunk(2)
                pred = pred_u + guidance * (pred_c - pred_u)
            x = sched.step(pred, t, x, return_dict=False)[0]  # x + (sigma_next - sigma) * pred, float32
        return x.float()

    # ---- folders --------------------------------------------------------------------------------------
    def load_single_file(
        self, path: Path, *, config: str | None, local_files_only: bool, dtype: torch.dtype | str
    ) -> Model:
        """An original-format SD3 / SD 3.5 checkpoint via diffusers' single-file loader. The text encoders a file
        lacks (the released `sd3.5_medium.safetensors` holds the MMDiT and the VAE only) come from the `config`
        folder (the inferred repo's local snapshot); T5 may be absent there too (zeros in its place)."""
        from diffusers import StableDiffusion3Pipeline
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise DataError(f"{path.name}: unreadable checkpoint ({str(err).splitlines()[0]})") from err
        lacking = [
            c for c, prefix in SINGLE_FILE_ENCODERS.items() if not any(k.startswith(prefix) for k in keys)
        ]
        folder = None
        if (
            config and lacking
        ):  # a config folder, or a hub id's snapshot (its weights, from the cache unless allowed)
            local = Path(config).expanduser()
            folder = local if local.is_dir() else hub_snapshot(config, local_files_only=local_files_only)
        passed = self._encoders_from(folder, lacking, path.name, to_dtype(dtype))
        try:
            pipe = StableDiffusion3Pipeline.from_single_file(
                str(path),
                config=config,
                local_files_only=local_files_only,
                torch_dtype=to_dtype(dtype),
                **passed,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise DataError(
                f"{path.name}: not a loadable SD3 checkpoint: {str(err).splitlines()[0]}"
            ) from err
        names = (*self.required, *self.optional)
        parts = {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}
        for part in parts.values():
            if isinstance(part, nn.Module):
                part.eval().requires_grad_(False)
        return Model(self, parts, None)

    def _encoders_from(
        self, folder: Path | None, components: list[str], file: str, dtype: torch.dtype
    ) -> dict[str, Any]:
        """The text encoders a single file lacks, from a diffusers folder (T5: None when the folder has no
        weights for it either); a one-line DataError naming what to download when a CLIP is not there."""
        if not components:
            return {}
        index = read_index(folder) if folder is not None and folder.is_dir() else {}
        lacking = missing_files(folder) if index else []  # type: ignore[arg-type]
        out: dict[str, Any] = {}
        for name in components:
            have = (
                bool(index) and _named(index, name) and not [m for m in lacking if m.startswith(f"{name}/")]
            )
            if not have:
                if name == "text_encoder_3":
                    out["text_encoder_3"] = out["tokenizer_3"] = None
                    continue
                where = f"{folder}/{name}/" if folder is not None else f"a config folder's {name}/"
                raise DataError(
                    f"{file} holds no {name} and {where} has no weights for it: download the repo's text encoders "
                    "(huggingface-cli download <repo> --include 'text_encoder*/*' 'tokenizer*/*') or give a "
                    "checkpoint that includes them"
                )
            out[name] = self.load_component(folder, name, index, dtype, False).eval()  # type: ignore[arg-type]
        return out

    def save(self, model: Model, path: Path) -> Path:
        """A StableDiffusion3Pipeline folder (text_encoder_3 / tokenizer_3 null when the model has no T5)."""
        self.pipeline(model).save_pretrained(path, safe_serialization=True)
        for name in ("tokenizer", "tokenizer_2"):
            save_tokenizer_files(model[name], path / name)
        return path


FAMILY = SD3Family()
