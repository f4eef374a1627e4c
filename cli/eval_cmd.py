"""`lors-fast eval` (train a fresh network on a distilled set, retrieval on test) and `lors-fast coreset`.

Both commands only parse options into :class:`lors_fast.engine.evaluate.EvalConfig` /
:class:`lors_fast.engine.coreset.CoresetConfig` and call the stage's ``run``.
"""

from __future__ import annotations

import functools
import logging

import click

_PROTOCOL = [
    click.option("--runs", type=int, default=5, show_default=True, help="fresh networks (seeds seed..seed+runs-1)"),
    click.option("--seed", "eval_seed", type=int, default=0, show_default=True, help="first network seed"),
    click.option("--epochs", type=int, default=100, show_default=True, help="training epochs on the set"),
    click.option("--batch-size", type=int, default=128, show_default=True, help="training minibatch size"),
    click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum"),
    click.option("--weight-decay", type=float, default=5e-4, show_default=True, help="SGD weight decay"),
    click.option("--lr-decay", type=float, default=0.1, show_default=True, help="lr factor at the midpoint"),
    click.option("--temperature", type=float, default=0.07, show_default=True,
                 help="logit temperature of the training loss and the retrieval"),
    click.option("--eval-every", type=int, default=10, show_default=True, help="val evaluation every k epochs"),
    click.option("--arch", default=None, help="image architecture override (cross-architecture), e.g. a timm name"),
    click.option("--arch-weights", default=None, type=click.Path(path_type=str, dir_okay=False), help="local weights for --arch"),
    click.option("--device", default="auto", show_default=True,
                 help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N"),
    click.option("--no-val", is_flag=True, help="no val split: report the final epoch only"),
    click.option("--report-best-on-test", is_flag=True,
                 help="also report the reference's best-over-TEST-evaluations number (labelled; optimistic)"),
    click.option("--dataset", type=click.Choice(["synthetic", "synthetic-mm", "flickr", "coco"]), default=None,
                 help="dataset to train and test on (default: the checkpoint's; coreset: synthetic)"),
    click.option("--data-root", default=None, type=click.Path(path_type=str, file_okay=False), help="image folder (flickr/coco)"),
    click.option("--ann-root", default=None, type=click.Path(path_type=str, file_okay=False),
                 help="folder of the Karpathy JSON annotations (flickr/coco)"),
    click.option("--cache-dir", default=None, type=click.Path(path_type=str, file_okay=False),
                 help="image / text-embedding caches (default: $LORS_FAST_CACHE or ~/.cache/lors_fast)"),
    click.option("--text-encoder", default=None, help="caption encoder (default: the checkpoint's, else minilm)"),
    click.option("--out", default=None, type=click.Path(path_type=str, dir_okay=False), help="write all results as JSON"),
]


def _protocol(f):
    for opt in reversed(_PROTOCOL):
        f = opt(f)
    return f


def _eval_config(kw: dict, **extra):
    from lors_fast.engine.evaluate import EvalConfig

    return EvalConfig(
        epochs=kw["epochs"], batch_size=kw["batch_size"], momentum=kw["momentum"], weight_decay=kw["weight_decay"],
        lr_decay=kw["lr_decay"], runs=kw["runs"], seed=kw["eval_seed"], temperature=kw["temperature"],
        eval_every=kw["eval_every"], report_best_on_test=kw["report_best_on_test"], arch=kw["arch"],
        arch_weights=kw["arch_weights"], device=kw["device"], val_split=None if kw["no_val"] else "val",
        dataset=kw["dataset"], data_root=kw["data_root"], ann_root=kw["ann_root"], cache_dir=kw["cache_dir"],
        text_encoder=kw["text_encoder"], out=kw["out"], **extra,
    )


def _friendly(f):
    """Bad options or files → a one-line click error instead of a traceback."""
    @functools.wraps(f)
    def wrapper(*a, **kw):
        try:
            return f(*a, **kw)
        except (ValueError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from e
    return wrapper


@click.command("eval")
@click.option("--ckpt", required=True, type=click.Path(path_type=str, dir_okay=False),
              help="distilled set: ours (.safetensors) or the reference's distilled_*.pt")
@click.option("--loss", default=None, help="student loss kind (default: the checkpoint's)")
@click.option("--lr-img", type=float, default=None, help="override the learned image lr")
@click.option("--lr-txt", type=float, default=None, help="override the learned text lr")
@_protocol
@_friendly
def eval_command(ckpt, loss, lr_img, lr_txt, **kw):
    """Train fresh networks on a distilled set; report final-epoch and val-selected test retrieval (mean ± std)."""
    from lors_fast.engine.evaluate import format_summary, run

    cfg = _eval_config(kw, ckpt=ckpt, loss=loss, lr_img=lr_img, lr_txt=lr_txt)
    res = run(cfg, progress=logging.getLogger("lors_fast.cli").info)
    click.echo(format_summary(res["summary"]))


@click.command("coreset")
@click.option("--method", type=click.Choice(["random", "herding", "kcenter", "forgetting"]), default="random",
              show_default=True)
@click.option("--n", "n_pairs", type=int, default=100, show_default=True, help="number of real pairs")
@click.option("--subset-seed", type=int, default=0, show_default=True, help="seed of random / forgetting choices")
@click.option("--lr", type=float, default=0.03, show_default=True, help="fixed lr of both branches")
@click.option("--loss", default="infonce", show_default=True, help="student loss kind (identity targets)")
@click.option("--buffer", default=None, type=click.Path(path_type=str, file_okay=False),
              help="trajectory store root (forgetting.safetensors; the student spec)")
@_protocol
@_friendly
def coreset_command(method, n_pairs, subset_seed, lr, loss, buffer, **kw):
    """Evaluate a coreset baseline (N real pairs) with the same protocol as `eval`."""
    from lors_fast.engine.coreset import CoresetConfig, run
    from lors_fast.engine.evaluate import format_summary

    ecfg = _eval_config({**kw, "dataset": None, "out": None}, loss=loss)
    cfg = CoresetConfig(method=method, n=n_pairs, seed=subset_seed, lr=lr, dataset=kw["dataset"] or "synthetic",
                        buffer=buffer, data_root=kw["data_root"], ann_root=kw["ann_root"], cache_dir=kw["cache_dir"],
                        text_encoder=kw["text_encoder"] or "minilm", out=kw["out"], eval=ecfg)
    res = run(cfg, progress=logging.getLogger("lors_fast.cli").info)
    click.echo(f"coreset {cfg.method} n={cfg.n} on {res['dataset']}:\n" + format_summary(res["summary"]))


def register(group: click.Group) -> None:
    """Add `eval` and `coreset` to the `lors-fast` group."""
    group.add_command(eval_command)
    group.add_command(coreset_command)
