"""Teacher pretraining through the training core on a real store: the image table and its prompts, fresh noise
per micro-batch, kill and resume reproduce the uninterrupted run, clear errors on prompts without images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from instaflow_core.config import CaptionSource, CurationConfig, ImageSetConfig, StorageConfig, TrainConfig
from instaflow_core.curation.images import IMAGES_META_KEY, images_of, read_images, write_image_table
from instaflow_core.errors import DataError
from instaflow_core.experiments.digits.config import DigitsModelConfig
from instaflow_core.experiments.digits.images import SOURCE as DIGITS_SOURCE
from instaflow_core.refs import ModelKind, ModelRef, Stage
from instaflow_core.store import Store
from instaflow_core.training.job import TrainJob
from instaflow_core.training.pretrain import image_batches, save_initial_folder
from tasks.curation import curate_into_table

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SOURCE = CaptionSource(path=DIGITS_SOURCE, format="digits")
IMAGES = ImageSetConfig(captions_per_image=2)


@pytest.fixture(scope="module")
def store_with_digits(tmp_path_factory: pytest.TempPathFactory):
    """A local store holding the digits image table and the prompts curated from it."""
    from instaflow_core.curation.filters import token_counter
    from instaflow_core.models.tokenizer import tiny_tokenizer

    root = tmp_path_factory.mktemp("pretrain") / "store"
    storage = StorageConfig(root=f"file://{root}")
    store = Store(storage)
    images = write_image_table(store, SOURCE, IMAGES, {"config_hash": "test"})
    curation = CurationConfig(
        sources=[SOURCE], images=IMAGES, min_chars=1, min_tokens=1, holdout_fraction=0.0
    )
    prompts, report = curate_into_table(
        curation, store, token_counter(tiny_tokenizer()), metadata={IMAGES_META_KEY: images.model_dump_json()}
    )
    folder = root / "init"
    save_initial_folder("digits", DigitsModelConfig(), folder)
    base = ModelRef(uri=f"file://{folder}", kind=ModelKind.RF1, source="digits-init-test")
    return storage, images, prompts, report, base


def test_the_image_table_and_its_prompts(store_with_digits):
    storage, images, prompts, report, _ = store_with_digits
    store = Store(storage)
    assert images.rows == 1797 * 2 and report.kept == 80
    assert images_of(store, prompts) == images
    x, captions, labels = read_images(store, images, "holdout")
    assert x.shape == (719 * 2, 1, 8, 8) and len(captions) == len(labels)
    again = write_image_table(store, SOURCE, IMAGES, {"config_hash": "test"})  # a rerun rewrites nothing
    assert again.rows == images.rows


def test_batches_meet_fresh_noise_and_are_reproducible(store_with_digits):
    storage, _, prompts, _, _ = store_with_digits
    from instaflow_core.experiments.digits.model import build_digits

    factory = image_batches(prompts, storage, build_digits(), (1, 8, 8), seed=0)

    class Req:
        stage_index, micro_batch_size, start, rank, world_size, seed = 0, 64, 0, 0, 1, 0

    first = [next(iter(factory(Req()))) for _ in range(2)]
    assert torch.equal(first[0]["x0"], first[1]["x0"])  # the same micro-batch index: the same draw
    it = iter(factory(Req()))
    a, b = next(it), next(it)
    assert not torch.equal(a["x0"], b["x0"])  # the next micro-batch: new noise, new rows
    assert a["x1"].min() >= -1 and a["x1"].max() <= 1 and len(a["prompt"]) == 64
    Req.start = 1
    torch.testing.assert_close(
        next(iter(factory(Req())))["x0"], b["x0"]
    )  # resume at index 1 = the same batch


def _job(storage, prompts, base, ckpt: Path, steps: int = 6):
    cfg = TrainConfig(
        stages=[{"steps": steps, "batch_size": 32}], lr=2e-3, warmup_steps=1, ema_decay=0.5,
        caption_dropout=0.1, checkpoint_every=3, log_every=1, sample_prompts=["digit 3"], sample_steps=2,
    )  # fmt: skip
    job = TrainJob.make(Stage.PRETRAIN, cfg, storage, prompts, base)
    return job.model_copy(update={"ckpt_dir": f"file://{ckpt}", "out_uri": f"file://{ckpt}-model"})


def test_pretraining_resumes_where_it_was_killed(store_with_digits, tmp_path):
    storage, _, prompts, _, base = store_with_digits
    _job(storage, prompts, base, tmp_path / "a").check_inputs()
    whole = _job(storage, prompts, base, tmp_path / "a").run()

    class Killed(Exception):
        pass

    def kill_after_checkpoint(record: dict) -> None:
        if record["step"] == 4:
            raise Killed

    with pytest.raises(Killed):
        _job(storage, prompts, base, tmp_path / "b").run(on_log=kill_after_checkpoint)
    resumed = _job(storage, prompts, base, tmp_path / "b").run()
    assert resumed["start_step"] == 3 and resumed["steps"] == 6
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(
        [h["loss"] for h in whole["history"]], rel=1e-5
    )
    from instaflow_core.models.loading import load_source

    loaded = load_source(tmp_path / "a-model")
    assert loaded.family.name == "digits"  # the pretrained teacher is a folder of the base's family
    a = loaded.denoiser.state_dict()
    b = load_source(tmp_path / "b-model").denoiser.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    meta = (tmp_path / "a-model" / "instaflow.json").read_text()
    assert '"kind": "1rf"' in meta and '"stage": "pretrain"' in meta


def test_prompts_without_images_get_one_line(store_with_digits, tmp_path):
    storage, _, _, _, base = store_with_digits
    from instaflow_core.curation.filters import token_counter
    from instaflow_core.models.tokenizer import tiny_tokenizer

    txt = tmp_path / "captions.txt"
    txt.write_text("a photo of a cat\na red car\n")
    plain, _ = curate_into_table(
        CurationConfig(sources=[CaptionSource(path=str(txt), format="txt")], holdout_fraction=0.0),
        Store(storage), token_counter(tiny_tokenizer()), table_name="plain_prompts",
    )  # fmt: skip
    with pytest.raises(DataError, match="not curated from images"):
        _job(storage, plain, base, tmp_path / "c").check_inputs()
