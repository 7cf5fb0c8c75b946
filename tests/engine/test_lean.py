"""The lean decoder's decode-step kernels, on random weights and a tiny random Llama (no model
download): the prepacked int8 linear, the per-row decode attention, the decode step itself, and
the batcher's greedy pick. Each must give a row the same numbers whatever shares its batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from transformers import LlamaConfig, LlamaForCausalLM

from engine import lean, quantize
from engine.attention import NAME as ROWWISE_ATTENTION
from engine.attention import decode_attention
from engine.batching import _Batch, _merge
from engine.quantize import Int4Linear, Int8Linear, PackedInt8Linear, packed_or_plain
from engine.sampling import ARGMAX_CHUNK, greedy_tokens

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201 - the decode path as the server runs it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_packed_int8_linear_is_int8linear_prepacked_and_independent_of_the_batch() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 1536)
    int8 = Int8Linear(linear)
    packed = PackedInt8Linear(int8)
    rows = torch.randn(8, 576) * 3
    rows[3] = 0  # an all-zero row: the bias, not NaN
    together = packed.rows(rows)
    alone = torch.cat([packed.rows(rows[i:i + 1]) for i in range(8)])
    assert torch.equal(together, alone)  # bit for bit, whatever shares the call
    assert torch.equal(together[3], linear.bias.detach())
    # the same integers as Int8Linear: only the float scaling may round differently
    reference = int8.rows(rows)
    assert (together - reference).abs().max() < 1e-5 * reference.abs().max()
    assert torch.equal(packed(rows.view(2, 4, 576)).view(8, -1), together)  # forward keeps the shape


def test_packed_int8_linear_gives_way_where_fbgemm_cannot_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    int8 = Int8Linear(torch.nn.Linear(64, 96))
    assert isinstance(packed_or_plain(int8), PackedInt8Linear)

    def no_fbgemm(*_: object) -> None:
        raise RuntimeError("Didn't find engine for operation quantized::linear_prepack")

    with monkeypatch.context() as patch:
        patch.setattr(torch.ops.quantized, "linear_prepack", no_fbgemm)
        assert packed_or_plain(int8) is int8

    def saturating(self: PackedInt8Linear, *_: object) -> None:  # what 16-bit pair sums would give
        raise ValueError("FBGEMM's int8 product is not exact on this CPU")

    monkeypatch.setattr(PackedInt8Linear, "_check_exact", saturating)
    assert packed_or_plain(int8) is int8


def test_int4_rows_are_the_kernels_bfloat16_exactly() -> None:
    torch.manual_seed(0)
    int4 = Int4Linear(torch.nn.Linear(576, 960, bias=False))
    rows = torch.randn(3, 576)
    out = int4.rows(rows)
    assert out.dtype == torch.bfloat16  # the decode step lets float32 operands promote it
    assert torch.equal(out.float(), int4(rows))
    with_bias = Int4Linear(torch.nn.Linear(576, 960))
    assert with_bias.rows(rows).dtype == torch.float32


def test_decode_attention_is_each_rows_own_attention() -> None:
    torch.manual_seed(0)
    batch, heads, kv_heads, dim, length = 4, 9, 3, 64, 40
    starts = [0, 7, 23, 39]  # left padding: the last row has a single key
    query = torch.randn(batch, heads, dim) * 0.125
    spare = torch.randn(batch, kv_heads, length + 16, dim)  # room to grow, as the cache has
    key, value = spare[:, :, :length], torch.randn(batch, kv_heads, length + 16, dim)[:, :, :length]
    out = decode_attention(query, key, value, starts)
    assert out.shape == (batch, heads * dim)
    for row, start in enumerate(starts):
        expected = F.scaled_dot_product_attention(
            query[row:row + 1].unsqueeze(2), key[row:row + 1, :, start:], value[row:row + 1, :, start:],
            scale=1.0, enable_gqa=True)
        assert torch.allclose(out[row], expected[0, :, 0].reshape(-1), atol=1e-5)
        # alone, unpadded, in storage of another size: the same bits
        alone = decode_attention(query[row:row + 1], key[row:row + 1, :, start:].clone(),
                                 value[row:row + 1, :, start:].clone(), [0])
        assert torch.equal(alone[0], out[row])


def test_greedy_tokens_is_argmax() -> None:
    torch.manual_seed(0)
    for vocab in (4 * ARGMAX_CHUNK, 1000):
        logits = torch.randn(8, vocab)
        assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
        ties = torch.randint(0, 3, (8, vocab)).float()  # the first of equal maxima, across chunks too
        assert torch.equal(greedy_tokens(ties), ties.argmax(dim=-1))
        ties[2, 5], ties[2, vocab - 3] = float("nan"), float("nan")
        assert torch.equal(greedy_tokens(ties), ties.argmax(dim=-1))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(ROWWISE_ATTENTION)
    return model


def prefilled(decoder: lean.LeanDecoder, prompt: list[int]) -> _Batch:
    cache = decoder.make_cache()
    with torch.inference_mode():
        out = decoder(input_ids=torch.tensor([prompt]), position_ids=torch.arange(len(prompt))[None],
                      cache=cache, logits_to_keep=1, row_starts=[0])
    mask = torch.ones((1, len(prompt)), dtype=torch.long)
    return _Batch([], cache, mask, out.logits[:, -1].argmax(-1))


def decode(decoder: lean.LeanDecoder, batch: _Batch, steps: int) -> list[torch.Tensor]:
    """Greedy decode steps the way the batcher runs them; each step's logits."""
    logits = []
    with torch.inference_mode():
        for _ in range(steps):
            positions = batch.mask.sum(-1, keepdim=True)
            batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
            starts = (batch.mask.shape[1] - batch.mask.sum(-1)).tolist()
            out = decoder(input_ids=batch.last.unsqueeze(-1), position_ids=positions, cache=batch.cache,
                          row_starts=starts, decoding=True).logits[:, -1]
            batch.last = out.argmax(-1)
            logits.append(out)
    return logits


def test_the_decode_step_is_the_forward_on_the_same_weights() -> None:
    """With the prompts' int8 projections put in for the decode ones, a decode step computes
    what the general forward computes for that token (the attention, RMSNorm and RoPE are
    rewritten, not the maths)."""
    model = tiny_llama()
    decoder = lean.LeanDecoder(model, 256, decode_int4=True)
    for layer in decoder.layers:
        layer.decode = layer.prefill
    decoder.lm_head = Int8Linear(model.lm_head)
    prompt = torch.randint(0, 256, (12,)).tolist()
    batch = prefilled(decoder, prompt)
    fed = [int(batch.last)]  # the tokens the steps take in: the prompt's next, then their own
    stepped = decode(decoder, batch, 6)
    fed += [int(logits.argmax(-1)) for logits in stepped[:-1]]
    sequence = prompt + fed
    with torch.inference_mode():
        whole = decoder(input_ids=torch.tensor([sequence]), position_ids=torch.arange(len(sequence))[None],
                        cache=decoder.make_cache(), row_starts=[0]).logits[0]
    for step, logits in enumerate(stepped):
        expected = whole[len(prompt) + step]
        assert torch.allclose(logits[0], expected, atol=1e-4 * expected.abs().max().item()), step


def test_the_decode_step_gives_each_row_its_solo_numbers() -> None:
    """Rows of different lengths decoded together (left-padded, as the batcher merges them)
    get bit for bit the logits each gets alone, step after step."""
    model = tiny_llama()
    decoder = lean.LeanDecoder(model, 256, decode_int4=True)
    assert isinstance(decoder.layers[0].decode.qkv, Int4Linear)
    assert isinstance(decoder.layers[0].decode.gate_up, PackedInt8Linear)
    prompts = [torch.randint(0, 256, (length,)).tolist() for length in (5, 17, 9)]
    solo = [decode(decoder, prefilled(decoder, prompt), 5) for prompt in prompts]
    together = prefilled(decoder, prompts[0])
    for prompt in prompts[1:]:
        together = _merge(together, prefilled(decoder, prompt))
    batched = decode(decoder, together, 5)
    for step in range(5):
        for row in range(len(prompts)):
            assert torch.equal(batched[step][row], solo[row][step][0]), (step, row)


def test_the_compiled_decode_step_gives_the_python_steps_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decode step runs as TorchScript (_decode_program); the same module in Python, as it runs
    where TorchScript cannot compile it, gives bit for bit the same logits, rows of different
    lengths together (merged, their cache has no spare room: the first step grows its storage)."""
    model = tiny_llama()
    compiled = lean.LeanDecoder(model, 256, decode_int4=True)
    assert isinstance(compiled._decode_program(), torch.jit.ScriptModule)  # noqa: SLF001

    def cannot(*_: object) -> None:
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "script", cannot)
    eager = lean.LeanDecoder(model, 256, decode_int4=True)
    assert type(eager._decode_program()) is lean._DecodeStep  # noqa: SLF001
    prompts = [torch.randint(0, 256, (length,)).tolist() for length in (3, 30, 11)]
    runs = []
    for decoder in (compiled, eager):
        batch = prefilled(decoder, prompts[0])
        for prompt in prompts[1:]:
            batch = _merge(batch, prefilled(decoder, prompt))
        assert batch.cache.layers[0]._k.shape[2] == 30  # noqa: SLF001 - no spare column
        runs.append(decode(decoder, batch, 8))
    for step, (mine, theirs) in enumerate(zip(*runs, strict=True)):
        assert torch.equal(mine, theirs), step


def test_the_decode_program_is_rebuilt_for_new_modules() -> None:
    """Built at the first step on the decoder's modules of that moment: smoothing (which replaces
    gate+up after its calibration steps) and a test's swap are seen."""
    decoder = lean.LeanDecoder(tiny_llama(), 256, decode_int4=True)
    assert decoder._step is None  # noqa: SLF001 - the calibration's program was dropped
    program = decoder._decode_program()  # noqa: SLF001
    assert decoder._decode_program() is program  # noqa: SLF001
    assert program.layers[0].gate_up.packed is decoder.layers[0].decode.gate_up.packed


def test_the_growing_layer_makes_room_for_the_decode_steps_column() -> None:
    layer = lean.GrowingLayer()
    first = torch.randn(2, 3, 5, 4)
    layer.update(first, first.clone())
    keys, values = layer.room(1)
    assert keys.shape[2] >= 6 and keys.data_ptr() == layer._k.data_ptr()  # noqa: SLF001
    keys[:, :, 5] = 1.0
    values[:, :, 5] = 2.0
    layer.filled(1)
    assert layer.get_seq_length() == 6 and torch.equal(layer.keys[:, :, :5], first)
    assert bool((layer.keys[:, :, 5] == 1).all()) and bool((layer.values[:, :, 5] == 2).all())
    spare = keys.shape[2] - 6
    grown, _ = layer.room(spare + 1)  # no room left for that many: a larger copy
    assert grown.shape[2] >= 6 + spare + 1 and torch.equal(grown[:, :, :5], first)
    assert layer.get_seq_length() == 6


@pytest.mark.parametrize("decode_int4", [True, False])
def test_chunks_prefilled_together_get_their_solo_numbers(decode_int4: bool) -> None:
    """Several prompts' chunks in one ``prefill_chunks`` call (the batcher's way of running the
    prompts admitted in one step) give each chunk bit for bit the logits and the keys and values
    that its own call gives: from position 0 or after an earlier chunk in its cache."""
    decoder = lean.LeanDecoder(tiny_llama(), 256, decode_int4=decode_int4)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (length,), generator=generator).tolist()
               for length in (5, 17, 1, 40, 9)]
    earlier = torch.randint(0, 256, (32,), generator=generator).tolist()  # the 4th's first chunk

    def cache_for(row: int) -> lean.GrowingCache:
        cache = decoder.make_cache()
        if row == 3:
            decoder.prefill_chunks([(earlier, 0, cache)])
        return cache

    begins = [32 if row == 3 else 0 for row in range(len(prompts))]
    with torch.inference_mode():
        solo = []
        for row, prompt in enumerate(prompts):
            cache = cache_for(row)
            positions = torch.arange(begins[row], begins[row] + len(prompt))[None]
            logits = decoder(input_ids=torch.tensor([prompt]), position_ids=positions, cache=cache,
                             logits_to_keep=1, row_starts=[0]).logits[0, -1]
            solo.append((logits, cache))
        caches = [cache_for(row) for row in range(len(prompts))]
        together = decoder.prefill_chunks(list(zip(prompts, begins, caches, strict=True)))
    assert together.shape == (len(prompts), 256)
    for row, (logits, cache) in enumerate(solo):
        assert torch.equal(together[row], logits), row
        for mine, theirs in zip(caches[row].layers, cache.layers, strict=True):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values), row


def test_the_decode_rmsnorm_is_rmsnorm() -> None:
    decoder = lean.LeanDecoder(tiny_llama(), 256, decode_int4=True)
    rows = torch.randn(5, 64)
    rows[1] *= 1e-3  # where eps matters
    weight = decoder.layers[0].norm_in
    expected = F.rms_norm(rows, (64,), weight, decoder.eps)
    assert torch.allclose(lean._rms(rows, decoder.layers[0].norm_in_scaled, decoder.norm_floor), expected,  # noqa: SLF001
                          rtol=1e-5, atol=1e-6)
    assert torch.equal(lean._rms(torch.zeros(1, 64), decoder.layers[0].norm_in_scaled, decoder.norm_floor),  # noqa: SLF001
                       torch.zeros(1, 64))


def test_without_fbgemm_the_decode_step_keeps_int4_and_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fbgemm(*_: object) -> None:
        raise RuntimeError("no FBGEMM in this build")

    monkeypatch.setattr(torch.ops.quantized, "linear_prepack", no_fbgemm)
    decoder = lean.LeanDecoder(tiny_llama(), 256, decode_int4=True)
    assert isinstance(decoder.layers[0].decode.gate_up, Int8Linear)
    assert type(decoder.lm_head) is Int8Linear
    prompts = [torch.randint(0, 256, (length,)).tolist() for length in (4, 11)]
    solo = [decode(decoder, prefilled(decoder, prompt), 3) for prompt in prompts]
    batched = decode(decoder, _merge(prefilled(decoder, prompts[0]), prefilled(decoder, prompts[1])), 3)
    for step in range(3):
        for row in range(2):
            assert torch.equal(batched[step][row], solo[row][step][0])


def test_packed_at_decode_names_the_projections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean, "PACKED_AT_DECODE", ())
    decoder = lean.LeanDecoder(tiny_llama(), 256, decode_int4=True)
    assert all(isinstance(getattr(decoder.layers[0].decode, name), Int4Linear)
               for name in ("qkv", "o", "gate_up", "down"))
    assert quantize.INT4_GROUP == 32


def test_smoothing_folds_into_the_weights_and_leaves_the_source_model_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    norms = [layer.post_attention_layernorm.weight.detach().clone() for layer in model.model.layers]
    inputs = [layer.input_layernorm.weight.detach().clone() for layer in model.model.layers]
    weights = [param.detach().clone() for param in model.parameters()]
    final = model.model.norm.weight.detach().clone()
    smoothed = lean.LeanDecoder(model, 256, decode_int4=True)
    assert all(torch.equal(layer.post_attention_layernorm.weight, norm)
               for layer, norm in zip(model.model.layers, norms, strict=True))
    assert torch.equal(model.model.norm.weight, final)
    assert all(torch.equal(layer.input_layernorm.weight, norm)
               for layer, norm in zip(model.model.layers, inputs, strict=True))
    assert all(torch.equal(param, weight) for param, weight in zip(model.parameters(), weights, strict=True))
    assert not torch.equal(smoothed.layers[0].norm_post, norms[0])  # the factors went into the norm
    assert torch.equal(smoothed.layers[0].norm_post_scaled, smoothed.layers[0].norm_post * 64 ** 0.5)
    assert smoothed.layers[0].decode.gate_up is smoothed.layers[0].prefill.gate_up
    monkeypatch.setattr(lean.LeanDecoder, "_smooth", lambda self, model: None)
    plain = lean.LeanDecoder(model, 256, decode_int4=True)
    prompt = torch.randint(0, 256, (1, 20))
    with torch.inference_mode():
        exact = model(prompt).logits[0]
        logits = [decoder(input_ids=prompt, position_ids=torch.arange(20)[None], cache=decoder.make_cache(),
                          row_starts=[0]).logits[0] for decoder in (smoothed, plain)]
    for got in logits:  # the same function, within int8's error
        assert (got - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("packed", [("o",), ("qkv",), ("qkv", "o")])
def test_attention_smoothing_keeps_the_function(monkeypatch: pytest.MonkeyPatch, packed: tuple) -> None:
    """q/k/v smoothed through the input norm, o through v's rows (with q/k/v on int8 or in 4 bits,
    whose copy then takes the divided rows): prompts and decode steps still compute the model."""
    monkeypatch.setattr(lean, "PACKED_AT_DECODE", packed)
    model = tiny_llama()
    decoder = lean.LeanDecoder(model, 256, decode_int4=True)
    assert isinstance(decoder.layers[0].decode.qkv, PackedInt8Linear if "qkv" in packed else Int4Linear)
    assert (decoder.layers[0].decode.o is decoder.layers[0].prefill.o) == ("o" in packed)
    prompt = torch.randint(0, 256, (20,)).tolist()
    with torch.inference_mode():
        exact = model(torch.tensor([prompt])).logits[0]
        got = decoder(input_ids=torch.tensor([prompt]), position_ids=torch.arange(20)[None],
                      cache=decoder.make_cache(), row_starts=[0]).logits[0]
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()
    batch = prefilled(decoder, prompt[:12])
    fed = prompt[:12] + [int(batch.last)]  # what the decode step takes in
    stepped = decode(decoder, batch, 1)[0][0]
    with torch.inference_mode():
        expected = model(torch.tensor([fed])).logits[0, -1]
    assert (stepped - expected).abs().max() < 0.05 * expected.abs().max()


def test_all_projections_on_int8_build_no_4_bit_copy_and_keep_rows_apart(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PACKED_AT_DECODE naming all four: the decode steps share the prompts' modules (no 4-bit
    copy is built) and rows decoded together still get their solo logits bit for bit."""
    monkeypatch.setattr(lean, "PACKED_AT_DECODE", ("qkv", "o", "gate_up", "down"))
    decoder = lean.LeanDecoder(tiny_llama(), 256, decode_int4=True)
    assert not any(isinstance(module, Int4Linear) for module in decoder.modules())
    assert all(getattr(decoder.layers[0].decode, name) is getattr(decoder.layers[0].prefill, name)
               for name in ("qkv", "o", "gate_up", "down"))
    prompts = [torch.randint(0, 256, (length,)).tolist() for length in (6, 19)]
    solo = [decode(decoder, prefilled(decoder, prompt), 4) for prompt in prompts]
    batched = decode(decoder, _merge(prefilled(decoder, prompts[0]), prefilled(decoder, prompts[1])), 4)
    for step in range(4):
        for row in range(2):
            assert torch.equal(batched[step][row], solo[row][step][0]), (step, row)


def test_down_smoothing_goes_through_ups_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lean, "PACKED_AT_DECODE", ("gate_up", "down"))
    model = tiny_llama()
    decoder = lean.LeanDecoder(model, 256, decode_int4=True)
    assert decoder.layers[1].decode.down is decoder.layers[1].prefill.down
    assert isinstance(decoder.layers[1].decode.down, PackedInt8Linear)
    prompt = torch.randint(0, 256, (1, 20))
    with torch.inference_mode():
        exact = model(prompt).logits[0]
        got = decoder(input_ids=prompt, position_ids=torch.arange(20)[None], cache=decoder.make_cache(),
                      row_starts=[0]).logits[0]
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()


async def test_a_steps_deltas_reach_the_loop_in_one_wake_up() -> None:
    import asyncio

    from engine.batching import Delta, SequenceHandle

    loop = asyncio.get_running_loop()
    handles = [SequenceHandle(loop) for _ in range(3)]
    calls = []
    original = loop.call_soon_threadsafe

    def counted(*args: object) -> object:
        calls.append(args)
        return original(*args)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    try:
        SequenceHandle.push_all([(handles[0], Delta("a", 1)), (handles[1], Delta("b", 1)),
                                 (handles[0], Delta("c", 2, "stop"))])
    finally:
        del loop.call_soon_threadsafe
    assert len(calls) == 1
    assert [d.text async for d in handles[0]] == ["a", "c"]
    assert (await handles[1].__anext__()).text == "b"

    closed = asyncio.new_event_loop()
    closed.close()
    orphan = SequenceHandle(closed)
    SequenceHandle.push_all([(orphan, Delta("x", 1))])
    assert orphan.cancelled.is_set()


def test_the_worker_thread_takes_torchs_thread_count_before_its_first_op(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.set_num_threads on one thread reaches another only at its first ATen parallel loop;
    OpenMP (oneDNN's torch._int_mm) reads the thread's own default before that. The batcher's
    thread settles it before its first step."""
    import ctypes
    import threading
    from types import SimpleNamespace

    from engine.batching import Batcher

    # torch's own OpenMP runtime (ctranslate2 and others may have loaded another)
    gomp = next((line.split()[-1] for line in open("/proc/self/maps")
                 if "libgomp" in line and "torch" in line), None)
    if gomp is None:
        pytest.skip("torch is not built with GNU OpenMP here")
    omp_max = ctypes.CDLL(gomp).omp_get_max_threads
    fresh = {}
    thread = threading.Thread(target=lambda: fresh.setdefault("threads", omp_max()))
    thread.start()
    thread.join()
    if fresh["threads"] == 1:
        pytest.skip("this machine's OpenMP default is one thread: nothing to settle")
    seen = []

    def first_step(self: Batcher, batch: object) -> None:
        seen.append(omp_max())
        self._stop.set()  # noqa: SLF001

    monkeypatch.setattr(Batcher, "_step", first_step)
    model = torch.nn.Linear(1, 1)
    model.config = SimpleNamespace()
    batcher = Batcher(model, None, max_batch=1, max_queue=1, eos_ids=set())
    batcher._thread.join(timeout=10)  # noqa: SLF001
    assert seen == [1]  # the one_thread fixture's count, as the registry sets the server's
