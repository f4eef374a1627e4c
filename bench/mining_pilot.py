"""The S diagnostics of the first iterations of a LoRS variant (issue 18), printed per few iterations.

    python bench/mining_pilot.py --dataset synthetic --iterations 10 --variants lors-default adam-r \
        --cache-dir ~/.cache/lors_fast

Needs the main job's cached buffer of that dataset (``<cache>/buffers/<dataset>-default``); one thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> None:
    import torch
    from mining_protocol import VARIANTS

    from lors_fast.data.datasets import default_cache_dir
    from lors_fast.engine.distill import Distiller
    from lors_fast.engine.distill_config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="synthetic", choices=["synthetic", "synthetic-mm"])
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=["lors-default"], choices=sorted(VARIANTS))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="runs/pilot")
    p.add_argument("--buffer", default=None, help="trajectory store [<cache>/buffers/<dataset>-default]")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cache = Path(a.cache_dir) if a.cache_dir else default_cache_dir()
    for var in a.variants:
        buffer = a.buffer or str(cache / "buffers" / f"{a.dataset}-default")
        cfg = load_config("default", buffer=buffer, dataset=a.dataset,
                          out=str(Path(a.out) / f"{a.dataset}-{var}"), cache_dir=a.cache_dir,
                          iterations=a.iterations, artifacts=False, progress=False, threads=1, **VARIANTS[var])
        d = Distiller(cfg)
        for i in range(a.iterations):
            m = d.step()
            if i == 0 or (i + 1) % 5 == 0:
                sim = {k: round(v, 5) if isinstance(v, float) else v for k, v in m.items() if k.startswith("sim_")}
                print(a.dataset, var, m["iteration"], sim, flush=True)


if __name__ == "__main__":
    main()
