"""`lors-fast buffer` and `lors-fast import-buffer`: parse options into the stage config, call the stage."""

from __future__ import annotations

import json
import logging

import click

from lors_fast.engine.buffer import PRESETS, BufferConfig
from lors_fast.engine.buffer import run as run_buffer


@click.command("buffer")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    default="synthetic",
    show_default=True,
    help="defaults for the run; every option below overrides it",
)
@click.option("--dataset", type=click.Choice(["synthetic", "synthetic-mm", "flickr", "coco"]), default=None)
@click.option("--root", type=click.Path(file_okay=False), default=None, help="image folder (flickr/coco)")
@click.option(
    "--ann-root", type=click.Path(file_okay=False), default=None, help="Karpathy JSON folder (flickr/coco)"
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/buffer",
    show_default=True,
    help="trajectory store folder",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="image/text caches [$LORS_FAST_CACHE or ~/.cache/lors_fast]",
)
@click.option("--experts", type=int, default=None, help="number of experts [preset]")
@click.option("--epochs", type=int, default=None, help="epochs per expert [preset]")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr-img", type=float, default=None, help="SGD lr of the image encoder [0.1]")
@click.option("--lr-txt", type=float, default=None, help="SGD lr of the text head [0.1]")
@click.option("--momentum", type=float, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--image-arch", default=None, help="convnet | timm name (nfnet_l0, ...) | open_clip:<model>")
@click.option(
    "--image-weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="local checkpoint (none = random init)",
)
@click.option("--image-size", type=int, default=None)
@click.option(
    "--text-encoder",
    default=None,
    help="minilm | hf:<dir> | hf-mean:<dir> | open_clip:<model>:<ckpt> | hash:<dim>",
)
@click.option("--text-head", type=click.Choice(["linear", "projection"]), default=None)
@click.option("--augment", type=click.Choice(["none", "flip", "crop_flip"]), default=None)
@click.option(
    "--captions",
    type=click.Choice(["random", "all"]),
    default=None,
    help="one random caption per image per epoch, or every caption entry",
)
@click.option("--n-train", type=int, default=None, help="synthetic: number of train images [5000]")
@click.option("--soft-target-weight", type=float, default=None,
              help="loss-matched experts: target I + W*[caption cosine > threshold] per batch [0: identity]")
@click.option("--soft-target-threshold", type=float, default=None, help="caption cosine of --soft-target-weight [0.8]")
@click.option(
    "--eval-split",
    type=click.Choice(["val", "test", "none"]),
    default=None,
    help="split of each expert's final score [test]",
)
@click.option("--seed", type=int, default=None)
@click.option("--device", default=None, help="cpu | cuda | cuda:N")
@click.option("--threads", type=int, default=None, help="torch threads")
@click.option("--resume/--no-resume", default=True, show_default=True, help="skip experts already in --out")
@click.option("--progress/--no-progress", default=True, show_default=True)
def buffer(preset, eval_split, **opts):
    """Train expert trajectories into a trajectory store (launch with torchrun to shard experts)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if eval_split is not None:
        opts["eval_split"] = None if eval_split == "none" else eval_split
    try:
        cfg = BufferConfig.from_preset(preset, **opts)
        summary = run_buffer(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if summary["rank"] == 0:
        click.echo(json.dumps({k: summary[k] for k in ("store", "world", "trained", "skipped")}))


@click.command("import-buffer")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--spec-json", default=None, help="StudentSpec of the trajectories, as JSON (recorded in the store)"
)
@click.option("--text-encoder", default="unknown", show_default=True, help="encoder id recorded in the store")
@click.option(
    "--dataset", default="unknown", show_default=True, help="dataset name/fingerprint recorded in the store"
)
def import_buffer(src, out, spec_json, text_encoder, dataset):
    """Convert the reference's img_/txt_replay_buffer_<n>.pt files in SRC into a store at OUT."""
    from lors_fast.engine.trajectories import import_reference_buffers

    try:
        spec = json.loads(spec_json) if spec_json else {}
        store = import_reference_buffers(
            src, out, {"spec": spec, "encoder": text_encoder, "dataset": dataset}
        )
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps({"store": out, "experts": store.expert_ids, "epochs": store.epochs}))


def register(group: click.Group) -> None:
    group.add_command(buffer)
    group.add_command(import_buffer)
