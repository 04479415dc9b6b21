"""Image-instruction data: PNG files, the LLaVA-style records that point at them, and a small image world.

Records are the Alpaca fields plus the path of an image, relative to an image root directory (the
layout LLaVA's instruction data and most tools use):

    {"image": "train/00012.png", "instruction": "What colour is the shape?", "input": "", "output": "red"}

A record whose image is missing, or whose file is not a PNG this reader decodes, is one error naming
the record and the file.

PNG (RFC 2083 / the W3C PNG specification) is read and written here with zlib and numpy, so images need
no dependency: 8-bit greyscale, RGB and their alpha forms, non-interlaced, with the five row filters
(section 9). Other PNGs (palette, 16-bit, interlaced) are refused with what to convert them to.

The image world: a seeded generator of 32 x 32 pictures, each holding one, two or three shapes of one
colour and one kind, all on the left or the right half, with four questions per picture (colour, shape,
side, count). The answers are common English words that the shipped Shakespeare corpus contains (red,
green, blue, yellow; square, circle, cross; left, right; one, two, three). Three colour-shape
combinations never occur in training (HELD_OUT_COMBINATIONS); the test pictures are new pictures, half
of them of those combinations, so a model answers them only by reading colour and shape separately.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cli import DataError
from .instructions import InstructionRecord, _record, read_objects

# ---- PNG ------------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (grey, RGB, grey+alpha, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: str | Path, image: np.ndarray) -> None:
    """image: (H, W, 3) uint8 RGB. Rows are stored unfiltered (filter type 0), zlib-compressed."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"write_png takes an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    H, W, _ = image.shape
    raw = np.concatenate([np.zeros((H, 1), np.uint8), image.reshape(H, W * 3)], axis=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)  # 8 bits, RGB, deflate, filter method 0, no interlace
    Path(path).write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
                           + _chunk(b"IEND", b""))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def _unfilter(kind: int, row: np.ndarray, prior: np.ndarray, bpp: int) -> np.ndarray:
    """Undo one row's filter (PNG section 9.2); row, prior: (W·bpp,) uint8 -> the row's bytes."""
    if kind == 0:
        return row
    if kind == 2:  # Up
        return row + prior
    if kind == 1:  # Sub: each byte adds the one bpp to its left, i.e. a running sum per channel, mod 256
        return np.cumsum(row.reshape(-1, bpp).astype(np.int64), axis=0).astype(np.uint8).reshape(-1)
    out = row.astype(np.int64)
    up = prior.astype(np.int64)
    for i in range(len(out)):  # Average and Paeth read the reconstructed byte to the left: sequential
        left = out[i - bpp] if i >= bpp else 0
        if kind == 3:
            out[i] = (out[i] + (left + up[i]) // 2) % 256
        elif kind == 4:
            out[i] = (out[i] + _paeth(left, up[i], up[i - bpp] if i >= bpp else 0)) % 256
        else:
            raise ValueError(f"unknown PNG row filter {kind}")
    return out.astype(np.uint8)


def read_png(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an 8-bit PNG (grey is repeated to RGB, alpha dropped). Raises ValueError
    saying what is wrong with a file that is not such a PNG."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file (its first 8 bytes are not the PNG signature)")
    pos, header, idat = len(PNG_SIGNATURE), None, []
    while pos + 12 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise ValueError(f"truncated PNG: chunk {kind!r} claims {length} bytes past the end of the file")
        if struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] != zlib.crc32(kind + body):
            raise ValueError(f"corrupt PNG: the CRC of chunk {kind!r} does not match its contents")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None or not idat:
        raise ValueError("truncated PNG: no IHDR or no IDAT chunk")
    W, H, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in CHANNELS or interlace:
        raise ValueError(f"unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace}): convert "
                         "it to an 8-bit RGB PNG without interlacing")
    bpp = CHANNELS[colour]
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except zlib.error as e:
        raise ValueError(f"corrupt PNG: its image data does not decompress ({e})") from None
    stride = W * bpp + 1
    if raw.size != H * stride:
        raise ValueError(f"corrupt PNG: {raw.size} bytes of image data for {W} x {H} pixels (expected {H * stride})")
    rows, prior = [], np.zeros(W * bpp, np.uint8)
    for r in range(H):
        prior = _unfilter(int(raw[r * stride]), raw[r * stride + 1:(r + 1) * stride], prior, bpp)
        rows.append(prior)
    pixels = np.stack(rows).reshape(H, W, bpp)
    return np.repeat(pixels[..., :1], 3, axis=2) if bpp <= 2 else pixels[..., :3].copy()


# ---- records --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRecord(InstructionRecord):
    """An Alpaca record about an image: ``image`` is its path relative to the image root, and its id
    (the key of a features file)."""
    image: str = ""


def read_image_records(path: str | Path, image_root: str | Path) -> list[ImageRecord]:
    """LLaVA-style records {"image", "instruction", "input", "output"} whose images exist under image_root
    (checked here, before any training starts)."""
    out = []
    for where, obj in read_objects(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            raise DataError(f"{where}: expected an object with an \"image\" path (relative to --image_root) and the "
                            "Alpaca fields \"instruction\", \"input\", \"output\"")
        rest = {k: v for k, v in obj.items() if k != "image"}
        image = obj["image"]
        if not (Path(image_root) / image).is_file():
            raise DataError(f"{where}: image {image} not found under the image root {image_root}")
        record = _record(rest, where)
        out.append(ImageRecord(record.instruction, record.output, record.input, image))
    return out


def load_image(image_root: str | Path, image: str) -> np.ndarray:
    """(H, W, 3) uint8 pixels of IMAGE_ROOT/image; a missing or unreadable file is one DataError naming it."""
    path = Path(image_root) / image
    try:
        return read_png(path)
    except FileNotFoundError:
        raise DataError(f"image {path} not found") from None
    except (ValueError, OSError) as e:
        raise DataError(f"image {path} cannot be read: {e}") from None


# ---- the image world ------------------------------------------------------------------------------

IMAGE_SIZE = 32
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "cross")
SIDES = ("left", "right")
COUNTS = ("one", "two", "three")
HELD_OUT_COMBINATIONS = {("red", "cross"), ("green", "circle"), ("blue", "square")}
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?",
             "side": "Which side is it on?", "count": "How many shapes are there?"}
BOX = 8  # each shape fills an 8 x 8 box
BACKGROUND = 10  # the dark grey of every picture's background


def shape_mask(shape: str) -> np.ndarray:
    """bool (BOX, BOX): where a shape's pixels are."""
    y, x = np.mgrid[:BOX, :BOX] + 0.5 - BOX / 2
    if shape == "square":
        return np.ones((BOX, BOX), bool)
    if shape == "circle":
        return x ** 2 + y ** 2 <= (BOX / 2) ** 2
    return (abs(x) < 1.5) | (abs(y) < 1.5)  # cross: a plus sign


def draw(colour: str, shape: str, side: str, count: int, rng: random.Random) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE, 3) uint8: `count` shapes on a dark background, each in its own third of
    the chosen half's height, at a random place inside it; the colour varies a little per picture."""
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), BACKGROUND, np.uint8)
    rgb = np.clip(np.array(COLOURS[colour]) + [rng.randint(-20, 20) for _ in range(3)], 0, 255)
    half = IMAGE_SIZE // 2
    for slot in sorted(rng.sample(range(3), count)):
        top = slot * 10 + rng.randint(0, 10 - BOX + 1)
        left = (0 if side == "left" else half) + rng.randint(0, half - BOX)
        image[top:top + BOX, left:left + BOX][shape_mask(shape)] = rgb
    return image


def make_world(out_dir: str | Path, n_train: int = 600, n_test: int = 120, seed: int = 0) -> dict[str, Path]:
    """Write OUT_DIR/{train,test}/NNNNN.png and OUT_DIR/{train,test}.json (four records per picture), and
    OUT_DIR/train_blind.json, the training records without their "image" field (a text-only, blind
    baseline trains on them). Training pictures avoid HELD_OUT_COMBINATIONS; half the test pictures are of
    them. Returns the three record files (keys train, test, train_blind). The same seed writes the same bytes."""
    rng, out_dir = random.Random(seed), Path(out_dir)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    seen = [c for c in combos if c not in HELD_OUT_COMBINATIONS]
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            pool = sorted(HELD_OUT_COMBINATIONS) if split == "test" and i % 2 == 0 else seen
            colour, shape = rng.choice(pool)
            side, count = rng.choice(SIDES), rng.randint(1, 3)
            name = f"{split}/{i:05d}.png"
            write_png(out_dir / name, draw(colour, shape, side, count, rng))
            answers = {"colour": colour, "shape": shape, "side": side, "count": COUNTS[count - 1]}
            records += [{"image": name, "instruction": QUESTIONS[q], "input": "", "output": answers[q]} for q in QUESTIONS]
        if split == "train":
            rng.shuffle(records)  # train.py holds out the *last* records: a mix of pictures and questions
            files["train_blind"] = out_dir / "train_blind.json"
            files["train_blind"].write_text(json.dumps([{k: v for k, v in r.items() if k != "image"} for r in records],
                                                       indent=0) + "\n")
        files[split] = out_dir / f"{split}.json"
        files[split].write_text(json.dumps(records, indent=0) + "\n")
    return files


def question_type(record: InstructionRecord) -> str:
    """Which of QUESTIONS a record asks ("other" for a record not of the image world)."""
    return next((q for q, text in QUESTIONS.items() if record.instruction == text), "other")

