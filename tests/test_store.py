"""The on-disk gradient store equals in-memory collection, resumes, caches, detects corruption."""

from __future__ import annotations

import json

import pytest
import torch
from test_gradients import classification_examples, tiny_classifier
from tolerances import GRAD_ATOL, GRAD_RTOL

from datainf_core.errors import StoreError
from datainf_core.gradients import collect_gradients_and_losses
from datainf_core.store import GradientStore, collect_gradients_to_store

KEY = {"model": "tiny-bert", "adapter": "lora-r4", "data": "synthetic", "settings": "default"}
N, SHARD = 10, 4  # three shards: 4 + 4 + 2 rows


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Interrupted(Exception):
    pass


@pytest.fixture
def model():
    return tiny_classifier(0)


@pytest.fixture
def examples():
    return classification_examples(N, seed=7)


def _count_rows(model):
    """Counts the samples that go through the model's forward."""
    seen = {"rows": 0}

    def hook(_module, _args, kwargs):
        seen["rows"] += int(kwargs["input_ids"].shape[0])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


def _collect(model, examples, folder, **kwargs):
    return collect_gradients_to_store(
        model,
        examples,
        folder,
        key=KEY,
        task="classification",
        shard_size=SHARD,
        batch_size=2,
        device="cpu",
        **kwargs,
    )


def _assert_equal_stores(store, expected):
    assert list(store) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(store[name][:], value, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_store_equals_in_memory_collection_and_reads_lazily(tmp_path, model, examples):
    grads, losses = collect_gradients_and_losses(
        model, examples, task="classification", batch_size=2, device="cpu"
    )
    store = _collect(model, examples, tmp_path)
    assert isinstance(store, GradientStore)
    assert store.n == N and len(store) == len(grads)
    assert store.block_dims == {name: g.shape[1] for name, g in grads.items()}
    _assert_equal_stores(store, grads)
    torch.testing.assert_close(store.losses, losses)
    name = next(iter(grads))
    block = store[name]
    assert block.shape == (N, grads[name].shape[1]) and len(block) == N
    assert block[3:9].dtype == torch.float32
    torch.testing.assert_close(block[3:9], grads[name][3:9])  # across shard boundaries
    torch.testing.assert_close(block[-1], grads[name][-1])
    assert block[5:5].shape == (0, grads[name].shape[1])
    reopened = GradientStore.open(store.path)
    _assert_equal_stores(reopened, grads)
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3 and manifest["key"] == KEY


def test_cache_hit_recomputes_nothing(tmp_path, model, examples):
    first = _collect(model, examples, tmp_path)
    seen, handle = _count_rows(model)
    try:
        calls = []
        second = _collect(model, examples, tmp_path, progress=lambda d, t: calls.append((d, t)))
    finally:
        handle.remove()
    assert seen["rows"] == 0
    assert second.path == first.path and calls == [(N, N)]
    _assert_equal_stores(second, first.to_dict())


def test_other_key_or_data_gets_its_own_store(tmp_path, model, examples):
    first = _collect(model, examples, tmp_path)
    other_key = collect_gradients_to_store(
        model,
        examples,
        tmp_path,
        key={**KEY, "adapter": "lora-r8"},
        task="classification",
        shard_size=SHARD,
        device="cpu",
    )
    other_data = _collect(model, examples[:-1], tmp_path)
    assert len({first.path, other_key.path, other_data.path}) == 3
    assert other_data.n == N - 1


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, model, examples):
    whole = _collect(model, examples, tmp_path / "whole").to_dict()

    def interrupt(done, total):
        if done > SHARD:  # inside the second shard: only the first is complete
            raise Interrupted

    with pytest.raises(Interrupted):
        _collect(model, examples, tmp_path / "resumed", progress=interrupt)
    (folder,) = (tmp_path / "resumed").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0]
    with pytest.raises(StoreError, match="incomplete"):
        GradientStore.open(folder)
    seen, handle = _count_rows(model)
    try:
        resumed = _collect(model, examples, tmp_path / "resumed")
    finally:
        handle.remove()
    assert seen["rows"] == N - SHARD  # only the two missing shards
    _assert_equal_stores(resumed, whole)


def test_corrupt_shard_is_detected_and_recomputed(tmp_path, model, examples):
    store = _collect(model, examples, tmp_path)
    expected = store.to_dict()
    shard = store.path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(8)  # overwrite the last float32 values of the shard
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        GradientStore.open(store.path)
    seen, handle = _count_rows(model)
    try:
        repaired = _collect(model, examples, tmp_path)
    finally:
        handle.remove()
    assert seen["rows"] == SHARD  # that shard only
    _assert_equal_stores(repaired, expected)
    GradientStore.open(repaired.path)  # checksums pass again


def test_missing_shard_is_recomputed(tmp_path, model, examples):
    store = _collect(model, examples, tmp_path)
    expected = store.to_dict()
    (store.path / "shard-00002.safetensors").unlink()
    seen, handle = _count_rows(model)
    try:
        repaired = _collect(model, examples, tmp_path)
    finally:
        handle.remove()
    assert seen["rows"] == N - 2 * SHARD
    _assert_equal_stores(repaired, expected)


def test_store_user_errors(tmp_path, model, examples):
    with pytest.raises(StoreError, match="no readable gradient store"):
        GradientStore.open(tmp_path)
    with pytest.raises(StoreError, match="shard_size"):
        collect_gradients_to_store(
            model, examples, tmp_path, key=KEY, task="classification", shard_size=0
        )


def test_engine_reads_the_store_like_the_dict(tmp_path, model, examples):
    from datainf_core.influence import compute_influence

    store = _collect(model, examples, tmp_path)
    in_memory = store.to_dict()
    query = {name: block[:3] for name, block in in_memory.items()}
    from_store = compute_influence(store, query, method="datainf", chunk_size=3)
    from_dict = compute_influence(in_memory, query, method="datainf", chunk_size=3)
    torch.testing.assert_close(from_store, from_dict)
