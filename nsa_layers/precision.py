"""The precision policy of the NSA layers, and the one CPU swap that lets bfloat16 run off Ascend.

Policy (every branch, the compressor, the selection, the gate, decoding, the hand-written backwards):

- *values*: activations, matmul operands and what is stored (queries, keys, values, compressed keys
  and values, branch outputs, gates, the decode cache) hold the compute dtype ``c`` (float32,
  float16 or bfloat16);
- *statistics*: attention scores, the softmax and its probabilities, the selection importances and
  every accumulation (a matmul's sum, a sum over a window, the gated sum, gradients summed over
  chunks) are float32; the score matmuls take their ``c`` operands in float32;
- a result that is a value is rounded to ``c`` once, where it is stored.

``softmax_dtype`` (``NSAConfig``; MindFormers' ``softmax_compute_dtype``) may ask for the scores and
the softmax in ``c`` instead: the scores are then a ``c`` matmul's result and the probabilities are
rounded to ``c``.

MindSpore 2.9's CPU backend has no bfloat16 kernel for most ops (matmuls, softmax, gathers, tiles,
comparisons; in graph mode not even for ``Reshape``, ``Transpose`` or slicing), so on CPU a bfloat16
layer holds its bfloat16 values in float32 tensors, and every place where Ascend would round a
result to bfloat16 rounds it there (a cast to bfloat16 and back). The arithmetic between those
places runs in float32 on the values as stored, as Ascend's kernels accumulate in float32. That is
the only swap; it is decided once per cell from the compute dtype and the device (:func:`on_cpu`),
and nothing is swapped on Ascend nor for float16 or float32 (which have CPU kernels).
"""

import mindspore as ms
from mindspore import nn, ops

__all__ = ["STATS_DTYPE", "FLOAT32", "Precision", "ComputeDense", "on_cpu", "precision_of"]

STATS_DTYPE = ms.float32

_CAST = ops.Cast()


def on_cpu():
    """Whether MindSpore's device target is the CPU (where the bfloat16 swap applies)."""
    return ms.get_context("device_target") == "CPU"


# The rounding functions a Precision picks from: plain functions of primitives, so that forwards and
# the hand-written bprops call them alike in graph mode (no branch on the dtype inside a graph).
def _identity(x):
    return x


def _to_float32(x):
    return _CAST(x, ms.float32)


def _to_float16(x):
    return _CAST(x, ms.float16)


def _to_bfloat16(x):
    return _CAST(x, ms.bfloat16)


def _round_to_bfloat16(x):
    return _CAST(_CAST(x, ms.bfloat16), ms.float32)


_TO = {ms.float32: _to_float32, ms.float16: _to_float16, ms.bfloat16: _to_bfloat16}


class Precision:
    """How one layer holds and rounds its values (see the module docstring), decided once.

    Args:
        compute_dtype: MindSpore dtype ``c`` of the values.
        softmax_dtype: MindSpore dtype of the scores and the softmax: float32, or ``c``.
        cpu (bool, optional): the device is the CPU; default :func:`on_cpu` now.

    Attributes:
        compute: ``c``. storage: the dtype of the tensors that hold ``c`` values (``c``, or float32
        for bfloat16 on CPU). emulated: whether bfloat16 is held in float32 (the CPU swap).
        softmax: the dtype of the scores and probabilities (``STATS_DTYPE`` or ``c``).
        softmax_storage: the dtype of the tensors holding them (and their additive masks).

    Functions (each an identity where it has nothing to do):
        hold(x): any float tensor -> ``c`` values in ``storage`` (a cast, rounding).
        held(x): the result of an op on ``c`` values that Ascend returns in ``c`` -> rounded to ``c``
            (only when emulated: on the real path the op already returned ``c``).
        stats(x): ``c`` values -> float32.
        score_operand(x): ``c`` values -> the dtype the score matmuls take (``stats``, or nothing
            with a ``c`` softmax). held_scores(x): their result -> scores in the softmax dtype.
        hold_probs(x): softmax probabilities -> ``c`` values for the value matmul.
    """

    def __init__(self, compute_dtype, softmax_dtype=STATS_DTYPE, cpu=None):
        cpu = on_cpu() if cpu is None else cpu
        self.compute = compute_dtype
        self.emulated = cpu and compute_dtype == ms.bfloat16
        self.storage = ms.float32 if self.emulated else compute_dtype
        self.softmax = softmax_dtype
        if compute_dtype == ms.float32:
            self.hold, self.held, self.stats = _to_float32, _identity, _identity
        elif self.emulated:
            self.hold, self.held, self.stats = _round_to_bfloat16, _round_to_bfloat16, _identity
        else:
            self.hold, self.held, self.stats = _TO[compute_dtype], _identity, _to_float32
        if softmax_dtype == STATS_DTYPE:
            self.score_operand, self.held_scores = self.stats, _identity
        else:  # scores from a matmul in c, rounded as it returns them
            self.score_operand, self.held_scores = _identity, self.held
        self.hold_probs = self.hold
        # the dtype of the tensors holding scores and probabilities (their bias and masked score)
        self.softmax_storage = ms.float32 if softmax_dtype == STATS_DTYPE else self.storage

    @property
    def swaps(self):
        """What this layer swaps on this device: ``()``, or a description of the bfloat16 swap."""
        if not self.emulated:
            return ()
        return ("bfloat16 values held in float32 tensors, rounded to bfloat16 where Ascend rounds",)


# float32 throughout (nothing to round, whatever the device): the default of the building blocks
FLOAT32 = Precision(ms.float32, cpu=False)


def precision_of(config, precision=None):
    """The :class:`Precision` of a layer of ``config`` (``NSAConfig``) on the current device, or
    ``precision`` when the enclosing layer has decided it (one decision per layer)."""
    return Precision(config.ms_compute_dtype, config.ms_softmax_dtype) if precision is None else precision


class ComputeDense(nn.Dense):
    """``nn.Dense`` computing in the compute dtype: the float32 weight and bias (the parameters, as
    MindFormers keeps them) and the input are rounded to ``c`` and the product, accumulated in
    float32 by the matmul, is rounded to ``c`` once.

    Args:
        in_channels, out_channels, has_bias: as ``nn.Dense``.
        precision (Precision): the layer's.

    Inputs:
        x (Tensor): ``(N, in_channels)``. Outputs: ``(N, out_channels)`` ``c`` values in ``precision.storage``.
    """

    def __init__(self, in_channels, out_channels, has_bias, precision):
        super().__init__(in_channels, out_channels, has_bias=has_bias)
        self.precision = precision

    def construct(self, x):
        p = self.precision
        out = p.held(self.matmul(p.hold(x), p.hold(self.weight)))
        if self.has_bias:
            out = p.held(self.bias_add(out, p.hold(self.bias)))
        return out
