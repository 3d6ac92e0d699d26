"""The CPU activation pool: FastResNet's inference passes keep their buffers for the next pass."""

from __future__ import annotations

import copy
import gc
import io
import threading

import pytest
import torch

import resnet_fast
from resnet_fast import _extension
from resnet_fast.ops import activation_pool
from resnet_fast.ops.activation_pool import ActivationPool

if _extension.extension() is None:
    pytest.skip(f"extension not built: {_extension.load_error()}", allow_module_level=True)

MIN_BYTES = _extension.extension().ACTIVATION_POOL_MIN_BYTES
POOLED_FLOATS = MIN_BYTES // 4 * 2  # a tensor the pool serves (256 KiB)
INPUT = torch.empty(1)  # a CPU tensor: the pool's scope only looks at the device


def _model_and_input(batch=2, size=64):
    torch.manual_seed(0)
    model = resnet_fast.resnet50(num_classes=10).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


@torch.no_grad()
def test_pooled_passes_are_bit_identical_and_reuse_every_buffer(monkeypatch):
    model, x = _model_and_input()
    monkeypatch.setenv(activation_pool.ENV_VAR, "0")
    expected = model(x)
    assert model.activation_pool.stats()["passes"] == 0, "the pool must stay unused when turned off"
    monkeypatch.setenv(activation_pool.ENV_VAR, "1")
    first = model(x)
    after_first = model.activation_pool.stats()
    second = model(x)
    after_second = model.activation_pool.stats()
    assert torch.equal(first, expected) and torch.equal(second, expected), "pooled passes changed the output"
    assert after_first["installed"] and after_first["passes"] == 1, after_first
    assert after_first["misses"] + after_first["hits"] > 10, (
        f"a ResNet-50 pass must allocate pooled buffers: {after_first}")
    assert after_second["misses"] == after_first["misses"], (
        f"the second pass of the same shape allocated new buffers: {after_first} -> {after_second}")
    assert after_second["hits"] - after_first["hits"] == after_first["misses"] + after_first["hits"], (
        f"the second pass must reuse as many buffers as the first took: {after_first} -> {after_second}")


@torch.no_grad()
def test_features_and_channels_last_inputs_use_the_pool():
    model, x = _model_and_input()
    expected = model.forward_features(x.clone())  # first pass: fills the pool
    features = model.forward_features(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    assert model.activation_pool.stats()["passes"] == 2


def test_no_pool_off_cpu_or_when_turned_off(monkeypatch):
    pool = ActivationPool()
    assert pool.applies(INPUT)
    assert not pool.applies(torch.empty(1, device="meta"))
    monkeypatch.setenv(activation_pool.ENV_VAR, "off")
    assert not pool.applies(INPUT)
    monkeypatch.setenv(activation_pool.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="RESNET_FAST_CPU_ACTIVATION_POOL must be one of 1, 0"):
        pool.applies(INPUT)


def _train_steps(model, x, steps):
    """SGD steps inside the model's pool (forward, backward and update), as resnet-fast train runs them."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        with model.activation_pool.scope(x):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_training_steps_in_the_pool_are_bit_identical(monkeypatch):
    model, x = _model_and_input(batch=2, size=32)
    twin = copy.deepcopy(model)
    monkeypatch.setenv(activation_pool.ENV_VAR, "0")
    expected = _train_steps(model.train(), x, steps=3)
    monkeypatch.setenv(activation_pool.ENV_VAR, "1")
    pooled = _train_steps(twin.train(), x, steps=3)
    for index, (got, want) in enumerate(zip(pooled, expected)):
        assert torch.equal(got, want), f"parameter {index} differs after pooled training steps"
    stats = twin.activation_pool.stats()
    assert stats["passes"] == 3 and stats["hits"] > 0, f"the steps must reuse pooled buffers: {stats}"


@torch.no_grad()
def test_a_kept_tensor_is_never_lent_again():
    pool = ActivationPool()
    with pool.scope(INPUT):
        kept = torch.full((POOLED_FLOATS,), 1.0)
    for _ in range(3):
        with pool.scope(INPUT):
            other = torch.full((POOLED_FLOATS,), 2.0)
            assert other.data_ptr() != kept.data_ptr(), "a block still in use was lent twice"
            del other
    assert bool((kept == 1.0).all()), "a later pass overwrote a tensor the caller kept"
    del pool
    gc.collect()
    assert bool((kept == 1.0).all()), "closing the pool freed a block that is still in use"


@torch.no_grad()
def test_blocks_are_reused_by_exact_size_and_small_ones_bypass_the_pool():
    pool = ActivationPool()
    with pool.scope(INPUT):
        first = torch.empty(POOLED_FLOATS)
        address = first.data_ptr()
        del first
        again = torch.empty(POOLED_FLOATS)
        small = torch.empty(16)
        assert again.data_ptr() == address, "a freed block of the same size was not reused"
        del again, small
    stats = pool.stats()
    assert (stats["misses"], stats["hits"]) == (1, 1), f"only the two large tensors go through the pool: {stats}"
    assert stats["cached_bytes"] == POOLED_FLOATS * 4 and stats["lent_bytes"] == 0, stats


@torch.no_grad()
def test_blocks_a_pass_did_not_use_are_freed_when_it_ends():
    pool = ActivationPool()
    with pool.scope(INPUT):
        torch.empty(POOLED_FLOATS)
    with pool.scope(INPUT):
        torch.empty(2 * POOLED_FLOATS)
    assert pool.stats()["cached_bytes"] == 2 * POOLED_FLOATS * 4, (
        f"the first pass's idle block must be freed when the second ends: {pool.stats()}")
    pool.release()
    assert pool.stats()["cached_bytes"] == 0


@torch.no_grad()
def test_a_block_freed_after_its_pass_goes_back_to_the_pool():
    pool = ActivationPool()
    with pool.scope(INPUT):
        output = torch.empty(POOLED_FLOATS)
    assert pool.stats()["lent_bytes"] == POOLED_FLOATS * 4
    del output
    assert pool.stats()["cached_bytes"] == POOLED_FLOATS * 4, pool.stats()


@torch.no_grad()
def test_scopes_nest_and_restore_the_thread_state_after_an_error():
    outer, inner = ActivationPool(), ActivationPool()
    with outer.scope(INPUT):
        with inner.scope(INPUT):
            torch.empty(POOLED_FLOATS)
        torch.empty(POOLED_FLOATS)
    assert (outer.stats()["misses"], inner.stats()["misses"]) == (1, 1)
    with pytest.raises(RuntimeError, match="inside"):
        with outer.scope(INPUT):
            raise RuntimeError("inside")
    torch.empty(POOLED_FLOATS)  # outside every scope again: served by torch's allocator
    assert outer.stats()["misses"] + outer.stats()["hits"] == 1, outer.stats()


@torch.no_grad()
def test_threads_share_one_pool():
    model, x = _model_and_input(batch=1, size=48)
    expected = model(x)
    results, errors = [None] * 3, []

    def run(index):
        try:
            with torch.no_grad():  # grad mode is per thread
                for _ in range(2):
                    results[index] = model(x)
        except Exception as error:  # reported below: a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert model.activation_pool.stats()["passes"] >= 2, "the threads' passes must use the pool"
    for result in results:
        assert torch.equal(result, expected), "a pass running beside another on the same pool differs"


@torch.no_grad()
def test_copies_and_pickles_of_a_model_start_with_an_empty_pool():
    model, x = _model_and_input(batch=1, size=32)
    model(x)
    assert model.activation_pool.stats()["cached_bytes"] > 0
    twin = copy.deepcopy(model)
    assert twin.activation_pool is not model.activation_pool
    assert twin.activation_pool.stats()["passes"] == 0
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.activation_pool.stats()["passes"] == 0
    assert torch.equal(loaded(x), model(x))
