"""Tiny tokenizer, tiny SD factory, loading/saving diffusers folders, and the SD family's velocity mapping."""

from __future__ import annotations

import json

import pytest
import torch

from instaflow_core.config import ModelsConfig, TinyModelConfig
from instaflow_core.errors import ConfigError, DataError
from instaflow_core.models.assets.make_tiny_clip_vocab import bytes_to_unicode, convert
from instaflow_core.models.family import Condition, Model, Velocity, family_of, get_family
from instaflow_core.models.loading import load_source, teacher_parts
from instaflow_core.models.sd import build_tiny
from instaflow_core.models.tokenizer import TINY_CLIP_DIR, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def saved(tiny: Model, tmp_path_factory: pytest.TempPathFactory):
    return tiny.save(tmp_path_factory.mktemp("tiny") / "model")


# ------------------------------------------------------------------------------------------- tokenizer
def test_tiny_tokenizer_matches_clip_word_ids() -> None:
    tok = tiny_tokenizer()
    ids = tok("a photo of a cat").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    # the ids real CLIP gives these words: the vocabulary is CLIP's, only truncated
    assert ids[1:-1] == [320, 1125, 539, 320, 2368]
    assert len(tok) == 256 * 2 + 4000 + 2 and tok.model_max_length == 77
    padded = tok(
        ["a dog"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert padded.shape == (1, 77) and int(padded[0, -1]) == tok.pad_token_id == tok.eos_token_id


def test_tiny_tokenizer_fewer_merges_and_limits() -> None:
    tok = tiny_tokenizer(100)
    assert len(tok) == 512 + 100 + 2
    pieces = tok.convert_ids_to_tokens(tok("a photo of a cat").input_ids)[1:-1]
    assert "".join(pieces).replace("</w>", " ").strip() == "a photo of a cat"  # byte-level: always decodable
    with pytest.raises(ConfigError, match="vocab_merges"):
        tiny_tokenizer(5000)


def test_committed_vocab_follows_clip_construction() -> None:
    vocab = json.loads((TINY_CLIP_DIR / "vocab.json").read_text())
    lines = (TINY_CLIP_DIR / "merges.txt").read_text().splitlines()
    assert lines[0].startswith("#version")
    # rebuilding from the committed merges gives the committed vocabulary exactly
    rebuilt, merges = convert(lines, len(lines) - 1)
    assert rebuilt == vocab and merges == lines[1:]
    byte_chars = list(bytes_to_unicode().values())
    assert [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1])][:512] == byte_chars + [
        c + "</w>" for c in byte_chars
    ]
    assert (TINY_CLIP_DIR / "LICENSE").read_text().count("MIT License") == 1


# ------------------------------------------------------------------------------------------ tiny models
def test_build_tiny_is_deterministic_and_keeps_global_rng(tiny: Model) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny(TinyModelConfig())
    assert torch.equal(torch.rand(3), expected)  # the factory does not consume the caller's RNG
    assert tiny.family is get_family("sd") and tiny.denoiser is tiny["unet"]
    for name in ("unet", "vae", "text_encoder"):
        assert _same_state(tiny[name], again[name])
    other = build_tiny(TinyModelConfig(seed=1))
    assert not _same_state(tiny.denoiser, other.denoiser)
    assert tiny.latent_shape() == (4, 8, 8)
    assert tiny.family.vae_factors(tiny.vae) == (pytest.approx(0.18215), 0.0)
    assert tiny.scheduler.config.beta_schedule == "scaled_linear"
    assert tiny.scheduler.config.algorithm_type == "dpmsolver++"


def test_build_tiny_rejects_mismatched_widths() -> None:
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        build_tiny(TinyModelConfig(text_hidden_size=48))


# ------------------------------------------------------------------------------------------ save / load
def test_save_writes_standard_sd_folder(saved) -> None:
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (saved / name).is_dir()
    weights = sorted(p.name for p in saved.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt"))
    assert weights == ["diffusion_pytorch_model.safetensors"] * 2 + ["model.safetensors"]
    assert (saved / "tokenizer" / "vocab.json").is_file() and (saved / "tokenizer" / "merges.txt").is_file()


def test_save_load_round_trip_exact(tiny: Model, saved) -> None:
    assert family_of(saved) is tiny.family
    loaded = load_source(saved)
    assert loaded.family is tiny.family and loaded.folder == saved
    for name in ("unet", "vae", "text_encoder"):
        assert _same_state(tiny[name], loaded[name]), name
    assert loaded["tokenizer"]("a red car").input_ids == tiny["tokenizer"]("a red car").input_ids
    assert type(loaded.scheduler) is type(tiny.scheduler)
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(tiny.scheduler.config)
    assert loaded.denoiser.dtype == torch.float32
    also = load_source(f"file://{saved}", dtype="bfloat16")
    assert also.denoiser.dtype == torch.bfloat16


def test_teacher_parts_tiny_and_folder(tiny: Model, saved) -> None:
    assert _same_state(teacher_parts(ModelsConfig()).denoiser, tiny.denoiser)
    from_folder = teacher_parts(ModelsConfig(teacher=str(saved)))
    assert _same_state(from_folder.denoiser, tiny.denoiser)


def test_pickle_checkpoints_refused(tmp_path) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a checkpoint")
    with pytest.raises(DataError, match="allow_pickle"):
        load_source(ckpt)
    with pytest.raises(DataError, match="not found"):
        load_source(tmp_path / "missing.safetensors")


def test_folder_with_only_pickle_weights_refused(tiny: Model, tmp_path) -> None:
    folder = tiny.save(tmp_path / "m")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    tiny.denoiser.save_pretrained(folder / "unet", safe_serialization=False)
    with pytest.raises(DataError, match="allow_pickle"):
        load_source(folder)
    loaded = load_source(folder, allow_pickle=True)
    assert _same_state(loaded.denoiser, tiny.denoiser)


def test_bad_sources_give_clear_errors(tmp_path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "unet").mkdir()
    with pytest.raises(DataError, match="no model_index.json"):
        load_source(tmp_path / "half")
    (tmp_path / "half" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(DataError, match="missing vae"):
        load_source(tmp_path / "half")
    with pytest.raises(DataError, match="local_model_path"):
        load_source("s3://bucket/models/teacher")
    # a hub id that is not cached: no network call, a line that says what to do
    with pytest.raises(DataError, match="local_files_only=false"):
        load_source("nobody-here/not-a-cached-model-123")
    # a .safetensors that is no SD checkpoint and whose configs are not cached
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(DataError, match="odd.safetensors"):
        load_source(tmp_path / "odd.safetensors")


# ------------------------------------------------------------------------------------------ the velocity
def test_sd_velocity_maps_time_and_prompts(tiny: Model) -> None:
    model = tiny.velocity()
    assert isinstance(model, Velocity) and model.net is tiny.denoiser and model.unet is tiny.denoiser
    cond = tiny.encode(["a photo of a cat", "a red car"])
    assert isinstance(cond, Condition) and cond.pooled is None and cond.mask is None and not cond.extra
    assert cond.embeds.shape == (2, 77, 32) and not cond.embeds.requires_grad
    # the velocity holds the denoiser alone (under its name), no text encoder
    assert {id(p) for p in model.parameters()} == {id(p) for p in tiny.denoiser.parameters()}
    assert set(model.state_dict()) == {f"unet.{k}" for k in tiny.denoiser.state_dict()}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.75])
    with torch.no_grad():
        v = model(x, t, cond)
        # t = 0 is noise: the UNet must see timestep 1000; t = 0.75 -> 250
        ref = tiny.denoiser(x, torch.tensor([1000.0, 250.0]), encoder_hidden_states=cond.embeds).sample
        assert torch.allclose(v, ref, atol=1e-6)
        v_scalar = model(x, 0.75, cond)
        ref_scalar = tiny.denoiser(x, torch.tensor([250.0, 250.0]), encoder_hidden_states=cond.embeds).sample
        assert torch.allclose(v_scalar, ref_scalar, atol=1e-6)
    assert v.shape == x.shape


def test_sd_velocity_is_trainable(tiny: Model) -> None:
    fresh = build_tiny(TinyModelConfig())
    fresh.denoiser.requires_grad_(True)
    model = fresh.velocity()
    cond = fresh.encode(["a cat"])
    x = torch.randn(1, 4, 8, 8)
    loss = model(x, torch.tensor([0.3]), cond).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in fresh["text_encoder"].parameters())
