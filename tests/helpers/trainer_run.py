"""One ``mindformers.Trainer`` run of the tiny YAML (scaled down as ``helpers.mindformers.SMALL``), as
its own process, the way ``run_mindformer.py`` runs: the rows go to a MindRecord file that the YAML's
dataset reads, the YAML's optimizer, wrapper and callbacks train, checkpoints are saved every
``--save-every`` steps. Prints one JSON line: ``{"losses": [...], "start_step": n}``.

    python trainer_run.py OUT_DIR --rows repeated|varied [--resume ITERATION_DIR] [--loader NAME]
"""

import argparse
import json
import os
import sys

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
    args = parser.parse_args()

    from mindformers import Trainer
    from mindformers.core.context.build_context import build_context
    from helpers.mindformers import build, tiny_config
    from nsa_layers.data import write_mindrecord
    from nsa_layers.mindformers import NSAProgressBar

    cfg = tiny_config()
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
    build_context(cfg)
    bar = NSAProgressBar(file=sys.stderr)
    Trainer(args=cfg, task="text_generation", model=build(cfg), callbacks=[bar]).train()
    print(json.dumps({"losses": bar.losses, "start_step": bar.start_step}))


if __name__ == "__main__":
    main()
