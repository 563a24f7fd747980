"""Where the NSA ops run: the Ascend kernels or the pure-MindSpore fallbacks."""

import mindspore as ms
from mindspore.ops import constexpr


@constexpr
def _device_target():
    # constexpr: evaluated in Python, also while ``mindspore.jit`` compiles (get_context is not
    # allowed inside a compiled function).
    return ms.get_context("device_target")


def on_ascend():
    """True when MindSpore's device target is Ascend, so the ``mindspore.ops.nsa_*`` kernels can run."""
    return _device_target() == "Ascend"
