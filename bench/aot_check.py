#!/usr/bin/env python
"""Compile the fused Triton kernels for a Hopper GPU (sm_90a: H100/H200) on a machine without one.

    python bench/aot_check.py [--d 512] [--dtype bfloat16 float32] [--candidates] [--md FILE] [--json FILE]

Triton's compiler and the ptxas it ships run on any x86 machine: this script builds every kernel
specialisation the backend launches (stage × loss kind × target × dtype × d, with the launch config
`lors_fast.ops.triton_backend._config` picks for a CUDA device, or a candidate config) down to a cubin, and
reports what can be known without running it:

* shared memory per program (the H100/H200 limit is 227 KiB: above it the launch fails);
* registers per thread and **spill** bytes (local-memory traffic in the inner loop is slow);
* whether the tile loads are software-pipelined (`async` = cp.async copies in flight across loop
  iterations) or synchronous (`sync2d` = 2-D tile loads that stall the loop), and the number of wgmma
  (Hopper tensor-core) dots;
* the SASS instruction count (cuobjdump, NOP padding excluded): the loop body dominates it, so it tracks the
  elementwise work per tile between two builds of the same tiles.

It measures nothing about speed: it tells which configs are worth timing on a GPU (bench/gpu_check.py's
sweep) and guards the defaults (tests/test_triton_aot.py: they compile for sm_90a, fit shared memory and
do not spill). Runs with TRITON_INTERPRET unset (it is forced to 0 here).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lors_fast.ops.triton_backend import _KINDS as KINDS  # noqa: E402  (the kernels' kind codes)

# compute capability -> (ptxas arch, opt-in shared memory per block): H100/H200, A100, L4/RTX 4090
ARCHS = {90: ("sm_90a", 227 * 1024), 80: ("sm_80", 163 * 1024), 89: ("sm_89", 99 * 1024)}
SMEM_LIMIT = ARCHS[90][1]
# (stage, kind, target): what a contrastive loss launches (infonce/siglip: lse/softplus with the identity
# target; the low-rank kinds: wbce/bce/mse with TGT = 1)
CASES = [("fwd", "lse", 0), ("fwd", "wbce", 1), ("bwd", "lse", 0), ("bwd", "wbce", 1),
         ("pre", "lse", 0), ("dbl", "lse", 0), ("dbl", "wbce", 1)]
# the kernel stage, kind and target each config stage of the tuning (lors_fast.ops.triton_tuning) is built for
SWEEP_CASES = {"fwd": ("fwd", "lse", 0), "bwd": ("bwd", "lse", 0), "dbl": ("dbl", "lse", 0),
               "fwd_pair": ("fwd", "wbce", 1), "bwd_pair": ("bwd", "wbce", 1), "dbl_pair": ("dbl", "wbce", 1)}
_PTXAS = None


def _ptxas():
    global _PTXAS
    if _PTXAS is None:
        import triton

        _PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return _PTXAS


def _kernel(stage):
    from lors_fast.ops import triton_kernels as K

    return {"fwd": K._fwd_kernel, "bwd": K._bwd_kernel, "pre": K._dbl_pre_kernel, "dbl": K._dbl_kernel,
            "gtile": K._gtile_kernel}[stage]


def constexprs(stage, kind, tgt, dtype, D, override=None, cc: int = 90):
    """The constexpr arguments and launch options the backend would use for this specialisation on CUDA."""
    import triton.language as tl

    from lors_fast.ops import triton_backend as tb

    kstage = "bwd" if stage == "gtile" else stage
    cstage = kstage + "_pair" if kind != "lse" and stage != "pre" else kstage
    from lors_fast.ops.options import override as options_override

    with options_override(configs={cstage: dict(override or {})}, replace_configs=True):
        cfg = tb._config(cstage, D, dtype, torch.device("cuda"), cc=cc)
    prec = "tf32" if dtype == torch.float32 else "ieee"
    upcast, PREC, ACC = tb._flags(dtype, prec)
    if stage == "gtile":  # the strip backward's G-tile kernel (a bwd config with STRIP > 0)
        return (dict(BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, UPCAST=upcast, PREC=PREC, ACC=ACC, PRIMARY=True,
                     KIND=KINDS[kind], TGT=tgt, RP=16, LR16=False,
                     LR_PREC=tb._lr_prec(dtype, prec if dtype == torch.float32 else "lowp"),
                     LDT={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, ACC)),
                dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), cfg)
    c = dict(BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, UPCAST=upcast, PREC=PREC, ACC=ACC, WD=cfg.WD, DP=cfg.DP,
             FLAT=cfg.FLAT)
    if stage != "pre":
        c.update(KIND=KINDS[kind], TGT=tgt, RP=16, LR_PREC=tb._lr_prec(dtype, prec if dtype == torch.float32
                                                                          else "lowp"),
                 LDT={torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, ACC), LR16=False)
    if stage == "fwd":
        c["FUSE_COLS"] = kind == "lse"
    if stage == "pre":
        c["FUSE_COLS"] = True  # the backend's default (options.dbl_fused_pre)
    if stage in ("bwd", "dbl", "pre"):
        c["QFAST"] = cfg.QFAST
    if stage in ("bwd", "dbl"):
        c.update(PRIMARY=True, BDO=cfg.BDO)
    return c, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), cfg


def compile_one(stage, kind, tgt, dtype, D, override=None, cc: int = 90):
    """Compile one specialisation for compute capability ``cc`` (default 90: sm_90a); a dict of its resources
    (or the error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if stage == "bwd" and override and override.get("STRIP"):
        stage = "gtile"
    fn = _kernel(stage)
    consts, opts, cfg = constexprs(stage, kind, tgt, dtype, D, override, cc)
    lowp = "*bf16" if dtype == torch.bfloat16 else "*fp16" if dtype == torch.float16 else "*fp32"
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("M", "N", "D", "r", "ldg", "r0", "r1"):
            sig[n] = "i32"
        else:
            sig[n] = lowp if n in ("A", "B", "Ab", "Bb", "dA", "gA", "G") else "*fp32"
    # what the launcher's specialisation sees: 16-byte aligned pointers, D divisible by 16 when it is
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if sig[n].startswith("*") or (n == "D" and D % 16 == 0)}
    row = dict(arch=ARCHS[cc][0], stage=stage, kind=kind, target="lowrank" if tgt else "identity",
               dtype=str(dtype).replace("torch.", ""), d=D, BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BDO=cfg.BDO,
               WD=cfg.WD, FLAT=cfg.FLAT, QFAST=cfg.QFAST, STRIP=cfg.STRIP, num_warps=cfg.num_warps, num_stages=cfg.num_stages, default=not override)
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", cc, 32), options=opts)
    except Exception as e:  # out of resources at compile time, unsupported layout, ...
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return row
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"lors_aot_{os.getpid()}")
    with open(tmp + ".ptx", "w") as f:
        f.write(k.asm["ptx"])
    with open(tmp + ".cubin", "wb") as f:
        f.write(k.asm["cubin"])
    try:
        info = subprocess.run([_ptxas(), "-v", "--gpu-name", ARCHS[cc][0], tmp + ".ptx", "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(os.path.dirname(_ptxas()), "cuobjdump"), "--dump-sass", tmp + ".cubin"],
                              capture_output=True, text=True).stdout
    finally:
        os.remove(tmp + ".ptx")
        os.remove(tmp + ".cubin")
    g = k.asm["ttgir"]
    row.update(
        ok=True, compile_s=round(time.time() - t0, 1), shared=int(k.metadata.shared),
        regs=int(re.search(r"Used (\d+) registers", info).group(1)),
        spill=int(re.search(r"(\d+) bytes spill stores", info).group(1)),
        wgmma=g.count("ttng.warp_group_dot "), async_copies=g.count("async_copy_global_to_local"),
        sync2d=len(re.findall(r"tt\.load [^\n]*tensor<\d+x\d+x!tt\.ptr", g)),
        instr=len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?!NOP\b)\S", sass, re.M)) or None,
        mufu=len(re.findall(r"\bMUFU\.", sass)))
    row["fits"] = row["shared"] <= ARCHS[cc][1]
    return row


def fmt(row):
    cfg = (f"BM {row['BM']} BN {row['BN']} " + ("WD" if row["WD"] else f"BK {row['BK']}") +
           (f" BDO {row['BDO']}" if row["stage"] in ("bwd", "dbl") and not row["WD"] else "") +
           (f" STRIP {row['STRIP']}" if row.get("STRIP") else "") +
           (" FLAT" if row.get("FLAT") and not row["WD"] and row["stage"] != "gtile" else "") +
           (" noQ" if not row.get("QFAST", True) and row["stage"] in ("bwd", "pre", "dbl") and row["kind"] == "lse"
            else "") +
           f" w{row['num_warps']} s{row['num_stages']}")
    head = (f"| {row['stage']} | {row['kind']}/{row['target']} | {row['dtype']} | {row['d']} | {cfg} | "
            f"{'default' if row['default'] else 'candidate'} |")
    if not row["ok"]:
        return head + f" fails: {row['error']} | | | | | | | |"
    return head + (f" {row['shared'] // 1024} KiB{'' if row['fits'] else ' (> 227: fails)'} | {row['regs']} | "
                   f"{row['spill']} | {row['async_copies']} | {row['sync2d']} | {row['wgmma']} | {row['instr']} | "
                   f"{row['mufu']} |")


HEADER = ("| stage | kind/target | dtype | d | config | | shared | regs | spill B | async | sync 2-D loads | "
          "wgmma | SASS instr | MUFU |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, nargs="+", default=[512],
                    help="d is a runtime argument: it changes the build only through WD's padded DP and BDO")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16"])
    ap.add_argument("--candidates", action="store_true",
                    help="instead of the defaults: the tuning candidates (lors_fast.ops.triton_tuning), bf16")
    ap.add_argument("--stages", nargs="+", default=None)
    ap.add_argument("--cc", type=int, default=90, choices=sorted(ARCHS),
                    help="compute capability x10: 90 H100/H200 (default), 80 A100, 89 L4/RTX 4090")
    ap.add_argument("--md", default=None, help="append the table to this markdown file")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    a = ap.parse_args(argv)
    rows = []
    print(HEADER, flush=True)
    if a.candidates:
        from lors_fast.ops.triton_tuning import CANDIDATES

        for key, cands in CANDIDATES.items():
            stage, kind, tgt = SWEEP_CASES[key]
            for ov in cands:
                for D in a.d:
                    row = compile_one(stage, kind, tgt, torch.bfloat16, D, ov, cc=a.cc)
                    rows.append(row)
                    print(fmt(row), flush=True)
        a.dtype = []
    for dt in a.dtype:
        dtype = getattr(torch, dt)
        for D in a.d:
            for stage, kind, tgt in CASES:
                if a.stages and stage not in a.stages:
                    continue
                row = compile_one(stage, kind, tgt, dtype, D, cc=a.cc)
                rows.append(row)
                print(fmt(row), flush=True)
    if a.md:
        with open(a.md, "a") as f:
            f.write(HEADER + "\n" + "\n".join(fmt(r) for r in rows) + "\n")
    if a.json:
        import json

        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
