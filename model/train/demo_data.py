"""The demo's data, generated deterministically into a folder in InternVL's formats.

Multimodal: rendered PNG images of 1..3 shapes of one kind and one colour on a light, slightly noisy
background (most square, some twice as wide so dynamic tiling cuts them into several tiles), each the
subject of three single-question records (its colour, its shape, how many shapes it shows); and short
MPEG-4 clips (written with PyAV) of one shape crossing a still background left, right, up or down, each
asked which way the shape moves. The answers depend only on the pixels (the direction on where the shape
is in the frames), so a tiny model that learns them has learned to look. One question a record: asked
together in one conversation, shape and count were learnt slower (bench/results/README.md, "Demo
training run").
Language: paragraphs of an embedded English text corpus (``TEXT_CORPUS``).
Preference (MPO): the colour question answered right (chosen) and with another colour (rejected).

``generate(folder, seed)`` writes::

    meta.json         pretraining / SFT mixture: shapes and motion (multimodal) + corpus (language)
    meta_mpo.json     the preference set
    eval.jsonl        held-out questions with their candidate answers (for ``evaluate``)
    shapes.jsonl, motion.jsonl, corpus.jsonl, preference.jsonl, images/*.png, videos/*.mp4

The same seed writes the same bytes: every random choice comes from a seeded ``random.Random``, and the PNG
and MPEG-4 encoders are deterministic.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3")

# The questions, the attribute each asks about, and every answer it may have (the evaluation's candidates).
QUESTIONS = {
    "color": ("What color are the shapes?", tuple(COLORS)),
    "shape": ("Which shape is drawn?", SHAPES),
    "count": ("How many shapes are there?", COUNTS),
}

# The video question: the direction the shape moves (from the first frame to the last).
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOTION_QUESTION = ("Which way does the shape move?", tuple(DIRECTIONS))

GENERATOR_VERSION = 3


@dataclass(frozen=True)
class DemoDataConfig:
    """How much to generate and at which size (the images' short side is ``image_size`` pixels)."""

    train_images: int = 2400
    eval_images: int = 240
    preference_pairs: int = 400
    image_size: int = 112
    wide_fraction: float = 0.2
    corpus_repeat: int = 1
    train_videos: int = 600
    eval_videos: int = 120
    clip_frames: int = 16  # frames written per clip (the loader samples data.video_frames of them)
    clip_travel: float = 0.6  # how far the shape moves over a clip, in image sides


# ---- the text corpus (written for this project)

TEXT_CORPUS = """\
A circle is the set of points that lie at the same distance from a centre. That distance is the radius, and twice the radius is the diameter. A circle has no corners and no straight sides.
A square has four straight sides of equal length and four right angles. Its diagonals cross at the centre, have the same length, and meet at a right angle.
A triangle has three sides and three corners. The three angles of any flat triangle add up to half a turn, which is one hundred and eighty degrees.
Red, green and blue are the primary colours of light. Screens mix them to show every other colour: red and green light together look yellow, and all three together look white.
Painters mix pigments instead of light. Yellow and blue paint make green, red and yellow make orange, and red and blue make purple.
To count objects, point at each one exactly once and say the next number. The last number said is how many objects there are, whatever order they were counted in.
One, two and three are the first counting numbers. Two is one more than one, and three is one more than two. Three shapes are more than two shapes.
An image on a computer is a grid of small squares called pixels. Each pixel stores how much red, green and blue light it shows, often as three numbers between zero and two hundred and fifty five.
A vision model does not see shapes directly. It cuts the image into small patches, turns each patch into a vector of numbers, and lets the patches exchange information until the whole image is described.
A language model reads text one token at a time and learns to predict the next token. Trained on enough text, it learns spelling, grammar and many facts about the world.
A multimodal model joins the two. The vectors that describe the image are placed among the text tokens, so the language model can read the picture as if it were a few extra words.
When a question is asked about a picture, the answer should come from what is in the picture and not from a guess. Looking first and answering second is a good habit for people and for models.
The sky on a clear day looks blue because air scatters blue light more than red light. At sunset the light crosses more air, the blue is scattered away, and the sky turns orange and red.
Grass and leaves are green because the chlorophyll in them absorbs red and blue light and reflects green light. In autumn the chlorophyll fades and yellow and orange colours appear.
Lemons and bananas are yellow, tomatoes and strawberries are red, and plums and grapes are often purple. Oranges gave their name to the colour orange.
A square is a special rectangle whose sides are all equal, and a special rhombus whose angles are all right angles. Every square is a rectangle, but not every rectangle is a square.
An equilateral triangle has three equal sides and three equal angles of sixty degrees each. Three equilateral triangles can meet at a point of a flat tiling together with other triangles.
The area of a circle is pi times the radius squared. Pi is a little more than three, so a circle of radius one covers a little more than three square units.
The perimeter of a square is four times its side, and its area is the side times itself. A square of side three has a perimeter of twelve and an area of nine.
Small children learn to count by touching things: one apple, two apples, three apples. Later they learn that the number of things does not change when the things are moved around.
Good training data is varied, correct and clean. A broken image or a malformed line in a data file should be reported and skipped, so that one bad record does not stop a long training run.
Learning rates usually start small, grow during a short warm up, and then decay slowly. A cosine schedule lowers the rate along half a cosine wave from its peak to a small final value.
Checkpoints save the model, the optimizer and the position in the data at regular steps. If a run stops, it can resume from the latest checkpoint and continue exactly where it was.
Packing puts several short samples into one long sequence so that no compute is wasted on padding. The attention of each sample stays inside its own segment of the pack.
Weighting the loss by the inverse square root of the number of answer tokens keeps long answers from drowning short ones while still giving them more weight than a single token.
The quick brown fox jumps over the lazy dog. This sentence uses every letter of the English alphabet at least once, which makes it useful for testing fonts and keyboards.
Rivers run from high ground to the sea. Along the way they join other rivers, carve valleys, and carry sand and stones that settle where the water slows down.
Bees visit flowers to collect nectar and pollen. Many flowers are yellow, blue or purple, colours that bees see well, while red flowers are often visited by birds instead.
A map is a drawing of a place seen from above. Blue usually marks water, green marks forests and parks, and lines of different colours mark roads and borders.
Music is organised sound. A melody is a sequence of notes, a chord is several notes played together, and rhythm is the pattern of long and short sounds in time.
Bread is made from flour, water, salt and yeast. The yeast eats sugars in the dough and releases gas, which makes the bread rise before it is baked in a hot oven.
Stars shine because of nuclear fusion in their cores. Hot stars look blue or white, cooler stars look yellow like the sun, and the coolest stars look orange or red.
"""


def corpus_paragraphs() -> list[str]:
    return [line.strip() for line in TEXT_CORPUS.splitlines() if line.strip()]


# ---- images


def _polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    corners = 4 if shape == "square" else 3
    start = rotation + (math.pi / 4 if shape == "square" else -math.pi / 2)
    return [(cx + r * math.cos(start + 2 * math.pi * k / corners), cy + r * math.sin(start + 2 * math.pi * k / corners)) for k in range(corners)]


def _background(rng: random.Random, width: int, height: int) -> Image.Image:
    """A light grey image with sparse darker speckles: the background is not a flat colour."""
    base = rng.randint(225, 250)
    image = Image.new("RGB", (width, height), (base, base, base))
    pixels = image.load()
    for _ in range(width * height // 24):
        x, y = rng.randrange(width), rng.randrange(height)
        shade = base - rng.randint(10, 40)
        pixels[x, y] = (shade, shade, shade)
    return image


def _radius_range(width: int, height: int) -> tuple[float, float]:
    # Shapes 27-43 pixels across at 112: several 14-pixel patches each (smaller ones left count at chance).
    short = min(width, height)
    return short * 0.12, short * 0.19


def _fill(rng: random.Random, color: str) -> tuple:
    return tuple(max(0, min(255, channel + rng.randint(-20, 20))) for channel in COLORS[color])


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rotation: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r * (1.25 if shape == "triangle" else 1.1), rotation), fill=fill)


def render(rng: random.Random, color: str, shape: str, count: int, width: int, height: int) -> Image.Image:
    """``count`` shapes of one kind and colour, at random non-overlapping places, on a noisy light background."""
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    radius_range = _radius_range(width, height)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < count:
        r = rng.uniform(*radius_range)
        cx, cy = rng.uniform(r + 2, width - r - 2), rng.uniform(r + 2, height - r - 2)
        if all(math.hypot(cx - x, cy - y) > r + other + 4 for x, y, other in placed):
            placed.append((cx, cy, r))
    fill = _fill(rng, color)
    for cx, cy, r in placed:
        _draw(draw, shape, cx, cy, r, 0.0 if shape == "circle" else rng.uniform(-0.3, 0.3), fill)
    return image


def render_motion(rng: random.Random, color: str, shape: str, direction: str, frames: int, size: int, travel: float) -> list[Image.Image]:
    """``frames`` frames of one shape moving ``travel`` image sides (at most what keeps it whole in every
    frame) in ``direction`` at constant speed over a still background, from a random start."""
    background = _background(rng, size, size)
    r = rng.uniform(size * 0.10, size * 0.14)  # smaller than the images' shapes: room to travel
    dx, dy = DIRECTIONS[direction]
    margin = r * 1.25 + 2  # the triangle's corners reach 1.25 r from its centre
    distance = min(travel * size, size - 2 * margin)

    def start(step: int) -> float:  # a start coordinate along an axis moving by step * distance
        return rng.uniform(margin - min(step, 0) * distance, size - margin - max(step, 0) * distance)

    x0, y0 = start(dx), start(dy)
    rotation = 0.0 if shape == "circle" else rng.uniform(-0.3, 0.3)
    fill = _fill(rng, color)
    clip = []
    for index in range(frames):
        progress = index / max(frames - 1, 1)
        frame = background.copy()
        _draw(ImageDraw.Draw(frame), shape, x0 + dx * distance * progress, y0 + dy * distance * progress, r, rotation, fill)
        clip.append(frame)
    return clip


def write_clip(path: str, frames: list[Image.Image], rate: int = 8) -> None:
    """The frames as an MPEG-4 video (a .mp4 file, yuv420p) through PyAV."""
    import av

    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 2_000_000  # near-lossless at this size: mean error about 1.5 of 255 per channel
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def _image_record(rng: random.Random, config: DemoDataConfig, folder: str, name: str) -> dict:
    color, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
    count = rng.randint(1, len(COUNTS))
    wide = rng.random() < config.wide_fraction
    width = config.image_size * (2 if wide else 1)
    image = render(rng, color, shape, count, width, config.image_size)
    path = f"images/{name}.png"
    image.save(os.path.join(folder, path), format="PNG", optimize=False)
    return {"image": path, "answers": {"color": color, "shape": shape, "count": str(count)}}


def _video_record(rng: random.Random, config: DemoDataConfig, folder: str, name: str) -> dict:
    color, shape, direction = rng.choice(tuple(COLORS)), rng.choice(SHAPES), rng.choice(tuple(DIRECTIONS))
    frames = render_motion(rng, color, shape, direction, config.clip_frames, config.image_size, config.clip_travel)
    path = f"videos/{name}.mp4"
    write_clip(os.path.join(folder, path), frames)
    return {"video": path, "answer": direction}


def _question(placeholder: str, question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": f"{placeholder}\n{question}"}, {"from": "gpt", "value": answer}]


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")


def generate(folder: str, seed: int = 0, config: DemoDataConfig = DemoDataConfig()) -> str:
    """Write the demo data into ``folder`` (created) and return the path of its meta.json. A folder that
    already holds this exact generation (same seed, config and generator version) is reused."""
    for media in ("images", "videos"):
        os.makedirs(os.path.join(folder, media), exist_ok=True)
    stamp = {"seed": seed, "config": config.__dict__, "version": GENERATOR_VERSION}
    stamp_path = os.path.join(folder, "generated.json")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(stamp_path) and os.path.exists(meta_path):
        with open(stamp_path, encoding="utf-8") as handle:
            if json.load(handle) == json.loads(json.dumps(stamp)):
                return meta_path

    rng = random.Random(f"demo-data:{seed}")
    train = []
    for index in range(config.train_images):
        record = _image_record(rng, config, folder, f"train_{index:05d}")
        for kind, (question, _) in QUESTIONS.items():
            train.append({"image": record["image"], "conversations": _question("<image>", question, record["answers"][kind])})
    _write_jsonl(os.path.join(folder, "shapes.jsonl"), train)

    evaluation = []
    for index in range(config.eval_images):
        record = _image_record(rng, config, folder, f"eval_{index:05d}")
        for kind, (question, candidates) in QUESTIONS.items():
            evaluation.append({
                "image": record["image"], "kind": kind, "question": f"<image>\n{question}",
                "answer": record["answers"][kind], "candidates": list(candidates),
            })

    preference = []
    for index in range(config.preference_pairs):
        record = _image_record(rng, config, folder, f"pref_{index:05d}")
        chosen = record["answers"]["color"]
        rejected = rng.choice([color for color in COLORS if color != chosen])
        preference.append({"image": record["image"], "question": f"<image>\n{QUESTIONS['color'][0]}", "chosen": chosen, "rejected": rejected})
    _write_jsonl(os.path.join(folder, "preference.jsonl"), preference)

    motion = []
    for index in range(config.train_videos):
        record = _video_record(rng, config, folder, f"train_{index:05d}")
        motion.append({"video": record["video"], "conversations": _question("<video>", MOTION_QUESTION[0], record["answer"])})
    _write_jsonl(os.path.join(folder, "motion.jsonl"), motion)
    for index in range(config.eval_videos):
        record = _video_record(rng, config, folder, f"eval_{index:05d}")
        evaluation.append({
            "video": record["video"], "kind": "motion", "question": f"<video>\n{MOTION_QUESTION[0]}",
            "answer": record["answer"], "candidates": list(MOTION_QUESTION[1]),
        })
    _write_jsonl(os.path.join(folder, "eval.jsonl"), evaluation)

    corpus = [{"text": paragraph} for paragraph in corpus_paragraphs()]
    _write_jsonl(os.path.join(folder, "corpus.jsonl"), corpus)

    meta = {
        "demo_shapes": {"root": ".", "annotation": "shapes.jsonl", "repeat_time": 1, "length": len(train), "data_augment": False},
        "demo_corpus": {"root": ".", "annotation": "corpus.jsonl", "repeat_time": config.corpus_repeat, "length": len(corpus), "kind": "text"},
    }
    if motion:
        # A quarter of the multimodal tokens (by default each dataset's share is its epoch size).
        meta["demo_shapes"]["weight"] = 3.0
        meta["demo_motion"] = {"root": ".", "annotation": "motion.jsonl", "repeat_time": 1, "length": len(motion), "data_augment": False, "weight": 1.0}
    _write_json(meta_path, meta)
    _write_json(os.path.join(folder, "meta_mpo.json"), {
        "demo_preference": {"root": ".", "annotation": "preference.jsonl", "repeat_time": 1, "length": len(preference), "kind": "preference"},
    })
    _write_json(stamp_path, stamp)
    return meta_path
