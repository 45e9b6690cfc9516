"""Batched generation: left padding, sampling, log-probs and the addition stop rule."""

import pytest
import torch

from critical_tokens.addition import completion, prompt
from critical_tokens.generation import addition_stop_rule, generate, left_pad
from critical_tokens.model import build_model
from critical_tokens.tokenizer import decode, encode

PAIRS = [(1, 2), (12345, 678), (99, 1)]  # prompts of three different lengths
MAX_NEW = 24


@pytest.fixture(scope="module")
def model(tokenizer):
    """A micro GPT-2 with large random weights, so that its outputs depend on every input detail."""
    torch.manual_seed(0)
    model = build_model("micro", tokenizer, n_digits=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [encode(tokenizer, prompt(a, b)) for a, b in PAIRS]


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_rows_equal_rows_generated_alone(model, tokenizer, prompts):
    """Left padding and position ids are right: a row's greedy tokens and log-probs do not depend on
    the rest of the batch."""
    stop = addition_stop_rule(tokenizer)
    batch = generate(model, prompts, max_new_tokens=MAX_NEW, **stop)
    lengths = batch.completion_mask.sum(-1)  # (B,)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=MAX_NEW, **stop)
        n = int(lengths[i])
        assert int(alone.completion_mask.sum()) == n
        assert batch.completion_ids[i, :n].tolist() == alone.completion_ids[0, :n].tolist()
        torch.testing.assert_close(batch.logprobs[i, :n], alone.logprobs[0, :n], atol=1e-5, rtol=1e-5)
        assert bool(batch.finished[i]) == bool(alone.finished[0])
    # not vacuous: the rows' log-probs differ, so a row that saw wrong positions or padding would show
    assert not torch.allclose(batch.logprobs[0], batch.logprobs[1], atol=1e-3)


def test_sampling_is_reproducible_with_a_seeded_generator(model, tokenizer, prompts):
    stop = addition_stop_rule(tokenizer)
    runs = [
        generate(model, prompts, max_new_tokens=MAX_NEW, temperature=2.0,
                 generator=torch.Generator().manual_seed(7), **stop)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].logprobs, runs[1].logprobs)
    greedy = generate(model, prompts, max_new_tokens=MAX_NEW, **stop)
    assert not torch.equal(runs[0].sequences, greedy.sequences)  # temperature 2 really samples


@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_logprobs_match_a_teacher_forced_forward_pass(model, tokenizer, prompts, temperature):
    stop = addition_stop_rule(tokenizer)
    gen = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=temperature,
                   generator=torch.Generator().manual_seed(3), **stop)
    P, T = gen.prompt_length, gen.completion_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=gen.sequences, attention_mask=gen.attention_mask,
                       position_ids=position_ids_of(gen.attention_mask)).logits  # (B, P+T, V)
    # the logits at position P-1+t predict completion token t; greedy log-probs are at temperature 1
    scale = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits[:, P - 1 : P - 1 + T].float() / scale, dim=-1)  # (B, T, V)
    expected = logp.gather(-1, gen.completion_ids[..., None])[..., 0]  # (B, T)
    mask = gen.completion_mask
    torch.testing.assert_close(gen.logprobs[mask], expected[mask], atol=1e-4, rtol=0)
    assert (gen.logprobs[~mask] == 0).all()


def test_completion_mask_covers_exactly_the_generated_tokens(model, tokenizer, prompts):
    stop = addition_stop_rule(tokenizer)
    gen = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=2.0,
                   generator=torch.Generator().manual_seed(1), **stop)
    B, T = gen.completion_mask.shape
    assert gen.sequences.shape == (B, gen.prompt_length + T)
    assert T == int(gen.completion_mask.sum(-1).max())
    for i in range(B):
        n = int(gen.completion_mask[i].sum())
        assert gen.completion_mask[i, :n].all() and not gen.completion_mask[i, n:].any()  # a prefix
        assert (gen.completion_ids[i, n:] == tokenizer.pad_token_id).all()
        assert (gen.completion_ids[i, :n] != tokenizer.pad_token_id).all()
        if bool(gen.finished[i]):
            last = int(gen.completion_ids[i, n - 1])
            assert last in (tokenizer.eos_token_id, stop["stop_token_id"])
        else:
            assert n == MAX_NEW
    prompt_mask = gen.attention_mask[:, : gen.prompt_length]
    assert prompt_mask.sum(-1).tolist() == [len(p) for p in prompts]
    assert torch.equal(gen.attention_mask[:, gen.prompt_length :].bool(), gen.completion_mask)


# --- the stop rule, with a fake model that emits a fixed text ---------------------------------------


class ScriptOutput(dict):
    """What :func:`generate` reads from a model call: ``out.logits`` and ``out["cache"]``."""

    @property
    def logits(self):
        return self["logits"]


class ScriptedModel(torch.nn.Module):
    """Emits, greedily, the i-th token of row b's script at the i-th generation step (then padding).
    The "cache" it hands back is just the number of tokens generated so far."""

    def __init__(self, scripts: list[list[int]], vocab_size: int, pad_id: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # generate() reads the device from it
        self.scripts, self.vocab_size, self.pad_id = scripts, vocab_size, pad_id

    def forward(self, input_ids, attention_mask, position_ids, use_cache, cache=None, **kwargs):
        step = 0 if cache is None else cache + 1
        B, L = input_ids.shape
        logits = torch.zeros((B, L, self.vocab_size))
        for b, script in enumerate(self.scripts):
            logits[b, -1, script[step] if step < len(script) else self.pad_id] = 100.0
        return ScriptOutput(logits=logits, cache=step)


def scripted_generation(tokenizer, texts, max_new_tokens, eos_after=()):
    scripts = [encode(tokenizer, t) + ([tokenizer.eos_token_id] if i in eos_after else []) for i, t in enumerate(texts)]
    fake = ScriptedModel(scripts, len(tokenizer), tokenizer.pad_token_id)
    prompts = [encode(tokenizer, prompt(123, 45))] * len(texts)
    return generate(fake, prompts, max_new_tokens=max_new_tokens, **addition_stop_rule(tokenizer))


def test_stops_at_the_newline_after_the_result_line(tokenizer):
    expected = completion(123, 45)  # "\n<scratch>\n...\n</scratch>\n1 6 8\n": many newlines before the stop
    gen = scripted_generation(tokenizer, [expected + "Input:\n12"], max_new_tokens=len(expected) + 20)
    assert bool(gen.finished[0])
    assert int(gen.completion_mask[0].sum()) == len(expected)
    assert gen.completions(tokenizer) == [expected]
    assert decode(tokenizer, gen.completion_ids[0]) == expected


def test_rows_stop_independently(tokenizer):
    expected = completion(123, 45)
    texts = [expected + "Input:\n12", "\n<scratch>\n[1", "\n<scratch>\n[1,2,3] + [4,5] , A=[] , C=0 ,"]
    # row 0: the stop rule; row 1: end-of-text; row 2: runs into the length limit
    gen = scripted_generation(tokenizer, texts, max_new_tokens=len(expected) + 5, eos_after={1})
    assert gen.finished.tolist() == [True, True, False]
    assert gen.completion_mask.sum(-1).tolist() == [len(expected), len(texts[1]) + 1, len(expected) + 5]
    assert gen.completions(tokenizer)[:2] == [expected, texts[1]]
    assert int(gen.completion_ids[1, len(texts[1])]) == tokenizer.eos_token_id


def test_hitting_max_new_tokens_is_not_finished(tokenizer):
    expected = completion(123, 45)
    gen = scripted_generation(tokenizer, [expected], max_new_tokens=len(expected) - 1)  # one short of the stop
    assert not bool(gen.finished[0])
    assert gen.completion_mask.all() and gen.completion_mask.shape == (1, len(expected) - 1)
    assert gen.completions(tokenizer) == [expected[:-1]]


# --- the static-shape decoder (static_decode.py): the GPU's CUDA-graph path, checked eagerly here ----------


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_static_decoder_gives_the_tokens_and_logprobs_of_the_plain_path(model, tokenizer, prompts, temperature):
    """Left-padded rows of three prompt lengths, a random model whose outputs depend on every detail:
    the static cache (masked slots, own position ids) must give the same tokens as ``model(...)``."""
    stop = addition_stop_rule(tokenizer)
    plain, static = (generate(model, prompts, max_new_tokens=MAX_NEW, temperature=temperature, decoder=d,
                              generator=torch.Generator().manual_seed(3), **stop) for d in ("hf", "static"))
    assert torch.equal(static.sequences, plain.sequences)
    assert torch.equal(static.completion_mask, plain.completion_mask) and torch.equal(static.finished, plain.finished)
    torch.testing.assert_close(static.logprobs, plain.logprobs, atol=1e-4, rtol=1e-4)


def test_static_decoder_logits_match_a_full_forward_pass(model, tokenizer, prompts):
    from critical_tokens.static_decode import StaticDecoder

    ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")  # (B, P)
    decoder = StaticDecoder(model, len(prompts), 64)
    with torch.no_grad():
        first = decoder.prefill(ids, mask, position_ids_of(mask))  # (B, V)
        token = first.argmax(-1)
        second = decoder.step(token)
        full_ids, full_mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        expected = model(input_ids=full_ids, attention_mask=full_mask, position_ids=position_ids_of(full_mask)).logits  # (B, P+1, V)
    torch.testing.assert_close(first, expected[:, -2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second, expected[:, -1], atol=1e-4, rtol=1e-4)
    assert int(decoder.slot) == ids.shape[1] + 1  # the step advanced its slot and positions itself
    torch.testing.assert_close(decoder.position, position_ids_of(full_mask)[:, -1] + 1)


def test_the_cpu_cache_in_chunks_gives_a_full_forward_passs_logits_across_chunk_boundaries(model, tokenizer):
    """A prompt longer than a chunk (its prefill written across two chunks), then steps that cross the next
    boundary, with rows dropped half way (keep): each step's logits are those of one model(...) call on the
    whole sequence. Left padding of unequal prompts is masked in every chunk."""
    from critical_tokens.static_decode import CHUNK, StaticDecoder

    texts = [prompt(12, 34) + completion(12, 34)[:70], prompt(7, 8) + completion(7, 8)[:30]]
    rows = [encode(tokenizer, t) for t in texts]
    assert 2 * CHUNK > len(rows[0]) > CHUNK > len(rows[1])
    ids, mask = left_pad(rows, tokenizer.pad_token_id, "cpu")  # (2, P), P > CHUNK
    steps = 2 * CHUNK - ids.shape[1] + 3  # past the end of the second chunk
    decoder = StaticDecoder(model, 2, ids.shape[1] + steps)
    with torch.no_grad():
        logits = decoder.prefill(ids, mask, position_ids_of(mask))
        for t in range(steps):
            token = logits.argmax(-1)  # (R,)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if t == steps // 2:  # the first row leaves; the second goes on alone
                decoder.keep(torch.tensor([1]))
                ids, mask = ids[1:], mask[1:]
                token = token[1:]
            logits = decoder.step(token)
            expected = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_of(mask)).logits[:, -1]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert len(decoder.key_chunks) == 3 and decoder.key_chunks[0].shape[1] == 1


def test_a_models_decoders_are_kept_per_shape_two_at_most(tokenizer):
    from critical_tokens.static_decode import decoder_for

    model = build_model("micro", tokenizer, n_digits=2)
    a = decoder_for(model, 2, 64)
    assert decoder_for(model, 2, 64) is a  # the same shape reuses the decoder (and its captured graph)
    decoder_for(model, 3, 64), decoder_for(model, 4, 64)
    assert list(model._static_decoders) == [(3, 64), (4, 64)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_give_the_eager_static_tokens(model, tokenizer, prompts):
    stop = addition_stop_rule(tokenizer)
    gpu_model = build_model("micro", tokenizer, n_digits=2).cuda().eval()
    gpu_model.load_state_dict(model.state_dict())
    graphed = generate(gpu_model, prompts, max_new_tokens=MAX_NEW, decoder="static", **stop)
    assert gpu_model._static_decoders and all(d.graph not in (None, False) for d in gpu_model._static_decoders.values())
    for d in gpu_model._static_decoders.values():
        d.graph = False  # the same decoder's steps, eager
    eager = generate(gpu_model, prompts, max_new_tokens=MAX_NEW, decoder="static", **stop)
    assert torch.equal(graphed.sequences, eager.sequences)


def test_a_model_and_its_decoders_are_freed_together(tokenizer):
    import gc
    import weakref

    from critical_tokens.static_decode import decoder_for

    gc.disable()  # freed by reference counting alone, not by the cycle collector
    try:
        model = build_model("micro", tokenizer, n_digits=2)
        decoder = weakref.ref(decoder_for(model, 2, 64))
        del model
        assert decoder() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_rows_that_finish_leave_the_cpu_batch_without_changing_any_row(tokenizer, temperature, monkeypatch):
    """The CPU's static path drops finished rows (StaticDecoder.keep) and attends over the written
    slots only: every row's tokens, log-probs and stop flag are still those of ``model(...)``. The
    shipped model finishes additions of 1 to 4 digits at different lengths, so rows do leave."""
    from critical_tokens import addition
    from critical_tokens.model import load_pretrained
    from critical_tokens.static_decode import StaticDecoder

    model, tok, _ = load_pretrained("critical_tokens/checkpoints/tiny-n3-d1-lr3e-4")
    model.eval()
    pairs = [(7, 5), (31, 4), (123, 45), (999, 999), (4821, 77), (5, 6012), (66, 66), (1, 1)]
    prompts = [encode(tok, addition.prompt(a, b)) for a, b in pairs]
    kept = []
    original = StaticDecoder.keep
    monkeypatch.setattr(StaticDecoder, "keep", lambda self, rows: (kept.append(len(rows)), original(self, rows))[1])
    stop = addition_stop_rule(tok)
    plain, static = (generate(model, prompts, max_new_tokens=addition.max_completion_length(4) + 20, temperature=temperature, decoder=d,
                              generator=torch.Generator().manual_seed(5), **stop) for d in ("hf", "static"))
    assert kept and kept == sorted(kept, reverse=True) and kept[-1] < len(pairs)  # rows left, in steps
    assert torch.equal(static.sequences, plain.sequences)
    assert torch.equal(static.completion_mask, plain.completion_mask) and torch.equal(static.finished, plain.finished)
    torch.testing.assert_close(static.logprobs, plain.logprobs, atol=1e-4, rtol=1e-4)
    assert len(set(static.completion_mask.sum(-1).tolist())) > 2  # not vacuous: the rows did stop at different lengths
