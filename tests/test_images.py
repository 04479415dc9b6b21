"""Image-instruction data and the frozen image encoders: PNG files read and written by our own zlib code
(checked against Pillow), LLaVA-style records with clear errors, the seeded image world, and the three
encoders (lab, a local Hugging Face CLIP, a precomputed features file) giving what the adapter reads."""

import json
import zlib

import numpy as np
import pytest
import torch

from llama_min.cli import DataError, UsageError
from llama_min.finetune.images import (HELD_OUT_COMBINATIONS, QUESTIONS, load_image, make_world, question_type,
                                       read_image_records, read_png, write_png)
from llama_min.peft import PeftConfig, apply_peft
from llama_min.peft.visual import load_encoder, save_features

from conftest import random_model, random_tokens, tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    make_world(root, n_train=12, n_test=4, seed=3)
    return root


def png_filters(path) -> set[int]:
    """The row filter types a PNG file uses (its IDAT data decompressed, one filter byte per row)."""
    data = path.read_bytes()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[data[25]]
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        idat += data[pos + 8:pos + 8 + length] if kind == b"IDAT" else b""
        pos += 12 + length
    raw = zlib.decompress(idat)
    return {raw[r * (width * channels + 1)] for r in range(height)}


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_png_reader_matches_pillow_across_row_filters(tmp_path, mode):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(24), np.arange(40)).astype(np.uint8)  # smooth: Pillow picks Sub/Up/Avg/Paeth
    noise = rng.integers(0, 256, (24, 40), dtype=np.uint8)
    planes = [ramp, noise, ramp * 3, ramp // 2]
    arr = np.stack(planes[:{"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]], axis=-1).squeeze(-1) if mode == "L" else \
        np.stack(planes[:{"RGB": 3, "RGBA": 4, "LA": 2}[mode]], axis=-1)
    path = tmp_path / "x.png"
    Image.fromarray(arr, mode).save(path)
    want = np.array(Image.open(path).convert("RGB"))
    assert np.array_equal(read_png(path), want)
    if mode == "RGB":
        assert png_filters(path) - {0}, "Pillow wrote only unfiltered rows: the filters went untested"


def test_png_writer_is_read_by_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    image = np.random.default_rng(1).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "w.png", image)
    assert np.array_equal(np.array(Image.open(tmp_path / "w.png")), image)
    assert np.array_equal(read_png(tmp_path / "w.png"), image)


def test_world_is_seeded_and_holds_out_combinations(world, tmp_path):
    again = tmp_path / "again"
    make_world(again, n_train=12, n_test=4, seed=3)
    assert (again / "train.json").read_text() == (world / "train.json").read_text()
    assert (again / "test" / "00001.png").read_bytes() == (world / "test" / "00001.png").read_bytes()
    train = json.loads((world / "train.json").read_text())
    by_image = {}
    for r in train:
        by_image.setdefault(r["image"], {})[r["instruction"]] = r["output"]
    assert len(train) == 4 * 12 and all(len(q) == 4 for q in by_image.values())
    combos = {(q[QUESTIONS["colour"]], q[QUESTIONS["shape"]]) for q in by_image.values()}
    assert not combos & HELD_OUT_COMBINATIONS
    blind = json.loads((world / "train_blind.json").read_text())  # the blind baseline's records: no image field
    assert blind == [{k: v for k, v in r.items() if k != "image"} for r in train]
    test = read_image_records(world / "test.json", world)
    assert {question_type(r) for r in test} == set(QUESTIONS)
    first = [r for r in test if r.image == "test/00000.png"]  # test picture 0 is of a held-out combination
    answers = {question_type(r): r.output for r in first}
    assert (answers["colour"], answers["shape"]) in HELD_OUT_COMBINATIONS


def test_missing_and_unreadable_images_are_named(world, tmp_path):
    records = [{"image": "train/00000.png", "instruction": "q", "input": "", "output": "a"},
               {"image": "nowhere.png", "instruction": "q", "input": "", "output": "a"}]
    (tmp_path / "r.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"record 1: image nowhere.png not found under the image root"):
        read_image_records(tmp_path / "r.json", world)
    write_png(tmp_path / "bad.png", np.zeros((4, 4, 3), np.uint8))
    (tmp_path / "bad.png").write_bytes((tmp_path / "bad.png").read_bytes()[:40])  # cut inside a chunk
    with pytest.raises(DataError, match=r"image .*bad.png cannot be read: truncated PNG"):
        load_image(tmp_path, "bad.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(DataError, match=r"text.png cannot be read: not a PNG file"):
        load_image(tmp_path, "text.png")
    (tmp_path / "r2.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    with pytest.raises(DataError, match=r"\"image\" path"):
        read_image_records(tmp_path / "r2.json", world)


def test_lab_encoder_and_its_features_file_agree(world, tmp_path):
    lab = load_encoder("lab")
    ids = ["train/00000.png", "test/00002.png", "train/00005.png"]
    direct = lab.features(world, ids)
    assert direct.shape == (3, lab.dim) and direct.dtype == torch.float32 and direct.abs().sum() > 0
    save_features(lab, world, ids, tmp_path / "f.safetensors")
    np.savez(tmp_path / "f.npz", **{i: f.numpy() for i, f in zip(ids, direct)})
    for name in ("f.safetensors", "f.npz"):
        table = load_encoder(f"features:{tmp_path / name}")
        assert table.dim == lab.dim and torch.equal(table.features(world, ids[::-1]), direct.flip(0))
    with pytest.raises(UsageError, match="no features for image train/00001.png"):
        table.features(world, ["train/00001.png"])
    assert not torch.equal(direct[0], direct[1]), "two different pictures gave the same features"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=24, patch_size=8)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clip")
    transformers.CLIPVisionModel(config).save_pretrained(directory)
    return directory


def test_clip_fixture_gives_the_shapes_the_adapter_reads(clip_dir, world):
    pooled = load_encoder(f"clip:{clip_dir}")
    scales = load_encoder(f"clip:{clip_dir}:1,-1")
    ids = ["train/00000.png", "train/00003.png"]
    a, b = pooled.features(world, ids), scales.features(world, ids)
    assert (pooled.dim, scales.dim) == (32, 64) and a.shape == (2, 32) and b.shape == (2, 64)
    # CLS of the last layer through post_layernorm is Hugging Face's own pooled output
    torch.testing.assert_close(b[:, 32:], a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(b[:, :32], a), "layer 1's CLS should differ from the last layer's"
    config = PeftConfig(method="adapter", adapter_len=3, visual_dim=scales.dim, image_encoder=scales.spec)
    model = apply_peft(random_model(tiny_config()), config)
    logits, _ = model(random_tokens(model.config, 2, 5), images=b)
    assert logits.shape == (2, 5, model.config.vocab_size)
    with pytest.raises(UsageError, match="out of range"):
        load_encoder(f"clip:{clip_dir}:9")


def test_bad_encoder_specs_are_clear(tmp_path):
    for spec, message in (("vgg", "expected lab, clip:DIR"), (f"clip:{tmp_path}", "no config.json"),
                          (f"features:{tmp_path / 'none.safetensors'}", "no such file")):
        with pytest.raises(UsageError, match=message):
            load_encoder(spec)
