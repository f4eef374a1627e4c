"""The report writers of bench/gpu_check.py: $OUT/gpu_results.md (tables) and $OUT/gpu_results.csv (one row
per timing with the GPU, the versions and the commit)."""

from __future__ import annotations

import csv
import os
import subprocess

CSV_FIELDS = ("gpu", "torch", "triton", "cuda", "commit", "date", "provider", "path", "kind", "target", "N", "d",
              "r", "dtype", "mode", "ms", "p20", "p80", "pred_ms", "tflops", "peak_mib")


def commit() -> str:
    """The checked-out commit (with "+dirty" for local changes), or "unknown" without git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        h = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True, timeout=10)
        return h.stdout.strip() + ("+dirty" if d.stdout.strip() else "") if h.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_csv(RES, OUT):
    m = RES["meta"]
    base = dict(gpu=m.get("gpu"), torch=m.get("torch"), triton=m.get("triton"), cuda=m.get("cuda"), commit=commit(),
                date=m.get("date"))
    with open(os.path.join(OUT, "gpu_results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in RES["timing"] + RES["double_backward"]:
            w.writerow({**base, **r})


def write_markdown(RES, OUT, _OTHER_PROVIDERS, OTHER_NOTES):
    m = RES["meta"]
    lines = [f"# GPU check — {m.get('gpu', '?')}, torch {m.get('torch')}, CUDA {m.get('cuda')}, "
             f"triton {m.get('triton')}, {m.get('date')}", ""]
    if RES["ceiling"]:
        lines.append("Ceiling (dense 8192³ matmul): " + ", ".join(
            f"{k} {v['tflops']:.0f} TFLOP/s" for k, v in RES["ceiling"].items() if isinstance(v, dict))
            + f"; copy bandwidth {RES['ceiling'].get('bandwidth_tbs', 0):.2f} TB/s")
        lines.append("")
    if RES["correctness"]:
        ok = sum(c["ok"] for c in RES["correctness"])
        lines += [f"## Correctness vs float64 oracle ({ok}/{len(RES['correctness'])} pass)", "",
                  "| prim | kind | target | M | N | d | scale | mode | worst rel err (value, ∂, ∂²) | eager same dtype "
                  "| ok |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in RES["correctness"]:
            lines.append(f"| {c['prim']} | {c['kind']} | {c['target']} | {c['M']} | {c['N']} | {c['d']} | "
                         f"{c['scale']:g} | {c['mode']} | {c['worst']:.2e} | {c['worst_eager']:.2e} | {'yes' if c['ok'] else 'NO'} |")
        lines.append("")
    if RES.get("precompile"):
        pc = RES["precompile"]
        lines += [f"Precompile (worker processes): {pc['done']}/{pc['jobs']} candidate jobs, {pc['compile_s']} s of "
                  f"worker time, {pc['failed']} failed", ""]
    if RES.get("sweep_best"):
        lines += [f"Config sweep (bf16, N=16384, d=512) best: `{RES['sweep_best']}`", ""]
    bf = RES["ceiling"].get("bf16", {}).get("tflops")
    tf = RES["ceiling"].get("tf32", {}).get("tflops")
    for title, rows in (("fwd+bwd", RES["timing"]), ("double backward", RES["double_backward"])):
        if not rows:
            continue
        lines += [f"## Timings: {title} (lors_fast.contrastive_loss; ms median [p20, p80]; TFLOP/s by 8·N²·(d+r))",
                  "", "| provider | path | kind | target | N | d | dtype | ms | p20 | p80 | roofline ms (predicted) | TFLOP/s "
                  "| % of matmul | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ceil = bf if r["dtype"] in ("bfloat16", "float16") else tf
            pct = f"{100 * r['tflops'] / ceil:.0f}%" if ceil and r["mode"] == "fwd+bwd" else "-"
            pred = f"{r['pred_ms']:.2f}" if r.get("pred_ms") else "-"
            lines.append(f"| {r['provider']} | {r.get('path') or '-'} | {r['kind']} | {r['target']} | {r['N']} | {r['d']} | {r['dtype']} | "
                         f"{r['ms']:.3f} | {r['p20']:.3f} | {r['p80']:.3f} | {pred} | {r['tflops']:.1f} | {pct} | "
                         f"{r['peak_mib']:.1f} |")
        lines.append("")
    if RES["providers"] or any(r["provider"] in _OTHER_PROVIDERS for r in RES["timing"]):
        lines += ["## Other providers: symmetric hard-label CLIP loss (infonce, identity target), fwd+bwd", "",
                  "| provider | N | d | input dtype | loss | ours (triton) | rel err loss | rel err ∂U, ∂V, ∂s | "
                  "ms | ours ms | ours/theirs (time) | peak MiB | ours peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in RES["providers"]:
            t = next((r for r in RES["timing"] if r["provider"] == c["provider"] and r["N"] == c["N"] and
                      r["d"] == c["d"] and r["dtype"] == c["dtype"]), {})
            ge = ", ".join(f"{v:.1e}" for v in c["rel_err_grad"].values())

            def fm(k, f="{:.3f}", t=t):
                return f.format(t[k]) if k in t else "-"
            lines.append(f"| {c['provider']} | {c['N']} | {c['d']} | {c['dtype']} | {c['loss_theirs']:.6f} | "
                         f"{c['loss_ours']:.6f} | {c['rel_err_value']:.1e} | {ge} | {fm('ms')} | {fm('ours_ms')} | "
                         f"{fm('ratio_ours_over_theirs')} | {fm('peak_mib', '{:.1f}')} | "
                         f"{fm('ours_peak_mib', '{:.1f}')} |")
        lines.append("")
        lines += [f"- {k}: {v}" for k, v in OTHER_NOTES.items()]
        lines += [f"- {k}: {m[k]}" for k in ("openclip_source", "infcl_source", "infcl_dtypes_run") if k in m]
        lines += ["- ours/theirs (time) < 1: ours is faster; the rows are also in the timing table (provider column).",
                  ""]
    if RES["errors"]:
        lines += ["## Errors / skipped", ""] + [f"- {e['section']}: {e['error'][:300]}" for e in RES["errors"]]
    with open(os.path.join(OUT, "gpu_results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

