"""Callbacks for MindFormers' ``Trainer`` (a YAML's ``callbacks:`` list, by ``type``).

- :class:`PackedDataCheck`: checks the first batch of the training dataset on the host before the
  first step compiles, so broken packing fails with the row and column named.
- :class:`NSAProgressBar`: a console progress bar with the loss and the tokens per second.
"""

import sys
import time

import numpy as np
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
from mindspore.train.callback import Callback

from ..data import check_packed_batch

__all__ = ["PackedDataCheck", "NSAProgressBar"]


def _first_batch(dataset):
    """The first batch of ``dataset`` as NumPy arrays, keyed by column (a separate iterator: the
    training's own is not touched)."""
    iterator = dataset.create_dict_iterator(num_epochs=1, output_numpy=True)
    try:
        return next(iterator)
    finally:
        iterator.stop()


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class PackedDataCheck(Callback):
    """Checks the training dataset's first batch with :func:`nsa_layers.data.check_packed_batch` when
    training begins (before the first step compiles): ``ValueError`` naming the row, the column, the
    value and the rule. The dataset must have the five packed columns (``nsa_layers.data.COLUMNS``).
    Every later batch is checked by the model itself, in the graph (``NSAQwen3ForCausalLM``:
    ``actual_seq_len`` only). The batch is read by an iterator of its own, before training starts."""

    def __init__(self):
        super().__init__()
        self.checked = None  # the first batch's column shapes, once checked

    def on_train_begin(self, run_context):
        batch = _first_batch(run_context.original_args().train_dataset)
        check_packed_batch(batch)
        self.checked = {key: tuple(value.shape) for key, value in batch.items()}


@MindFormerRegister.register(MindFormerModuleType.CALLBACK)
class NSAProgressBar(Callback):
    """A ``tqdm`` bar over the training steps, showing the mean loss of the last 10 steps and the
    tokens per second (``B * S`` per step; the first step, which compiles, is left out of the rate).

    Args:
        total_steps (int, optional): the bar's length; None: the dataset's size.
        file: where the bar goes (the console by default).

    After training, ``losses`` holds every step's loss (float), ``start_step`` the number of steps
    done before this run (a resumed run's checkpoint step) and ``tokens_per_second`` the rate.
    """

    def __init__(self, total_steps=None, file=None):
        super().__init__()
        self.total_steps = total_steps
        self.file = file if file is not None else sys.stdout
        self.losses = []
        self.start_step = None
        self.tokens_per_second = None
        self._bar = self._tokens = self._start = self._first_step = None

    def on_train_begin(self, run_context):
        from tqdm import tqdm

        params = run_context.original_args()
        rows, seq_length = params.train_dataset.output_shapes()[0][:2]
        self._tokens = rows * seq_length
        # a resumed run: MindFormers starts the dataset after the checkpoint's step (its step count restarts)
        self.start_step = int(params.train_dataset.get_init_step() or 0)
        total = self.total_steps or params.train_dataset.get_dataset_size()
        self._bar = tqdm(total=total, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True,
                         file=self.file)

    def on_train_step_end(self, run_context):
        params = run_context.original_args()
        outputs = params.net_outputs
        loss = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        self.losses.append(float(np.asarray(loss.asnumpy()).reshape(-1)[0]))
        now = time.perf_counter()
        if self._start is None:  # the first step includes the graph compilation
            self._start, self._first_step = now, int(params.cur_step_num)
            self._bar.set_postfix(loss=f"{self.losses[-1]:.3f}", note="compiled")
        else:
            steps = int(params.cur_step_num) - self._first_step
            self.tokens_per_second = steps * self._tokens / (now - self._start)
            self._bar.set_postfix(loss=f"{np.mean(self.losses[-10:]):.3f}", tok_s=f"{self.tokens_per_second:,.0f}")
        self._bar.update(1)

    def on_train_end(self, run_context):
        if self._bar is not None:
            self._bar.close()
