"""Padding per-sample examples into model batches (shared by gradients, training and scoring)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def collate_examples(
    examples: Sequence[dict[str, torch.Tensor | int]],
    *,
    pad_token_id: int = 0,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pads a list of examples (see ARCHITECTURE.md) into one batch.

    Text examples (with ``input_ids``) give ``input_ids`` and ``attention_mask`` of shape
    ``batch_size x max_len``; a per-token ``labels`` is padded with ``-100`` to the same shape and a
    scalar ``labels`` (classification) is stacked to ``batch_size``. Any other tensor is stacked
    (all samples must share its shape); ints become a ``LongTensor(batch_size)``.

    Args:
        examples: One dict per sample, unpadded.
        pad_token_id: Token id written into padded positions of ``input_ids``.
        padding_side: ``"right"`` (default) or ``"left"``.
    """
    if not examples:
        raise ValueError("collate_examples needs at least one example, got an empty list")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side should be 'right' or 'left', got {padding_side!r}")
    batch: dict[str, torch.Tensor] = {}
    keys = list(examples[0].keys())
    lengths = None
    if "input_ids" in examples[0]:
        lengths = [int(ex["input_ids"].shape[0]) for ex in examples]  # type: ignore[union-attr]
        max_len = max(lengths)
    for key in keys:
        values = [ex[key] for ex in examples]
        if isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)
            continue
        first = values[0]
        assert isinstance(first, torch.Tensor)
        is_token_level = lengths is not None and first.dim() == 1 and key in ("input_ids", "labels")
        if not is_token_level:
            batch[key] = torch.stack(values)  # type: ignore[arg-type]
            continue
        fill = pad_token_id if key == "input_ids" else IGNORE_INDEX
        padded = torch.full((len(values), max_len), fill, dtype=first.dtype)
        for row, value in enumerate(values):
            length = value.shape[0]  # type: ignore[union-attr]
            if padding_side == "right":
                padded[row, :length] = value
            else:
                padded[row, max_len - length :] = value
        batch[key] = padded  # batch_size x max_len
    if lengths is not None:
        mask = torch.zeros((len(examples), max_len), dtype=torch.long)
        for row, length in enumerate(lengths):
            if padding_side == "right":
                mask[row, :length] = 1
            else:
                mask[row, max_len - length :] = 1
        batch["attention_mask"] = mask  # batch_size x max_len
    return batch
