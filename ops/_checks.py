"""Argument checks shared by the NSA ops. Each raises the documented exception type with a message
that names the function, the argument, the value and the rule.

The checks of shapes and dtypes take *static metadata* (``tensor.shape``, ``tensor.dtype``), so the
ops can run them inside a ``constexpr``: plain Python, also while ``mindspore.jit`` compiles."""

import numbers

import mindspore as ms
import numpy as np
from mindspore import Tensor

HALF_DTYPES = (ms.float16, ms.bfloat16)


def tensor(op, name, value):
    """``TypeError`` unless ``value`` is a ``mindspore.Tensor``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: '{name}' must be a Tensor, but got {type(value).__name__}.")


def optional_tensor(op, name, value):
    """``TypeError`` unless ``value`` is ``None`` or a ``mindspore.Tensor``."""
    if value is not None:
        tensor(op, name, value)


def integer(op, name, value):
    """``TypeError`` unless ``value`` is an int (NumPy integers accepted, ``bool`` rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{op}: '{name}' must be int, but got {type(value).__name__} ({value!r}).")


def real(op, name, value):
    """``TypeError`` unless ``value`` is a float or an int (``bool`` rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{op}: '{name}' must be float, but got {type(value).__name__} ({value!r}).")


def half_dtype(op, name, dtype, error=TypeError):
    """``error`` unless ``dtype`` is float16 or bfloat16."""
    if dtype not in HALF_DTYPES:
        raise error(f"{op}: the dtype of '{name}' must be float16 or bfloat16, but got {dtype}.")


def same_dtype(op, names, dtypes, error=TypeError):
    """``error`` unless all ``dtypes`` are equal."""
    if any(d != dtypes[0] for d in dtypes):
        listing = ", ".join(f"'{n}' {d}" for n, d in zip(names, dtypes))
        raise error(f"{op}: {', '.join(repr(n) for n in names)} must have the same dtype, but got {listing}.")


def rank(op, name, shape, expected, error):
    """``error`` unless ``shape`` has ``expected`` dimensions."""
    if len(shape) != expected:
        raise error(f"{op}: the rank of '{name}' must be {expected}, but got {len(shape)} (shape {tuple(shape)}).")


def not_empty(op, name, shape, error):
    """``error`` if ``shape`` has no elements."""
    if 0 in tuple(shape):
        raise error(f"{op}: '{name}' must not be an empty tensor, but got shape {tuple(shape)}.")


def multiple_of_16(op, name, value, error):
    """``error`` unless ``value % 16 == 0``."""
    if value % 16 != 0:
        raise error(f"{op}: '{name}' must be a multiple of 16, but got {value}.")


def in_range(op, name, value, low, high, error, high_name=None):
    """``error`` unless ``low <= value <= high``."""
    if not low <= value <= high:
        upper = f"{high_name}={high}" if high_name else str(high)
        raise error(f"{op}: '{name}' must be in [{low}, {upper}], but got {value}.")
