"""Plain greedy reads the argmax straight from the logits (SamplerChain's fast path); it must pick what
llama.cpp's own greedy sampler picks, ties included, and leave every other chain to llama.cpp."""

import ctypes

import llama_cpp as C
import numpy as np
import pytest

from appliance.engine.llama import Batch, LlamaContext, LlamaModel, SamplerChain, SamplingParams


@pytest.fixture
def decoded(model_path):
    """A context that decoded a prompt; row `i` of its logits is the next token's."""
    model = LlamaModel(model_path)
    ctx = LlamaContext(model, n_ctx_seq=256, n_seq=1, n_batch=64, n_threads=1, n_threads_batch=1)
    batch = Batch(64)
    prompt = model.tokenize("The lighthouse keeper wrote in the log that night:")
    i = batch.add(prompt, 0, 0, True)
    assert ctx.decode(batch) == 0
    yield model, ctx, batch, len(prompt), i
    ctx.close()
    model.close()


def llama_greedy(ctx: LlamaContext, i: int) -> int:
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
    try:
        return int(C.llama_sampler_sample(chain, ctx.ptr, i))
    finally:
        C.llama_sampler_free(chain)


def test_greedy_picks_what_llama_cpp_picks_for_many_steps(decoded):
    model, ctx, batch, pos, i = decoded
    ours = SamplerChain(model, SamplingParams(temperature=0))
    assert ours._argmax
    try:
        for _ in range(48):
            token = ours.sample(ctx, i)
            assert token == llama_greedy(ctx, i)
            batch.clear()
            i = batch.add_one(token, pos, 0)
            pos += 1
            assert ctx.decode(batch) == 0
    finally:
        ours.close()


def test_a_tie_goes_to_the_lowest_id_as_in_llama_cpp(decoded):
    model, ctx, _, _, i = decoded
    logits = ctx.logits(i)  # llama.cpp's own buffer: both samplers read what is written here
    top = float(logits.max()) + 1.0
    logits[[9, 5, 700]] = top
    ours = SamplerChain(model, SamplingParams(temperature=0))
    try:
        assert ours.sample(ctx, i) == llama_greedy(ctx, i) == 5
    finally:
        ours.close()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, logit_bias=((3, 50.0),)),
        SamplingParams(temperature=0, repeat_penalty=1.3),
        SamplingParams(temperature=0, presence_penalty=0.5),
        SamplingParams(temperature=0, frequency_penalty=0.5),
        SamplingParams(temperature=0.7),
    ],
    ids=["logit_bias", "repeat_penalty", "presence", "frequency", "temperature"],
)
def test_any_other_chain_is_llama_cpp_s(decoded, params):
    model, ctx, _, _, i = decoded
    chain = SamplerChain(model, params)
    try:
        assert not chain._argmax
        if params.logit_bias:  # the bias lifts token 3 to the top: the chain really ran
            assert chain.sample(ctx, i) == 3
    finally:
        chain.close()


def test_logits_view_is_the_buffer_llama_cpp_samples_from(decoded):
    """The tie test writes through ctx.logits(); it proves something only if that is llama.cpp's buffer."""
    _, ctx, _, _, i = decoded
    view = ctx.logits(i)
    assert view.ctypes.data == ctypes.cast(C.llama_get_logits_ith(ctx.ptr, i), ctypes.c_void_p).value
    assert np.isfinite(view).all()
