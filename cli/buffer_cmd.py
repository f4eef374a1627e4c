"""`lors-fast buffer` and `lors-fast import-buffer`: parse options into the stage config, call the stage."""

from __future__ import annotations

import json

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
@click.option("--dataset", type=click.Choice(["synthetic", "synthetic-mm", "flickr", "coco"]), default=None,
              help="dataset of the real pairs [preset]")
@click.option("--data-root", "root", type=click.Path(path_type=str, file_okay=False), default=None,
              help="image folder (flickr/coco)")
@click.option("--root", "root_alias", type=click.Path(path_type=str, file_okay=False), default=None, hidden=True,
              help="old name of --data-root")
@click.option(
    "--ann-root", type=click.Path(path_type=str, file_okay=False), default=None, help="Karpathy JSON folder (flickr/coco)"
)
@click.option(
    "--out",
    type=click.Path(path_type=str, file_okay=False),
    default="runs/buffer",
    show_default=True,
    help="trajectory store folder",
)
@click.option(
    "--cache-dir",
    type=click.Path(path_type=str, file_okay=False),
    default=None,
    help="image/text caches [$LORS_FAST_CACHE or ~/.cache/lors_fast]",
)
@click.option("--experts", type=int, default=None, help="number of experts [preset]")
@click.option("--epochs", type=int, default=None, help="epochs per expert [preset]")
@click.option("--batch-size", type=int, default=None, help="expert minibatch size [preset]")
@click.option("--lr-img", type=float, default=None, help="SGD lr of the image encoder [0.1]")
@click.option("--lr-txt", type=float, default=None, help="SGD lr of the text head [0.1]")
@click.option("--momentum", type=float, default=None, help="SGD momentum of both branches [0]")
@click.option("--weight-decay", type=float, default=None, help="SGD weight decay of both branches [0]")
@click.option("--image-arch", default=None, help="convnet | timm name (nfnet_l0, ...) | open_clip:<model>")
@click.option(
    "--image-weights",
    type=click.Path(path_type=str, dir_okay=False),
    default=None,
    help="local checkpoint (none = random init)",
)
@click.option("--image-size", type=int, default=None, help="image side in pixels the experts train at [preset]")
@click.option(
    "--text-encoder",
    default=None,
    help="minilm | hf:<dir> | hf-mean:<dir> | open_clip:<model>:<ckpt> | hash:<dim>",
)
@click.option("--text-head", type=click.Choice(["linear", "projection"]), default=None,
              help="text branch on the frozen caption embeddings [preset]")
@click.option("--augment", type=click.Choice(["none", "flip", "crop_flip"]), default=None,
              help="image augmentation of the expert training [none]")
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
@click.option("--seed", type=int, default=None, help="seed of the experts (expert i uses a seed derived from it) [0]")
@click.option("--device", default=None, help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N [auto]")
@click.option("--threads", type=int, default=None, help="torch threads")
@click.option("--resume/--no-resume", default=True, show_default=True, help="skip experts already in --out")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="progress bars on stderr (only on a terminal)")
def buffer(preset, eval_split, **opts):
    """Train expert trajectories into a trajectory store (launch with torchrun to shard experts)."""
    from lors_fast.cli._logging import progress_enabled

    opts["progress"] = progress_enabled(opts["progress"])
    alias = opts.pop("root_alias")
    if opts["root"] is None:
        opts["root"] = alias
    if eval_split is not None:
        opts["eval_split"] = eval_split  # "none" is understood by BufferConfig (None would mean "the preset's")
    try:
        cfg = BufferConfig.from_preset(preset, **opts)
        summary = run_buffer(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    if summary["rank"] == 0:
        click.echo(json.dumps({k: summary[k] for k in ("store", "world", "trained", "skipped")}))


@click.command("import-buffer")
@click.argument("src", type=click.Path(path_type=str, file_okay=False))
@click.argument("out", type=click.Path(path_type=str, file_okay=False))
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

    spec = _parse_spec(spec_json)
    try:
        store = import_reference_buffers(
            src, out, {"spec": spec, "encoder": text_encoder, "dataset": dataset}
        )
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps({"store": out, "experts": store.expert_ids, "epochs": store.epochs}))


def _parse_spec(spec_json: str | None) -> dict:
    """--spec-json as a StudentSpec dict (checked now, so a store never records an unusable spec)."""
    from lors_fast.models import StudentSpec

    if not spec_json:
        return {}
    try:
        spec = json.loads(spec_json)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e.msg} at char {e.pos}): {spec_json!r}",
                                 param_hint="--spec-json") from None
    if not isinstance(spec, dict):
        raise click.BadParameter(f"expected a JSON object of StudentSpec fields, got {type(spec).__name__} "
                                 f"{spec_json!r}", param_hint="--spec-json")
    try:
        return StudentSpec.from_dict(spec).to_dict()
    except (TypeError, ValueError) as e:
        raise click.BadParameter(f"{spec_json!r} is not a valid StudentSpec: {e}", param_hint="--spec-json") from None


def register(group: click.Group) -> None:
    group.add_command(buffer)
    group.add_command(import_buffer)
