"""Fine-tune a tiny Qwen3-shaped model with Native Sparse Attention on packed real documents, on CPU.

What it does (``make demo`` runs it with the defaults, in a few minutes on 2 cores):

1. builds the model from ``configs/nsa_qwen3_tiny_cpu.yaml`` through the MindFormers registry
   (``model_type: nsa_qwen3``, ``architectures: [NSAQwen3ForCausalLM]``); with ``--pretrained DIR``
   its sizes come from a Hugging Face Qwen3 checkpoint's ``config.json`` and its Qwen3 weights from
   the checkpoint, through MindFormers' loader;
2. byte-tokenises the Python documentation topics shipped with the standard library
   (``pydoc_data``), cuts them into paragraph-sized documents, packs them into rows with their
   ends as ``actual_seq_len`` (positions restart at every document) and writes the training rows
   as a MindRecord file, which MindFormers' dataset (the YAML's ``train_dataset``) reads;
3. fine-tunes through ``mindformers.Trainer`` as the YAML says (optimizer, learning rate, train
   wrapper, callbacks, checkpoints), with a progress bar (loss, tokens per second), and reports the
   held-out loss before and after;
4. loads the Trainer's last checkpoint into a freshly built model and checks the held-out loss is
   the same;
5. continues a held-out prompt greedily, before and after training, with the NSA KV cache;
6. draws, for one packed row, which key blocks the first layer's selection branch picked for every
   query block, with the document boundaries, and prints where the PNG is.

Run ``python examples/finetune_nsa.py --help`` for the flags (longer runs, other sizes).
"""

import argparse
import os
import random
import sys

import numpy as np

if "--verbose" not in sys.argv:
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ log: errors only (set before importing it)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "nsa_qwen3_tiny_cpu.yaml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="MindFormers YAML of the model")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per step; None: the YAML's runner_config.batch_size")
    parser.add_argument("--seq-length", type=int, default=None, help="tokens per row; None: the YAML's seq_length")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate; None: the YAML's lr_schedule.learning_rate")
    parser.add_argument("--max-doc-bytes", type=int, default=400,
                        help="documents are the topics' paragraphs, merged up to this many bytes")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model_config key of the YAML, e.g. --set num_hidden_layers=4 "
                             "--set nsa_window_size=128, or --set compute_dtype=bfloat16 for the production "
                             "YAMLs' dtype (repeatable)")
    parser.add_argument("--out-dir", default=os.path.join("output", "finetune_nsa"),
                        help="where the training rows, the Trainer's logs and checkpoints, and the PNG go")
    parser.add_argument("--pretrained", default=None, metavar="DIR",
                        help="start from a Hugging Face Qwen3 directory (config.json + *.safetensors): sizes "
                             "from its config.json, weights through MindFormers' loader, text through its "
                             "tokenizer when it has one (bytes otherwise)")
    parser.add_argument("--new-tokens", type=int, default=60, help="greedy continuation length of the held-out prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="keep MindSpore's and MindFormers' logs on the console")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------- data
class ByteText:
    """Byte-level tokens (the tiny YAML's vocabulary: bytes 0..255, 256 padding)."""

    unit = "bytes"

    @staticmethod
    def encode(text):
        from nsa_layers.data import byte_tokens

        return byte_tokens(text)

    @staticmethod
    def decode(tokens):
        """A printable one-line string (padding and invalid UTF-8 shown escaped)."""
        return repr(bytes(int(t) for t in tokens if t < 256).decode("utf-8", errors="replace"))


class TokenizerText:
    """The tokenizer of a Hugging Face checkpoint directory (``transformers``, installed with MindFormers)."""

    unit = "tokens"

    def __init__(self, directory):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory)

    def encode(self, text):
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)

    def decode(self, tokens):
        return repr(self.tokenizer.decode([int(t) for t in tokens]))


def text_codec(pretrained):
    """The checkpoint's tokenizer when ``pretrained`` has one, bytes otherwise."""
    if pretrained and any(os.path.isfile(os.path.join(pretrained, name))
                          for name in ("tokenizer.json", "tokenizer_config.json")):
        return TokenizerText(pretrained)
    return ByteText()


def documents(max_doc_bytes, seed, text):
    """The Python documentation topics from the standard library, as token documents (``text.encode``).

    Each topic is cut at blank lines into paragraphs, merged in order up to ``max_doc_bytes``; so
    rows hold several documents of varied lengths. Shuffled with ``seed``.
    """
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        current = ""
        for paragraph in topics[name].split("\n\n"):
            if current and len(current) + len(paragraph) > max_doc_bytes:
                docs.append(current)
                current = ""
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if current.strip():
            docs.append(current)
    random.Random(seed).shuffle(docs)
    return [text.encode(doc) for doc in docs]


def packed_splits(docs, seq_length, max_segments, pad_id):
    """Pack the documents into rows; the last 5% of the documents (at least one row) are held out."""
    from nsa_layers.data import pack_documents

    held_out = max(1, len(docs) // 20)
    return (pack_documents(docs[:-held_out], seq_length, max_segments, pad_id),
            pack_documents(docs[-held_out:], seq_length, max_segments, pad_id))


def batch(rows, index, batch_size):
    """Rows ``index*B .. index*B + B - 1`` (cycling) as model inputs (MindSpore tensors)."""
    import mindspore as ms

    from nsa_layers.data import batch_rows

    count = rows["input_ids"].shape[0]
    take = [(index * batch_size + i) % count for i in range(batch_size)]
    return {key: ms.Tensor(value) for key, value in batch_rows(rows, take).items()}


def write_training_rows(rows, steps, batch_size, data_dir):
    """The training rows MindFormers will read: ``steps * batch_size`` of them (cycling), one
    MindRecord file in ``data_dir``."""
    from nsa_layers.data import write_mindrecord

    count = rows["input_ids"].shape[0]
    take = [i % count for i in range(steps * batch_size)]
    os.makedirs(data_dir, exist_ok=True)
    return write_mindrecord({key: value[take] for key, value in rows.items()},
                            os.path.join(data_dir, "train.mindrecord"))


# ---------------------------------------------------------------------------------------- model
def load_config(args):
    from mindformers.tools.register import MindFormerConfig

    cfg = MindFormerConfig(args.config)
    if args.pretrained:  # the checkpoint's sizes and special tokens: MindFormers reads its config.json
        from nsa_layers.mindformers import use_checkpoint_config

        use_checkpoint_config(cfg, args.pretrained)
    model_cfg = cfg.model.model_config
    if args.seq_length:
        model_cfg.seq_length = args.seq_length
        model_cfg.max_position_embeddings = max(args.seq_length, model_cfg.get("max_position_embeddings") or 0)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        import yaml

        model_cfg[key] = yaml.safe_load(value)
    if args.batch_size:
        cfg.runner_config.batch_size = args.batch_size
    if args.lr:
        cfg.lr_schedule.learning_rate = args.lr
    if args.new_tokens >= int(model_cfg.seq_length):
        raise SystemExit(f"--new-tokens must be below the row length {model_cfg.seq_length} (the prompt and its "
                         f"continuation fit in one row), got {args.new_tokens}")
    # what the run writes goes under --out-dir: the training rows, the Trainer's logs and checkpoints
    cfg.output_dir = args.out_dir
    cfg.train_dataset.data_loader.dataset_dir = os.path.join(args.out_dir, "data")
    cfg.checkpoint.save_path = os.path.join(args.out_dir, "checkpoint")
    return cfg


def build(cfg, verbose=False):
    """The model from the YAML, through MindFormers' registry (``nsa_layers.mindformers`` registers it).
    MindFormers prints its whole config conversion table; unless ``verbose``, that print is dropped."""
    import contextlib
    import io

    from mindformers.models.build_model import build_model

    import nsa_layers.mindformers  # noqa: F401  (registers NSAQwen3Config / NSAQwen3ForCausalLM)

    with contextlib.redirect_stdout(sys.stdout if verbose else io.StringIO()):
        return build_model(cfg.model)


class HeldOutLoss:
    """The model's training loss as a compiled function of one batch, for the held-out rows."""

    def __init__(self, net):
        import mindspore as ms

        def loss_fn(input_ids, labels, loss_mask, position_ids, actual_seq_len):
            return net(input_ids=input_ids, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                       actual_seq_len=actual_seq_len)[0]

        self.loss = ms.jit(loss_fn)

    def __call__(self, rows, batch_size):
        """Mean loss over ``rows`` (whole batches, cycling to fill the last one)."""
        count = rows["input_ids"].shape[0]
        steps = max(1, -(-count // batch_size))
        return float(np.mean([self.loss(*(b[key] for key in ("input_ids", "labels", "loss_mask", "position_ids",
                                                                 "actual_seq_len"))).asnumpy()
                              for b in (batch(rows, i, batch_size) for i in range(steps))]))


def train(net, cfg, steps, verbose):
    """Fine-tune ``net`` in place with ``mindformers.Trainer`` as ``cfg`` says, saving a checkpoint
    after the last step; returns the progress bar callback (its ``losses`` and ``tokens_per_second``)."""
    import contextlib
    import io

    from mindformers import Trainer

    from nsa_layers.mindformers import NSAProgressBar

    cfg.checkpoint.save_interleaved_steps = steps
    bar = NSAProgressBar(total_steps=steps, file=sys.stdout)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:  # MindFormers prints its whole configuration
        Trainer(args=cfg, task="text_generation", model=net, callbacks=[bar]).train()
    return bar


def last_checkpoint(cfg):
    """The model file of the Trainer's newest checkpoint (``checkpoint.save_path``)."""
    import glob

    root = cfg.checkpoint.save_path
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), encoding="utf-8") as f:
        iteration = int(f.read().split()[0])
    return glob.glob(os.path.join(root, f"iteration_{iteration:08d}", "*-model-*.safetensors"))[0]


# ------------------------------------------------------------------------------------------ PNG
def selection_picture(net, rows, row_index, path, select_block_size):
    """Draw which keys the first layer's selection branch picked, per query block, for one packed row.

    Pixel (key token s, query block i) is dark when the queries of block i (of ``l'`` tokens, KV head
    0) selected the block holding key s; the shade is the share of those queries. Red lines are the
    document boundaries; the grey diagonal is the causal limit.
    """
    import mindspore as ms
    from PIL import Image, ImageDraw

    from nsa_layers.data import batch_rows
    from nsa_layers.mindformers import LayerSelection

    seq_length = rows["input_ids"].shape[1]
    one = batch_rows(rows, [row_index])
    blocks, valid = LayerSelection(net, 0)(ms.Tensor(one["input_ids"]), ms.Tensor(one["position_ids"]),
                                           ms.Tensor(one["actual_seq_len"]))
    blocks, valid = blocks.asnumpy()[:, 0], valid.asnumpy()[:, 0]  # (S, n), KV head 0
    ends = sorted({int(e) for e in one["actual_seq_len"] if 0 < e < seq_length})
    starts = np.arange(seq_length) - one["position_ids"][0]  # positions restart at every document
    picked = np.zeros((seq_length, seq_length), np.float32)  # query token x key token
    for t in range(seq_length):
        for j in blocks[t][valid[t]]:
            lo = starts[t] + int(j) * select_block_size
            picked[t, lo:min(lo + select_block_size, t + 1)] = 1.0
    query_blocks = -(-seq_length // select_block_size)
    share = np.stack([picked[i * select_block_size:(i + 1) * select_block_size].mean(0) for i in range(query_blocks)])

    cell, margin = 2, 40
    width, height = seq_length * cell + 2 * margin, query_blocks * select_block_size // 4 * cell + 2 * margin
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    row_px = (height - 2 * margin) / query_blocks
    for i in range(query_blocks):
        y0 = margin + i * row_px
        for s in range(seq_length):
            if share[i, s] > 0:
                shade = int(230 - 200 * share[i, s])
                x0 = margin + s * cell
                draw.rectangle([x0, y0, x0 + cell - 1, y0 + row_px - 2], fill=(shade, shade, 255))
        draw.line([margin + min(seq_length, (i + 1) * select_block_size) * cell, y0,
                   margin + min(seq_length, (i + 1) * select_block_size) * cell, y0 + row_px], fill="grey")
    for end in ends:
        x = margin + end * cell
        draw.line([x, margin, x, height - margin], fill="red", width=1)
        y = margin + end / select_block_size * row_px
        draw.line([margin, y, width - margin, y], fill="red", width=1)
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.text((margin, 8), f"NSA selection, layer 0, KV head 0: rows = query blocks of {select_block_size} tokens, "
                           f"columns = key tokens 0..{seq_length - 1}; red = document boundaries", fill="black")
    draw.text((margin, height - margin + 8), "shade = share of the block's queries that selected the key",
              fill="black")
    image.save(path)
    return path


# ----------------------------------------------------------------------------------------- main
PROMPT_TOKENS = 100


def held_out_prompt(rows, length):
    """The first ``length`` tokens (at most) of the first held-out document."""
    first_end = int(rows["actual_seq_len"][0][0])
    return rows["input_ids"][0, :min(length, first_end)].astype(np.int32)


def continuation(net, prompt, new_tokens):
    """Greedy continuation of ``prompt`` through MindFormers' ``generate`` with the NSA cache, and the
    decode speed in tokens per second (its steps after the first, which compiles)."""
    training = net.training
    net.set_train(False)
    out = net.generate(prompt.reshape(1, -1), max_new_tokens=new_tokens, do_sample=False)[0]
    net.set_train(training)
    timing = net.nsa_generation_timing
    return out[prompt.size:], (timing["steps"] - 1) / max(1e-9, timing["step_s"] - timing["first_step_s"])


def describe_swaps(swaps):
    """The model's CPU swaps in one short phrase (the bfloat16 casts counted, not listed)."""
    held = [swap for swap in swaps if swap.endswith("(bfloat16 held in float32)")]
    named = [swap for swap in swaps if swap not in held]
    if held:
        named.append(f"bfloat16 held in float32 by {len(held)} MindFormers cell types' casts")
    return ", ".join(named) or "none"


def import_mindformers(verbose):
    """Import MindFormers and the NSA adapter. Unless ``verbose``, MindFormers' console log keeps to
    errors from the start: its import warns about optional models it cannot import and its config
    loader about empty sections, every converted key and so on (all still in its log files under
    ``output/log``). Its logger binds its console handler to ``sys.stdout`` as it is when the first
    message comes, during the import: the import runs with stdout muted, then the handler is given
    the real stdout back, at the error level."""
    import contextlib
    import io
    import logging

    if verbose:
        import nsa_layers.mindformers  # noqa: F401
        return
    with contextlib.redirect_stdout(io.StringIO()) as muted:
        import nsa_layers.mindformers  # noqa: F401
    from mindformers.tools.logger import get_logger

    for handler in get_logger().handlers:
        if getattr(handler, "stream", None) in (muted, sys.stdout, sys.stderr):
            handler.setStream(sys.stdout)
            handler.setLevel(logging.ERROR)


def main(argv=None):
    args = parse_args(argv)
    import_mindformers(args.verbose)
    cfg = load_config(args)
    import mindspore as ms
    from mindformers.core.context.build_context import build_context

    build_context(cfg)
    ms.set_seed(args.seed)
    net = build(cfg, args.verbose)
    net.set_train(True)
    model_cfg = net.config
    if args.pretrained:
        from mindformers.checkpoint.checkpoint import load_hf_checkpoint

        load_hf_checkpoint(pretrained_model_dir=args.pretrained, network=net)
    nsa = model_cfg.nsa_config()
    print(f"model: {type(net).__name__}, {model_cfg.num_hidden_layers} layers, hidden {model_cfg.hidden_size}, "
          f"{sum(p.size for p in net.trainable_params())} parameters"
          f"{f' (Qwen3 weights from {args.pretrained})' if args.pretrained else ''}; NSA l={nsa.compress_block_size} "
          f"d={nsa.compress_stride} l'={nsa.select_block_size} n={nsa.select_block_count} w={nsa.window_size}; "
          f"{nsa.compute_dtype}; CPU swaps: {describe_swaps(net.cpu_swaps)}")

    seq_length, batch_size = int(model_cfg.seq_length), int(cfg.runner_config.batch_size)
    pad_id = int(model_cfg.pad_token_id if model_cfg.pad_token_id is not None else model_cfg.eos_token_id)
    max_segments = max(2, seq_length // 32)
    text = text_codec(args.pretrained)
    docs = documents(args.max_doc_bytes, args.seed, text)
    train_rows, eval_rows = packed_splits(docs, seq_length, max_segments, pad_id)
    per_row = (train_rows["actual_seq_len"] < seq_length).sum(1) + 1
    data_file = write_training_rows(train_rows, args.steps, batch_size, cfg.train_dataset.data_loader.dataset_dir)
    print(f"data: {len(docs)} documents from pydoc_data ({text.unit}), {train_rows['input_ids'].shape[0]} training "
          f"rows of {seq_length} tokens ({per_row.mean():.1f} documents per row on average), "
          f"{eval_rows['input_ids'].shape[0]} held-out rows; training rows for MindFormers: {data_file}")

    held_out = HeldOutLoss(net)
    before = held_out(eval_rows, batch_size)
    print(f"held-out loss before training: {before:.4f} (uniform guess: {np.log(model_cfg.vocab_size):.4f})")
    prompt = held_out_prompt(eval_rows, min(PROMPT_TOKENS, seq_length - args.new_tokens))
    continuation_before, _ = continuation(net, prompt, args.new_tokens)

    print(f"training with mindformers.Trainer: {cfg.optimizer.type}, {cfg.lr_schedule.type} "
          f"{cfg.lr_schedule.learning_rate}, {cfg.runner_wrapper.type}, {args.steps} steps of {batch_size} rows")
    net.set_train(True)
    bar = train(net, cfg, args.steps, args.verbose)
    losses = bar.losses
    after = held_out(eval_rows, batch_size)
    head, tail = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"training loss: first 10 steps {head:.4f} -> last 10 steps {tail:.4f}; "
          f"held-out loss {before:.4f} -> {after:.4f}")

    ckpt = last_checkpoint(cfg)
    fresh = build(cfg, args.verbose)
    fresh.set_train(True)
    not_loaded, _ = ms.load_param_into_net(fresh, ms.load_checkpoint(ckpt, format="safetensors"))
    reloaded = HeldOutLoss(fresh)(eval_rows, batch_size)
    print(f"checkpoint (written by the Trainer): {ckpt}; reloaded into a fresh model ({len(not_loaded)} parameters "
          f"not loaded): held-out loss {reloaded:.6f} vs {after:.6f} after training -> "
          f"{'same' if abs(reloaded - after) <= 1e-6 * max(1.0, abs(after)) else 'DIFFERENT'}")

    continuation_after, speed = continuation(net, prompt, args.new_tokens)
    print(f"held-out prompt ({prompt.size} {text.unit}): {text.decode(prompt)}")
    print(f"  greedy continuation before training: {text.decode(continuation_before)}")
    print(f"  greedy continuation after training:  {text.decode(continuation_after)}")
    print(f"  decode with the NSA cache: {speed:.1f} tokens/s (batch 1, after compilation)")

    documents_per_row = (eval_rows["actual_seq_len"] < seq_length).sum(1)
    png = selection_picture(net, eval_rows, int(np.argmax(documents_per_row)),
                            os.path.join(args.out_dir, "nsa_selection.png"), nsa.select_block_size)
    print(f"selection picture: {os.path.abspath(png)}")
    ok = not not_loaded and abs(reloaded - after) <= 1e-6 * max(1.0, abs(after)) and np.isfinite(losses).all()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
