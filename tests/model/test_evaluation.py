"""The multiple-choice evaluation reads its questions' media as the training data does: a video's sampled
frames (one tile each, the frames' prompt in place of ``<video>``), an image list sharing the tile budget;
its accuracy and chance are reported per question kind."""

import json

import pytest
import torch

pytest.importorskip("av")

from model.config import InternVL3Config  # noqa: E402
from model.data import ConversationEncoder, DatasetSpec, ImageTiler, RecordDataset  # noqa: E402
from model.data.tokenizer import ByteTokenizer  # noqa: E402
from model.modeling import InternVL3  # noqa: E402
from model.train.demo_data import DemoDataConfig, generate  # noqa: E402
from model.train.evaluation import question_media, evaluate_choices  # noqa: E402

FRAMES = 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_data")
    generate(str(folder), seed=1, config=DemoDataConfig(train_images=2, eval_images=3, preference_pairs=1, image_size=56,
                                                        wide_fraction=0.5, train_videos=1, eval_videos=2, clip_frames=7))
    records = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    encoder = ConversationEncoder(ByteTokenizer(), num_image_token=4, system_message=None)
    return folder, records, encoder, ImageTiler(tile_size=56, max_num=4)


def _as_training_record(record: dict, answer: str) -> dict:
    media = {key: record[key] for key in ("image", "video") if key in record}
    return {**media, "conversations": [{"from": "human", "value": record["question"]}, {"from": "gpt", "value": answer}]}


def test_questions_see_their_media_as_training_does(demo, tmp_path):
    """Each question (a video's, an image's, and two images sharing the budget) encodes to the token ids and
    pixels the training dataset builds from the same record."""
    folder, records, encoder, tiler = demo
    video = next(record for record in records if "video" in record)
    image = next(record for record in records if "image" in record)
    wide = [record["image"] for record in records if "image" in record]
    pair = {"image": sorted(set(wide))[:2], "question": "<image>\n<image>\nSame colour?", "kind": "pair", "answer": "yes", "candidates": ["yes", "no"]}
    cases = [video, image, pair]
    annotation = tmp_path / "as_training.jsonl"
    annotation.write_text("".join(json.dumps(_as_training_record(record, record["answer"])) + "\n" for record in cases))
    dataset = RecordDataset(DatasetSpec("as_training", str(annotation), root=str(folder)), encoder, tiler, augment=False, shuffle=False,
                            video_frames=FRAMES)
    for row, record in enumerate(cases):
        question, pixel_values = question_media(record, str(folder), tiler, FRAMES, {})
        conversation = [{"from": "human", "value": question}, {"from": "gpt", "value": record["answer"]}]
        built = encoder.encode_conversation(conversation, pixel_values, "eval")
        expected = dataset.load_record(row)
        assert torch.equal(built.input_ids, expected.input_ids) and torch.equal(built.labels, expected.labels)
        assert torch.equal(built.pixel_values, expected.pixel_values)
    assert question_media(video, str(folder), tiler, FRAMES, {})[0].count("Frame") == FRAMES


def test_accuracy_per_kind_includes_the_video_questions(demo):
    folder, records, encoder, tiler = demo
    config = InternVL3Config.preset("tiny")
    model = InternVL3(config, init_seed=0)
    accuracy = evaluate_choices(model, str(folder / "eval.jsonl"), encoder, ImageTiler(tile_size=config.vision.image_size, max_num=2),
                                torch.device("cpu"), video_frames=FRAMES)
    assert set(accuracy["per_kind"]) == {"color", "shape", "count", "motion"}
    assert accuracy["per_kind"]["motion"]["questions"] == 2 and accuracy["per_kind"]["motion"]["chance"] == 0.25
    assert accuracy["questions"] == len(records) == 3 * 3 + 2
    assert 0.0 <= accuracy["accuracy"] <= 1.0
