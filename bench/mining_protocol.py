"""Issue 18's protocol: LoRS variants vs no-mining trajectory matching (TM) vs a random subset.

Every cell is the main job's own recipe (``lors_fast.engine.pipeline.run_main_job``: 4 experts × 3 epochs,
100 distillation iterations, 80 evaluation epochs, 3 evaluation seeds, val-selected test r_mean) on one
embedded dataset and one distillation seed (``--seed`` of the main job: distillation, random subset and
evaluation networks). For each (dataset, seed) TM and the random subset run once (with the first variant);
every variant is compared with TM *paired by evaluation seed* (same network init and data order): the
table gives the mean ± std of those paired differences over every (seed, evaluation seed).

    python bench/mining_protocol.py --datasets synthetic synthetic-mm --seeds 0 1 \
        --variants lors-default adam-r --cache-dir ~/.cache/lors_fast --out runs/protocol

Results are appended to ``<out>/protocol.jsonl`` (one line per main-job run); a rerun skips the cells
already there, so the protocol can be run piece by piece. ``--report`` prints the table only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

#: LoRS variants: DistillConfig overrides of the LoRS run (the TM run keeps the "default" preset)
VARIANTS: dict[str, dict] = {
    "lors-default": {},  # the main job's LoRS: S >= 0, SGD lr_sim 0.3, R = 0 at the start
    # a normalised (Adam) update of the similarity factors + a small non-zero R: off-diagonal entries move
    # at the diagonal's rate from the first iteration
    "adam-r": {"sim_optimizer": "adam", "lr_sim": 0.002, "sim_init_right": 0.01},
    # per-factor learning rates: L and R 10x the diagonal's, non-zero R
    "factor-lr": {"lr_sim_factors": 3.0, "sim_init_right": 0.01},
    # S initialised from the init captions' cosine (I + 0.3·relu(cos − 0.8)/0.2), then learned by Adam
    "caption-adam": {"sim_init": "caption", "sim_optimizer": "adam", "lr_sim": 0.002},
    # S initialised from the captions, SGD as the default
    "caption-init": {"sim_init": "caption"},
    # the paper's student: wBCE, unconstrained S, lr_sim 10, alpha 3 (docs/LORS_NOTES.md §7, flickr-100)
    "wbce-paper": {"loss": "wbce", "sim_constraint": "none", "lr_sim": 10.0, "alpha": 3.0},
}


def _r_means(record: dict, name: str) -> list[float]:
    return [float(v) for v in record["run_r_mean"][name]]


def label(dataset: str, soft: float) -> str:
    """The table's dataset label: ``+soft<w>`` marks loss-matched experts (buffer soft_target_weight w)."""
    return f"{dataset}+soft{soft:g}" if soft else dataset


def run_cell(dataset: str, seed: int, variant: str, with_tm: bool, cache_dir, out: Path, threads_parallel: bool,
             soft: float = 0.0):
    from lors_fast.engine.pipeline import MainJobConfig, run_main_job

    buffer = {"soft_target_weight": soft} if soft else {}
    cfg = MainJobConfig(out=str(out / f"{label(dataset, soft)}-s{seed}-{variant}"), dataset=dataset, seed=seed,
                        cache_dir=cache_dir, baseline=with_tm, random_subset=with_tm, parallel=threads_parallel,
                        progress=False, lors_distill=dict(VARIANTS[variant]), buffer=buffer)
    rec = run_main_job(cfg)
    row = {"dataset": label(dataset, soft), "seed": seed, "variant": variant, "overrides": VARIANTS[variant],
           "lors": _r_means(rec, "lors"), "timings_s": rec["timings_s"]}
    if with_tm:
        row["tm"], row["random"] = _r_means(rec, "tm"), _r_means(rec, "random")
    return row


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.2f} ± {sd:.2f}"


def report(rows: list[dict]) -> str:
    """Markdown table: per (dataset, variant) the r_mean over all (seed, eval seed), TM, random, and the
    paired difference variant − TM (mean ± std) with its verdict (> 2 std of the difference: "pays")."""
    tm = {(r["dataset"], r["seed"]): r for r in rows if "tm" in r}
    lines = ["| dataset | variant | seeds | LoRS variant | TM | random | variant − TM (paired) | > 2σ? |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["dataset"], r["variant"]) for r in rows})
    for ds, var in keys:
        cells = [r for r in rows if r["dataset"] == ds and r["variant"] == var]
        lo, t, rnd, diff, seeds = [], [], [], [], []
        for r in sorted(cells, key=lambda r: r["seed"]):
            base = tm.get((ds, r["seed"]))
            seeds.append(str(r["seed"]))
            lo += r["lors"]
            if base is not None:
                t += base["tm"]
                rnd += base["random"]
                diff += [a - b for a, b in zip(r["lors"], base["tm"])]
        verdict = "-"
        if len(diff) > 1:
            m, sd = statistics.fmean(diff), statistics.stdev(diff)
            verdict = "yes" if m > 2 * sd else "no"
        lines.append(f"| {ds} | {var} | {','.join(seeds)} | {_ms(lo)} | {_ms(t)} | {_ms(rnd)} | {_ms(diff)} | "
                     f"{verdict} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["synthetic", "synthetic-mm"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--variants", nargs="+", default=["adam-r"], choices=sorted(VARIANTS))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="runs/protocol")
    p.add_argument("--soft-target-weight", type=float, default=0.0,
                   help="loss-matched experts: the buffer's soft_target_weight (0: identity-target experts)")
    p.add_argument("--serial", action="store_true", help="one process per cell (default: the main job's two)")
    p.add_argument("--report", action="store_true", help="print the table of <out>/protocol.jsonl and stop")
    a = p.parse_args(argv)
    if a.serial:  # one process, one thread (the machine is shared); the parallel schedule pins its workers
        import torch

        torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "protocol.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    if not a.report:
        for name in a.datasets:
            ds = label(name, a.soft_target_weight)
            for seed in a.seeds:
                for var in a.variants:
                    if any(r["dataset"] == ds and r["seed"] == seed and r["variant"] == var for r in rows):
                        continue
                    with_tm = not any(r["dataset"] == ds and r["seed"] == seed and "tm" in r for r in rows)
                    row = run_cell(name, seed, var, with_tm, a.cache_dir, out, not a.serial, a.soft_target_weight)
                    rows.append(row)
                    with open(log, "a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
                    print(report(rows), flush=True)
    print(report(rows))


if __name__ == "__main__":
    main()
