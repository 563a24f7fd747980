"""``NSAConfig``: the hyper-parameters of a Native Sparse Attention layer, validated once."""

import dataclasses

import mindspore as ms

__all__ = ["NSAConfig"]

_COMPUTE_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Sizes of an NSA layer. Defaults are the paper's (§4.1): l=32, d=16, l'=64, n=16 with 1 initial
    and 2 local blocks, w=512. Frozen and hashable: a layer's sizes are compile-time constants.

    Attributes:
        hidden_size: model width ``hidden`` of ``NSASelfAttention`` inputs and outputs.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hkv`` (GQA); ``H % Hkv == 0``.
        head_dim: query/key head dimension ``Dq``.
        v_head_dim: value head dimension ``Dv`` (the paper uses 192 / 128).
        compress_block_size: ``l``, tokens per compressed window.
        compress_stride: ``d``, tokens between compressed windows; divides ``l`` and ``l'``.
        select_block_size: ``l'``, tokens per selection block; ``l' >= l``.
        select_block_count: ``n``, blocks each query attends to (forced ones included).
        num_init_blocks: leading blocks of each segment always selected.
        num_local_blocks: blocks ending at the query's own block always selected (own, own-1, ...).
        window_size: ``w``, keys of the sliding window, ending at (and including) the query.
        independent_kv: the three branches take independent keys/values (the paper's choice, "to
            prevent shortcut learning"); False shares one K/V among them.
        use_position_embedding: learnable intra-block position embedding in the value compressor. Keys
            get none: with the linear per-head compression it would add one vector to every compressed
            key of a head, shifting each query's scores by a constant the softmax ignores (inert).
        query_chunk_size: queries processed together; no ``T x T`` tensor is built (the choice of
            512 is measured in ``docs/benchmarks.md``).
        select_dense_rows: a query chunk ending at row ``<= select_dense_rows`` computes the selected
            branch as one block-masked attention over all rows before its end (matmul-shaped, cheap
            while short); later chunks read each query's ``n`` blocks grouped by block
            (``BlockGroupedSelectedAttention``). ``None`` (given) becomes ``2 * select_block_count *
            select_block_size`` (2048 for the paper's sizes, see ``docs/design.md``); ``0`` never uses
            the block mask. Both give the same result.
        compute_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the dtype of the values
            (activations, matmul operands, what is stored); inputs are cast to it. Statistics (scores,
            softmax, importances, accumulations) are float32 (``nsa_layers.precision``).
        softmax_dtype: ``"float32"`` (the default) or ``compute_dtype``: the dtype of the scores and
            the softmax (MindFormers' ``softmax_compute_dtype``); float32 is the precise choice.
        softmax_scale: score scale; ``None`` means ``head_dim ** -0.5``.
    """

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    compress_block_size: int = 32
    compress_stride: int = 16
    select_block_size: int = 64
    select_block_count: int = 16
    num_init_blocks: int = 1
    num_local_blocks: int = 2
    window_size: int = 512
    independent_kv: bool = True
    use_position_embedding: bool = True
    query_chunk_size: int = 512
    select_dense_rows: int = None
    compute_dtype: str = "float32"
    softmax_scale: float = None
    softmax_dtype: str = "float32"

    def __post_init__(self):
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "v_head_dim", "compress_block_size",
                     "compress_stride", "select_block_size", "select_block_count", "window_size", "query_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NSAConfig: '{name}' must be a positive int, but got {value!r}.")
        for name in ("num_init_blocks", "num_local_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"NSAConfig: '{name}' must be a non-negative int, but got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"NSAConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads}) (GQA groups).")
        if self.compress_block_size % self.compress_stride:
            raise ValueError(f"NSAConfig: compress_block_size ({self.compress_block_size}) must be a multiple of "
                             f"compress_stride ({self.compress_stride}).")
        if self.select_block_size % self.compress_stride:
            raise ValueError(f"NSAConfig: select_block_size ({self.select_block_size}) must be a multiple of "
                             f"compress_stride ({self.compress_stride}).")
        if self.select_block_size < self.compress_block_size:
            raise ValueError(f"NSAConfig: select_block_size ({self.select_block_size}) must be >= "
                             f"compress_block_size ({self.compress_block_size}).")
        if self.num_init_blocks + self.num_local_blocks > self.select_block_count:
            raise ValueError(f"NSAConfig: num_init_blocks + num_local_blocks ({self.num_init_blocks} + "
                             f"{self.num_local_blocks}) must not exceed select_block_count "
                             f"({self.select_block_count}).")
        if self.select_dense_rows is not None and (isinstance(self.select_dense_rows, bool) or not isinstance(
                self.select_dense_rows, int) or self.select_dense_rows < 0):
            raise ValueError(f"NSAConfig: 'select_dense_rows' must be a non-negative int or None, but got "
                             f"{self.select_dense_rows!r}.")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"NSAConfig: compute_dtype must be one of {sorted(_COMPUTE_DTYPES)}, "
                             f"but got {self.compute_dtype!r}.")
        if self.softmax_dtype not in ("float32", self.compute_dtype):
            raise ValueError(f"NSAConfig: softmax_dtype must be 'float32' or the compute_dtype "
                             f"({self.compute_dtype!r}), but got {self.softmax_dtype!r}.")
        if self.softmax_scale is not None and not self.softmax_scale > 0:
            raise ValueError(f"NSAConfig: softmax_scale must be positive or None, but got {self.softmax_scale!r}.")
        if self.select_dense_rows is None:
            object.__setattr__(self, "select_dense_rows", 2 * self.select_block_count * self.select_block_size)

    @property
    def group_size(self):
        """Query heads per KV head ``G = H / Hkv``."""
        return self.num_heads // self.num_kv_heads

    @property
    def scale(self):
        """The score scale actually used."""
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim ** -0.5

    @property
    def ms_compute_dtype(self):
        """``compute_dtype`` as a MindSpore dtype."""
        return _COMPUTE_DTYPES[self.compute_dtype]

    @property
    def ms_softmax_dtype(self):
        """``softmax_dtype`` as a MindSpore dtype."""
        return _COMPUTE_DTYPES[self.softmax_dtype]
