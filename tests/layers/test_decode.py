"""Decoding with the NSA cache (``nsa_layers.decoder``, ``nsa_layers.decode``): prefill and steps equal the
training forward of each whole sequence, branch by branch (outputs to float32 rounding, selected blocks
exactly), on random parameters and inputs, through every boundary of the compressor, the blocks and the
window; sequences in different slots do not interact; bad calls raise and leave the cache as it was."""

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from helpers import nsa_reference
from helpers.common import UNIT_ROUNDOFF
from helpers.nsa_cases import Case, small_config
from nsa_layers import NSADecoder, NSAKVCache, NSASelfAttention, NSASelfAttentionDecoder, RotaryEmbedding

FIELDS = ("out", "o_cmp", "o_slc", "o_win")


class Decoding:
    """Drives an :class:`NSADecoder` over the sequences of a :class:`Case` (its packed segments) and
    collects each sequence's rows as prefill and steps return them."""

    def __init__(self, case, batch_slots, max_len, max_step_tokens):
        self.case = case
        self.decoder = NSADecoder(case.net, batch_slots, max_len, max_step_tokens)
        self.starts = [0] + list(case.prefix[:-1])
        self.slot_seq = {}  # slot -> sequence it holds
        self.next_row = {}  # sequence -> tokens fed so far
        self.rows = {}  # sequence -> {field: [arrays]}

    def _inputs(self, pieces):
        """Inputs of the ``(sequence, first, last)`` row pieces packed in order."""
        case = self.case
        rows = np.concatenate([np.arange(self.starts[s] + a, self.starts[s] + b) for s, a, b in pieces]).astype(int)
        kv = {name: (k[rows], v[rows]) for name, (k, v) in case.kv.items()}
        return case.tensors(q=case.q[rows], kv=kv, gates=case.gates[rows])

    def _collect(self, details, pieces):
        arrays = {name: details[name].astype(ms.float32).asnumpy() for name in FIELDS}
        arrays.update({name: details[name].asnumpy() for name in ("blocks", "valid")})
        row = 0
        for s, a, b in pieces:
            for name, array in arrays.items():
                self.rows.setdefault(s, {}).setdefault(name, []).append(array[row:row + b - a])
            row += b - a

    def prefill(self, assignments):
        """``[(sequence, slot, length), ...]``: the first ``length`` tokens of each sequence into its slot."""
        pieces = [(s, 0, length) for s, _, length in assignments]
        ends = np.cumsum([length for _, _, length in assignments]).tolist()
        details = self.decoder.prefill(*self._inputs(pieces), ends, [slot for _, slot, _ in assignments])
        for s, slot, length in assignments:
            self.slot_seq[slot] = s
            self.next_row[s] = length
            self.rows[s] = {}
        self._collect(details, pieces)
        return details

    def step(self, counts):
        """``counts[b]`` more tokens of the sequence in slot ``b``."""
        pieces = []
        for slot, count in enumerate(counts):
            if count:
                s = self.slot_seq[slot]
                pieces.append((s, self.next_row[s], self.next_row[s] + count))
                self.next_row[s] += count
        details = self.decoder.step(*self._inputs(pieces), list(counts))
        self._collect(details, pieces)
        return details

    def remaining(self, slot):
        s = self.slot_seq[slot]
        return self.case.lengths[s] - self.next_row[s]

    def check(self, sequence, near_ties=False):
        """The sequence's decoded rows against ``forward_with_details`` on the whole sequence alone:
        every output to float32 rounding (in float16 / bfloat16: to two roundings of the compute dtype,
        since a float32 difference in the last bit can round a stored value either way), blocks and
        valid exactly. With ``near_ties``, a (row, KV
        head) whose blocks differ is accepted when the blocks swapped have the same float64 importance
        (a near-tie that float32 rounding decides either way); such rows are rare and their outputs
        are not compared (they attend to another block)."""
        length = self.next_row[sequence]
        q, k, v, gates = self._inputs([(sequence, 0, length)])
        full = self.case.net.forward_with_details(q, k, v, gates, None)
        got = {name: np.concatenate(parts) for name, parts in self.rows[sequence].items()}
        valid = full["valid"].asnumpy()
        np.testing.assert_array_equal(got["valid"], valid)
        blocks, expected_blocks = np.where(valid, got["blocks"], -1), np.where(valid, full["blocks"].asnumpy(), -1)
        flipped = np.argwhere(np.any(np.sort(blocks, axis=2) != np.sort(expected_blocks, axis=2), axis=2))
        if near_ties and flipped.size:
            self._check_near_ties(sequence, length, flipped, blocks, expected_blocks)
        compared = np.setdiff1d(np.arange(length), flipped[:, 0]) if near_ties else np.arange(length)
        np.testing.assert_array_equal(blocks[compared], expected_blocks[compared])  # best first
        dtype = self.case.cfg.compute_dtype
        rel = 2e-5 if dtype == "float32" else 2 * UNIT_ROUNDOFF[dtype]
        for name in FIELDS:
            expected = full[name].astype(ms.float32).asnumpy()
            scale = max(1.0, float(np.abs(expected).max()))
            np.testing.assert_allclose(got[name][compared], expected[compared], rtol=0, atol=rel * scale,
                                       err_msg=name)
        return got, full

    def _check_near_ties(self, sequence, length, flipped, blocks, expected_blocks):
        case = self.case
        assert len(flipped) <= max(1, length * case.cfg.num_kv_heads // 500), flipped
        rows = slice(self.starts[sequence], self.starts[sequence] + length)
        kv = {name: (k[rows], v[rows]) for name, (k, v) in case.kv.items()}
        importance = nsa_reference.nsa_forward(case.q[rows], kv, case.gates[rows], (length,), vars(case.cfg),
                                               case.weights, case.cfg.scale)[3]
        for t, h in flipped:
            got, want = set(blocks[t, h].tolist()) - {-1}, set(expected_blocks[t, h].tolist()) - {-1}
            scores = importance[(int(t), int(h))]
            np.testing.assert_allclose(sorted(scores[list(got - want)]), sorted(scores[list(want - got)]),
                                       rtol=1e-5, err_msg=f"row {t}, KV head {h}: {sorted(got)} vs {sorted(want)}")


def cache_state(decoder):
    """Every cache buffer as NumPy by its name in the cache (``k_selected``, ...), to compare before
    and after a call or between two decoders."""
    return {p.name.split(".", 1)[1]: p.asnumpy().copy() for p in decoder.cache.get_parameters()}


# the small sizes' boundaries: l = 8, l + d = 12, l' = 16, w = 6, n * l' = 48
SMALL_PREFILLS = (1, 7, 8, 9, 12, 15, 16, 17, 47, 48, 49, 6)
# steps of 1, 2, d, l, l' + 1 and w + 1 tokens
SMALL_STEPS = (1, 2, 4, 8, 17, 7)


def run_boundary_sweep(cfg, shared_kv, prefills, steps, length, seed, near_ties=False):
    """Every prefill length in its own slot, then ragged steps (slot ``b`` takes
    ``steps[(i + b) % len(steps)]`` tokens at step ``i``, idle once its sequence is done)."""
    case = Case(cfg, [length] * len(prefills), seed=seed, shared_kv=shared_kv)
    decoding = Decoding(case, batch_slots=len(prefills), max_len=length, max_step_tokens=max(steps))
    decoding.prefill([(s, s, p) for s, p in enumerate(prefills)])
    i = 0
    while any(decoding.remaining(b) for b in range(len(prefills))):
        decoding.step([min(steps[(i + b) % len(steps)], decoding.remaining(b)) for b in range(len(prefills))])
        i += 1
    return [decoding.check(s, near_ties) for s in range(len(prefills))]


def test_decode_matches_forward_through_the_main_boundaries():
    """A representative case of the sweep below: independent K/V, prefills short of the first window,
    at l' + 1 and at n * l', the same ragged steps."""
    got, _ = run_boundary_sweep(small_config(), False, (7, 17, 48), SMALL_STEPS, length=56, seed=1)[0]
    assert np.all(got["o_cmp"][:7] == 0)  # before the first window ends: exactly 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype_name", ("float16", "bfloat16"))
def test_reduced_precision_decode_matches_its_forward(dtype_name):
    """In float16 and bfloat16 the cache holds compute-dtype values and a decode equals the forward of
    the same dtype as the float32 decode equals the float32 forward (to its rounding)."""
    cfg = small_config(compute_dtype=dtype_name)
    results = run_boundary_sweep(cfg, False, (7, 17, 48), SMALL_STEPS, length=56, seed=1, near_ties=True)
    got, _ = results[0]
    assert np.all(got["o_cmp"][:7] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("shared_kv", (True, False), ids=("shared_kv", "independent_kv"))
def test_decode_matches_forward_through_every_boundary(shared_kv):
    cfg = small_config()
    results = run_boundary_sweep(cfg, shared_kv, SMALL_PREFILLS, SMALL_STEPS, length=60, seed=1)
    got, _ = results[0]
    # positions before the first window ends see no compressed window: exactly 0
    assert np.all(got["o_cmp"][:cfg.compress_block_size - 1] == 0)
    assert np.any(got["o_cmp"][cfg.compress_block_size - 1:] != 0)


@pytest.mark.slow
@pytest.mark.parametrize("group", (1, 4))
@pytest.mark.parametrize("shared_kv", (True, False), ids=("shared_kv", "independent_kv"))
def test_decode_matches_forward_gqa_groups(group, shared_kv):
    cfg = small_config(num_heads=2 * group, num_kv_heads=2, use_position_embedding=not shared_kv)
    run_boundary_sweep(cfg, shared_kv, SMALL_PREFILLS[::2], SMALL_STEPS, length=52, seed=2 + group)


@pytest.mark.slow
@pytest.mark.parametrize("shared_kv", (True, False), ids=("shared_kv", "independent_kv"))
def test_decode_matches_forward_at_paper_sizes(shared_kv):
    """l=32, d=16, l'=64, n=16, w=512 on 1.5k tokens: top-16 of up to 24 blocks prunes, the window
    slides (importance near-ties, which float32 decides either way, are checked in float64)."""
    cfg = small_config(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=8, compress_block_size=32,
                       compress_stride=16, select_block_size=64, select_block_count=16, num_init_blocks=1,
                       num_local_blocks=2, window_size=512, query_chunk_size=512)
    prefills = (31, 32, 48, 63, 64, 511, 512, 1023, 1024, 1025)
    steps = (1, 2, 16, 32, 65, 513)
    results = run_boundary_sweep(cfg, shared_kv, prefills, steps, length=1536, seed=7, near_ties=True)
    valid = results[0][1]["valid"].asnumpy()
    assert valid.sum(axis=2).max() == 16 and valid.sum(axis=2).min() < 16


@pytest.mark.slow
def test_packed_prefill_ragged_steps_refill_and_isolation():
    """Three slots, four sequences: packed prefill, ragged steps with idle slots, a sequence that
    finishes and its slot refilled; changing one sequence changes no other's outputs or cache rows."""
    cfg = small_config()
    lengths = [30, 21, 40, 25]

    def schedule(seed, check):
        case = Case(cfg, lengths, seed=seed, shared_kv=False)
        if seed == 4:  # the same parameters and sequences 1-3 as seed 3; sequence 0 different
            base = Case(cfg, lengths, seed=3, shared_kv=False)
            first = slice(0, lengths[0])
            case.net = base.net
            for name in case.kv:
                k, v = base.kv[name][0].copy(), base.kv[name][1].copy()
                k[first], v[first] = case.kv[name][0][first], case.kv[name][1][first]
                case.kv[name] = (k, v)
            q, gates = base.q.copy(), base.gates.copy()
            q[first], gates[first] = case.q[first], case.gates[first]
            case.q, case.gates = q, gates
        decoding = Decoding(case, batch_slots=3, max_len=48, max_step_tokens=9)
        decoding.prefill([(0, 2, 9), (1, 0, 17), (2, 1, 3)])
        for counts in ([1, 2, 1], [0, 9, 3], [3, 0, 5], [0, 8, 9], [0, 0, 3], [0, 1, 0]):
            decoding.step(counts)
        assert decoding.remaining(0) == 0 and decoding.remaining(2) == 0  # slot 0 gets sequence 3
        decoding.prefill([(3, 0, 12)])
        for counts in ([3, 0, 0], [9, 5, 0], [1, 9, 0], [0, 3, 0]):
            decoding.step(counts)
        assert all(decoding.remaining(b) == 0 for b in range(3))
        for s in range(4 if check else 0):
            decoding.check(s)
        return decoding

    reference, changed = schedule(3, check=True), schedule(4, check=False)
    for s in (1, 2, 3):
        for name in FIELDS + ("blocks",):
            np.testing.assert_array_equal(np.concatenate(changed.rows[s][name]),
                                          np.concatenate(reference.rows[s][name]))
    assert not np.array_equal(np.concatenate(changed.rows[0]["out"]), np.concatenate(reference.rows[0]["out"]))
    # slot 2 holds sequence 0; slots 0 and 1 (sequences 3 and 2) hold the same rows in both runs
    before, after = cache_state(reference.decoder), cache_state(changed.decoder)
    cache = reference.decoder.cache
    for name, array in before.items():
        if name.endswith("lengths"):
            np.testing.assert_array_equal(after[name], array)
            continue
        rows_per_slot = (array.shape[0] // cache.kv_heads - name.endswith("compressed")) // cache.batch_slots
        other = slice(0, 2 * rows_per_slot * cache.kv_heads)
        np.testing.assert_array_equal(after[name][other], array[other], err_msg=name)


def test_slot_filled_to_max_len_then_refused():
    cfg = small_config()
    case = Case(cfg, [20], seed=5, shared_kv=True)
    decoding = Decoding(case, batch_slots=1, max_len=20, max_step_tokens=4)
    decoding.prefill([(0, 0, 13)])
    for count in (4, 1, 2):
        decoding.step([count])
    decoding.check(0)
    assert decoding.decoder.lengths().tolist() == [20]
    before = cache_state(decoding.decoder)
    q, k, v, gates = decoding._inputs([(0, 0, 1)])  # pylint: disable=protected-access
    with pytest.raises(ValueError, match="slot 0 holds 20 tokens and would exceed max_len=20"):
        decoding.decoder.step(q, k, v, gates, [1])
    for name, array in cache_state(decoding.decoder).items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


def _bad_calls():
    """(description, call(decoder, inputs), exception, message) of rejected calls."""
    def inputs(decoder, rows):
        return decoder.test_inputs(rows)
    return [
        ("counts sum", lambda d: d.step(*inputs(d, 3), [1, 1]), ValueError, "must sum to the new tokens Q=3"),
        ("negative count", lambda d: d.step(*inputs(d, 1), [2, -1]), ValueError,
         r"must be in \[0, max_step_tokens=4\]"),
        ("count over max_step", lambda d: d.step(*inputs(d, 5), [5, 0]), ValueError, "max_step_tokens=4"),
        ("counts shape", lambda d: d.step(*inputs(d, 2), [1, 1, 0]), ValueError, "one count per slot"),
        ("float counts", lambda d: d.step(*inputs(d, 2), np.array([1.0, 1.0])), TypeError,
         "'counts' must hold integers"),
        ("q shape", lambda d: d.step(Tensor(np.ones((2, 3, 16), np.float32)), *inputs(d, 2)[1:], [1, 1]),
         ValueError, "'q' must have shape"),
        ("slot range", lambda d: d.prefill(*inputs(d, 4), [4], [2]), ValueError, r"slot 2 is out of range \[0, 2\)"),
        ("slot twice", lambda d: d.prefill(*inputs(d, 4), [2, 4], [1, 1]), ValueError, "'slots' must be distinct"),
        ("ends count", lambda d: d.prefill(*inputs(d, 4), [2, 4], [1]), ValueError, "one end per slot"),
        ("ends total", lambda d: d.prefill(*inputs(d, 4), [3], [1]), ValueError, "end at T=4"),
        ("prompt too long", lambda d: d.prefill(*inputs(d, 21), [21], [0]), ValueError, "more than max_len=20"),
        ("no tokens", lambda d: d.prefill(*inputs(d, 0), [0], [0]), ValueError, "T=0"),
    ]


@pytest.fixture(scope="module")
def prefilled():
    """A decoder (2 slots of 20 tokens, steps of up to 4) holding 10 tokens in slot 0."""
    case = Case(small_config(), [21], seed=6, shared_kv=True)
    decoding = Decoding(case, batch_slots=2, max_len=20, max_step_tokens=4)
    decoding.prefill([(0, 0, 10)])
    decoder = decoding.decoder
    decoder.test_inputs = lambda rows: decoding._inputs([(0, 0, rows)])  # pylint: disable=protected-access
    return decoder


@pytest.mark.parametrize("description, call, error, message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_calls_raise_and_leave_the_cache_unchanged(prefilled, description, call, error, message):
    del description
    before = cache_state(prefilled)
    with pytest.raises(error, match=message):
        call(prefilled)
    for name, array in cache_state(prefilled).items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


def test_graph_mode_equals_forward_and_compiles_the_step_once():
    """Under graph mode: the same exactness, and one compiled step for every step of one ``Q``
    (lengths grow, a slot goes idle while the other takes two tokens)."""
    cfg = small_config()
    case = Case(cfg, [40, 33], seed=8, shared_kv=False)
    decoding = Decoding(case, batch_slots=2, max_len=40, max_step_tokens=2)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        decoding.prefill([(0, 0, 11), (1, 1, 15)])
        for i in range(17):
            decoding.step([1, 1] if i % 4 else [2, 0])
        compiled = len(decoding.decoder.step_cell.compile_cache)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert compiled == 1
    decoding.check(0)
    decoding.check(1)


@pytest.mark.slow
@pytest.mark.parametrize("shared_kv", (True, False), ids=("shared_kv", "independent_kv"))
def test_self_attention_decoder_matches_the_layer(shared_kv):
    """Hidden states in and out, every parameter random (projections, gate and its bias, compressors,
    value position embedding), rotary at each token's position: prefill and steps of two sequences
    equal the layer on each whole sequence."""
    cfg = small_config(hidden_size=24, independent_kv=not shared_kv)
    rng = np.random.default_rng(9)
    layer = NSASelfAttention(cfg, rotary=RotaryEmbedding(cfg.head_dim))
    for param in layer.trainable_params():
        param.set_data(Tensor((0.4 * rng.standard_normal(param.shape)).astype(np.float32)))
    lengths = (37, 26)
    hidden = [rng.standard_normal((n, cfg.hidden_size)).astype(np.float32) for n in lengths]
    names = [param.name for param in layer.get_parameters()]
    decoder = NSASelfAttentionDecoder(layer, batch_slots=2, max_len=40, max_step_tokens=5)
    assert [param.name for param in layer.get_parameters()] == names  # the decoder renames nothing
    done = [13, 9]
    outs = [[x] for x in np.split(decoder.prefill(Tensor(np.concatenate([h[:n] for h, n in zip(hidden, done)])),
                                                  np.cumsum(done).tolist(), [1, 0]).asnumpy(), [done[0]])]
    for counts in ([1, 1], [5, 2], [0, 4], [3, 5], [5, 0], [2, 5], [1, 5], [0, 2]):
        pieces = [hidden[s][done[s]:done[s] + counts[1 - s]] for s in (1, 0) if counts[1 - s]]
        out = decoder.step(Tensor(np.concatenate(pieces)), counts).asnumpy()
        row = 0
        for s in (1, 0):  # slot 0 holds sequence 1
            count = counts[1 - s]
            outs[s].append(out[row:row + count])
            row += count
            done[s] += count
    assert done == list(lengths)
    for s in (0, 1):
        expected = layer(Tensor(hidden[s])).asnumpy()
        np.testing.assert_allclose(np.concatenate(outs[s]), expected, rtol=0,
                                   atol=2e-5 * max(1.0, float(np.abs(expected).max())))


@pytest.mark.parametrize("sizes, message", [((0, 8, 1), "'batch_slots' must be a positive int, but got 0"),
                                             ((2, 8.0, 1), "'max_len' must be a positive int, but got 8.0"),
                                             ((2, 8, True), "'max_step_tokens' must be a positive int, but got True")])
def test_cache_sizes_are_checked(sizes, message):
    with pytest.raises(ValueError, match=message):
        NSAKVCache(small_config(), *sizes)
