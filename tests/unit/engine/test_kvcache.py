"""KV kept in host memory across a slot's reassignment (issue 19): the cache's bookkeeping, the exactness
of a copy out and back in real llama.cpp, and the scheduler restoring a conversation's cells."""

import mmap
import weakref

import gevent
import numpy as np
import pytest

from appliance.engine.events import Delta, Failed, GenerationRequest
from appliance.engine.kvcache import HostCache
from appliance.engine.llama import Batch, LlamaContext, LlamaModel, SamplingParams
from appliance.engine.registry import ModelRegistry
from appliance.settings import Settings


def state(n: int) -> bytearray:
    return bytearray(n)


# -- the cache's bookkeeping -------------------------------------------------------------------


def test_best_is_the_longest_shared_prefix():
    c = HostCache(1 << 20)
    c.put([1, 2, 3, 4, 5], state(10))
    c.put([1, 2, 9, 9], state(10))
    c.put([7, 8], state(10))
    entry, n = c.best([1, 2, 3, 4, 6, 6])
    assert n == 4 and entry.tokens.tolist() == [1, 2, 3, 4, 5]
    entry, n = c.best([1, 2, 9])
    assert n == 3 and entry.tokens.tolist() == [1, 2, 9, 9]
    assert c.best([5, 5]) == (None, 0)
    assert c.best([]) == (None, 0)


def test_an_entry_extending_another_replaces_it():
    c = HostCache(1 << 20)
    c.put([1, 2, 3], state(100))
    c.put([1, 2, 3, 4, 5], state(100))
    assert len(c) == 1 and c.used == 100 + 5 * 4
    assert c.holds([1, 2, 3]) and c.holds([1, 2, 3, 4, 5]) and not c.holds([1, 2, 4])


def test_least_recently_used_goes_first_within_the_budget():
    c = HostCache(3 * (1000 + 8))  # three entries of 1000 bytes and two tokens
    for i in range(3):
        c.put([i, i], state(1000))
    assert len(c) == 3 and c.evicted == 0
    c.put([9, 9], state(1000))
    assert len(c) == 3 and c.evicted == 1
    assert c.best([0, 0]) == (None, 0)  # the oldest went
    assert c.best([1, 1])[1] == 2 and c.used <= c.budget


def test_an_entry_larger_than_the_budget_is_not_kept():
    c = HostCache(500)
    c.put([1], state(100))
    assert not c.put([2, 2], state(1000))
    assert len(c) == 1 and c.best([1])[1] == 1


def test_take_removes_and_counts():
    c = HostCache(1 << 20)
    c.put([1, 2], state(10))
    entry, _ = c.best([1, 2])
    c.take(entry)
    assert len(c) == 0 and c.used == 0 and c.restored == 1 and c.saved == 1
    c.take(entry)  # twice: nothing more
    assert c.restored == 1


# -- real llama.cpp ----------------------------------------------------------------------------



def test_cells_copied_out_and_into_another_sequence_give_the_same_logits(model_path):
    model = LlamaModel(model_path)
    ctx = LlamaContext(model, n_ctx_seq=128, n_seq=3, n_batch=64, n_threads=1, n_threads_batch=1)
    try:
        prompt = model.tokenize("The river runs past the stone garden and the silver market.")
        batch = Batch(64)
        batch.add(prompt, 0, 0, True)
        assert ctx.decode(batch) == 0
        saved = ctx.seq_state(0)
        assert saved is not None and len(saved) > 0
        assert ctx.set_seq_state(2, saved)  # another sequence, another KV stream

        def next_logits(seq: int) -> np.ndarray:
            batch.clear()
            batch.add_one(prompt[-1], len(prompt), seq)  # the same token at the same position
            assert ctx.decode(batch) == 0
            return ctx.logits(0).copy()

        kept, restored = next_logits(0), next_logits(2)
        assert np.array_equal(kept, restored)
        empty = next_logits(1)  # a sequence without those cells: other logits (the test can fail)
        assert not np.array_equal(kept, empty)
    finally:
        ctx.close()
        model.close()





def test_a_copy_has_pages_of_its_own_and_gives_them_back(model_path):
    """Copies are megabytes of ever-different sizes; from malloc's heap the holes they left stayed in
    the worker's RSS (issue 21's soak). Each copy is an anonymous mapping of its own, unmapped as soon
    as the copy is dropped."""
    model = LlamaModel(model_path)
    ctx = LlamaContext(model, n_ctx_seq=128, n_seq=1, n_batch=64, n_threads=1, n_threads_batch=1)
    try:
        batch = Batch(64)
        batch.add(model.tokenize("The river runs past the stone garden."), 0, 0, True)
        assert ctx.decode(batch) == 0
        copy = ctx.seq_state(0)
        assert copy is not None
        (view,) = copy._objects.values()  # what ctypes' from_buffer keeps alive: a view of the mapping
        pages = view.obj
        assert isinstance(pages, mmap.mmap) and len(pages) == len(copy)
        gone = weakref.ref(pages)
        del view, pages, copy
        assert gone() is None  # unmapped now, not at some later collection
    finally:
        ctx.close()
        model.close()

@pytest.fixture
def make_engine(model_path):
    registries = []

    def make(cache_mib: int, parallel: int = 1):
        reg = ModelRegistry()
        reg.load(Settings().model_settings("tiny", model_path, n_ctx=256, parallel=parallel, n_threads=1,
                                           cache_ram_mib=cache_mib))
        registries.append(reg)
        return reg.get("tiny")

    yield make
    for reg in registries:
        reg.stop_all()


def ask(engine, text: str, n: int = 12):
    gen = engine.submit(GenerationRequest(tuple(engine.model.tokenize(text)), n, SamplingParams(seed=5)))
    out, done = "", None
    for ev in gen.events():
        if isinstance(ev, Delta):
            out += ev.text
        elif isinstance(ev, Failed):
            raise ev.error
        else:
            done = ev
    return out, done


A = "The first conversation is about the harbor lantern and the copper signal in winter. " * 2
B = "Another conversation entirely: velvet canyon, thunder bridge, paper ocean, quiet forest. " * 2


def test_a_conversation_comes_back_after_its_slot_served_another(make_engine):
    # One slot: B takes it between A's two turns. With the host cache A's cells come back, and A's
    # second turn decodes exactly what it does when its slot was never taken.
    kept = make_engine(0)
    first, _ = ask(kept, A)
    second_kept, d_kept = ask(kept, A + first + " Go on.")
    assert kept.host_cache_status() is None

    engine = make_engine(64)
    assert ask(engine, A)[0] == first
    ask(engine, B)  # takes the only slot: A's cells are copied out first
    st = engine.host_cache_status()
    assert st["saved"] == 1 and st["entries"] == 1 and 0 < st["bytes"] <= st["budget_bytes"] == 64 << 20
    second, done = ask(engine, A + first + " Go on.")
    assert second == second_kept
    assert done.usage.cached_tokens == d_kept.usage.cached_tokens >= len(engine.model.tokenize(A))
    st = engine.host_cache_status()
    assert st["restored"] == 1 and st["saved"] == 2  # B's cells were copied out in turn


def test_without_the_host_cache_the_prefix_is_decoded_again(make_engine):
    engine = make_engine(0)
    first, _ = ask(engine, A)
    ask(engine, B)
    _, done = ask(engine, A + first + " Go on.")
    assert done.usage.cached_tokens <= 1  # at most the BOS token B shares


def test_concurrent_conversations_over_fewer_slots_reuse_their_cells(make_engine):
    engine = make_engine(64, parallel=2)
    texts = [f"Conversation {i}: " + B + f" number {i}." for i in range(4)]
    for _turn in range(2):
        jobs = [gevent.spawn(ask, engine, t) for t in texts]
        gevent.joinall(jobs, raise_error=True)
        texts = [t + j.value[0] + " Next?" for t, j in zip(texts, jobs)]
        dones = [j.value[1] for j in jobs]
    # Every second turn found its first turn's cells, in a slot or in host memory.
    assert all(d.usage.cached_tokens >= d.usage.prompt_tokens - 16 for d in dones), [
        (d.usage.cached_tokens, d.usage.prompt_tokens) for d in dones]
    assert engine.host_cache_status()["restored"] >= 2
