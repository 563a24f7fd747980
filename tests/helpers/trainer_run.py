"""One ``mindformers.Trainer`` run of the tiny YAML (scaled down as ``helpers.mindformers.SMALL``), as
its own process, the way ``run_mindformer.py`` runs: the rows go to a MindRecord file that the YAML's
dataset reads, the YAML's optimizer, wrapper and callbacks train, checkpoints are saved every
``--save-every`` steps. Prints one JSON line: ``{"losses": [...], "start_step": n, "unused": [...],
"overflow": [...], "grad_norms": [...]}`` (the train wrapper's overflow flag and global gradient norm
of each step).

    python trainer_run.py OUT_DIR --rows repeated|varied [--resume ITERATION_DIR] [--loader NAME]
                          [--hf HF_DIR [--qkv-concat]] [--compute-dtype bfloat16]

``--hf`` starts from a Hugging Face checkpoint by MindFormers' legacy route (``load_checkpoint`` +
``load_ckpt_format: safetensors``, as the 32k YAML and MindFormers' finetune_qwen3.yaml do; sizes
from its config.json), trains at learning rate 0 and lists the checkpoint tensors whose rows are
not in the loaded model (``unused``).
"""

import argparse
import json
import os
import sys

import numpy as np
from mindspore.train import Callback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[0] = os.path.dirname(HERE)  # tests/, not tests/helpers (whose mindformers.py would shadow MindFormers)

# four distinct 64-token rows (documents per row), packed in this order
VARIED = [[30, 34], [20, 44], [64], [10, 54], [5, 59], [64], [32, 32], [40, 24]]


def rows_for(kind, steps):
    """``2 * steps`` rows: the same two rows every step (``repeated``), or steps 1..4 repeating one
    batch and the later steps each a new batch (``varied``)."""
    import numpy as np

    from helpers.mindformers import packed_rows

    rows = packed_rows(np.random.default_rng(11), 64, VARIED)
    count = rows["input_ids"].shape[0]
    if kind == "repeated":
        take = [0, 1] * steps
    else:
        take = [0, 1] * min(4, steps) + [i % count for i in range(2, 2 + 2 * max(0, steps - 4))]
    return {key: value[take] for key, value in rows.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--rows", choices=["repeated", "varied"], default="varied")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--resume", default=None, help="an iteration_* checkpoint directory")
    parser.add_argument("--loader", default="PackedMindRecordLoader")
    parser.add_argument("--hf", default=None, help="a Hugging Face Qwen3 directory, loaded by the legacy route")
    parser.add_argument("--qkv-concat", action="store_true")
    parser.add_argument("--compute-dtype", default=None, help="the model_config's compute_dtype (YAML's otherwise)")
    args = parser.parse_args()

    from mindformers import Trainer
    from mindformers.core.context.build_context import build_context

    from helpers.mindformers import build, tiny_config
    from nsa_layers.data import write_mindrecord
    from nsa_layers.mindformers import NSAProgressBar

    cfg = tiny_config() if args.compute_dtype is None else tiny_config(compute_dtype=args.compute_dtype)
    cfg.output_dir = args.out_dir
    data_dir = os.path.join(args.out_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    write_mindrecord(rows_for(args.rows, args.steps), os.path.join(data_dir, "train.mindrecord"))
    loader = cfg.train_dataset.data_loader
    loader.dataset_dir = data_dir
    if args.loader != loader.type:  # MindSpore's own MindDataset: no row offsets (and no such key)
        loader.type = args.loader
        loader.pop("create_compressed_eod_mask")
    cfg.checkpoint.save_path = os.path.join(args.out_dir, "checkpoint")
    cfg.checkpoint.save_interleaved_steps = args.save_every
    cfg.lr_schedule.learning_rate = 5e-3
    if args.resume:
        cfg.checkpoint.load_path = args.resume
        cfg.checkpoint.no_load_optim = False
    if args.hf:
        from nsa_layers.mindformers import use_checkpoint_config

        use_checkpoint_config(cfg, args.hf)
        cfg.model.model_config.qkv_concat = args.qkv_concat
        cfg.pop("checkpoint")  # the legacy route: no checkpoint section
        cfg.callbacks = [c for c in cfg.callbacks if c["type"] != "CheckpointMonitor"]
        cfg.load_checkpoint, cfg.load_ckpt_format = args.hf, "safetensors"
        cfg.lr_schedule.learning_rate = 0.0
    build_context(cfg)
    bar = NSAProgressBar(file=sys.stderr)
    steps = StepOutputs()
    net = build(cfg)
    Trainer(args=cfg, task="text_generation", model=net, callbacks=[bar, steps]).train()
    print(json.dumps({"losses": bar.losses, "start_step": bar.start_step, "unused": unused(net, args.hf),
                      "overflow": steps.overflow, "grad_norms": steps.grad_norms}))


class StepOutputs(Callback):
    """Each step's overflow flag and global gradient norm (the train wrapper's outputs ``(loss,
    overflow, scaling_sens, learning_rate, global_norm)``)."""

    def __init__(self):
        super().__init__()
        self.overflow, self.grad_norms = [], []

    def on_train_step_end(self, run_context):
        outputs = run_context.original_args().net_outputs
        self.overflow.append(bool(np.asarray(outputs[1].asnumpy()).reshape(-1)[0]))
        self.grad_norms.append(float(np.asarray(outputs[4].asnumpy()).reshape(-1)[0]))


def unused(net, hf_dir):
    """Checkpoint tensors of ``hf_dir`` with a row that no parameter of ``net`` holds (none without one)."""
    if not hf_dir:
        return []
    from helpers.hf_qwen3 import read_hf_tensors, unused_tensors

    return unused_tensors(net, read_hf_tensors(hf_dir))


if __name__ == "__main__":
    main()
