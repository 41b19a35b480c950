import pytest
import torch

from datainf_core.batching import IGNORE_INDEX, collate_examples


def test_collate_pads_tokens_and_masks_labels():
    examples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ]
    batch = collate_examples(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_collate_left_padding_and_scalar_labels():
    examples = [
        {"input_ids": torch.tensor([1, 2]), "labels": torch.tensor(1)},
        {"input_ids": torch.tensor([3]), "labels": torch.tensor(0)},
    ]
    batch = collate_examples(examples, pad_token_id=9, padding_side="left")
    assert batch["input_ids"].tolist() == [[1, 2], [9, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["labels"].tolist() == [1, 0]


def test_collate_stacks_images_and_seeds():
    examples = [{"pixel_values": torch.zeros(1, 4, 4), "seed": s} for s in range(3)]
    batch = collate_examples(examples)
    assert batch["pixel_values"].shape == (3, 1, 4, 4)
    assert batch["seed"].tolist() == [0, 1, 2]


def test_collate_rejects_empty():
    with pytest.raises(ValueError, match="at least one example"):
        collate_examples([])
