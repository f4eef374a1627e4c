"""--deepspeed-config: the activation_checkpointing section reaches deepspeed.checkpointing.configure; the
options compatible with TESLA's second-order pass give exactly the gradients of no checkpointing (CPU);
the others are refused with one line naming the option."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("deepspeed")

from lors_fast import LowRankSimilarity, contrastive_loss  # noqa: E402
from lors_fast.engine.tesla import SimSlicer, Student, deepspeed_ac_options, make_plan, tesla_iteration  # noqa: E402
from lors_fast.models import FlatModel, StudentSpec, build_student  # noqa: E402

N, B, K, D_TXT = 10, 4, 3, 6


from helpers import one_thread  # noqa: E402,F401  (autouse: one intra-op thread)


def _iteration(checkpoint: str, ds_config=None, chunk=None):
    g = torch.Generator().manual_seed(0)
    spec = StudentSpec(image_size=8, convnet_width=4, convnet_depth=1, text_dim=D_TXT, text_head="projection",
                       head_dropout=0.1)
    img, txt = build_student(spec, seed=0)
    fi, ft = FlatModel(img.double()), FlatModel(txt.double())
    st = Student(fi, ft, 1 / 0.07, checkpoint, deepspeed_config=ds_config)
    X = torch.randn(N, 3, 8, 8, generator=g, dtype=torch.float64)
    Y = torch.randn(N, D_TXT, generator=g, dtype=torch.float64)
    sim = LowRankSimilarity(N, 3, alpha=1.0, generator=g, dtype=torch.float64)
    with torch.no_grad():
        sim.right.copy_(0.1 * torch.randn(N, 3, generator=g, dtype=torch.float64))
    start = (fi.flat(), ft.flat())
    target = tuple(s + 0.05 * torch.randn(s.shape, generator=g, dtype=torch.float64) for s in start)
    lrs = (torch.tensor(0.05, dtype=torch.float64), torch.tensor(0.08, dtype=torch.float64))
    plan = make_plan(N, B, K, torch.Generator().manual_seed(1))

    def loss_fn(f, h, t):
        return contrastive_loss(f, h, st.logit_scale, t, kind="infonce", backend="reference")

    return tesla_iteration(st, loss_fn, X, Y, SimSlicer(sim), *lrs, start, target, plan, chunk=chunk)


COMPATIBLE = [{}, {"number_checkpoints": 2}, {"synchronize_checkpoint_boundary": True}, {"profile": True},
              {"partition_activations": False, "cpu_checkpointing": False, "contiguous_memory_optimization": False,
               "number_checkpoints": None, "synchronize_checkpoint_boundary": False, "profile": False}]


@pytest.mark.parametrize("section", COMPATIBLE, ids=lambda s: "+".join(s) or "empty")
@pytest.mark.parametrize("chunk", [None, 2])
def test_compatible_options_give_exact_second_order_gradients(tmp_path, section, chunk):
    from deepspeed.runtime.activation_checkpointing import checkpointing as ac

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "activation_checkpointing": section}))
    ours = _iteration("deepspeed", str(path), chunk)
    assert ac.SYNCHRONIZE == bool(section.get("synchronize_checkpoint_boundary"))  # configure() applied
    assert ac.PROFILE_TIME == bool(section.get("profile"))
    assert ac.num_layers == section.get("number_checkpoints")
    base = _iteration("none", None, chunk)
    for a, b in ((ours.grad_images, base.grad_images), (ours.grad_texts, base.grad_texts),
                 (ours.grad_lr_img, base.grad_lr_img), *zip(ours.grad_sim, base.grad_sim)):
        assert torch.equal(a, b), float((a - b).abs().max())
    assert float(base.grad_images.abs().max()) > 0


@pytest.mark.parametrize("section, match", [
    ({"partition_activations": True}, "partition_activations needs model parallelism"),
    ({"contiguous_memory_optimization": True}, "contiguous_memory_optimization needs partition_activations"),
    ({"profile": "yes"}, r"activation_checkpointing.profile must be true or false, got 'yes'"),
    ({"number_checkpoints": 0}, "number_checkpoints must be a positive int or null"),
    ({"offload": True}, r"unknown activation_checkpointing keys \['offload'\]"),
])
def test_refused_options_name_themselves(section, match):
    with pytest.raises(ValueError, match=match):
        deepspeed_ac_options({"activation_checkpointing": section})


def test_bad_files_and_cpu_checkpointing_on_cpu(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        deepspeed_ac_options(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        deepspeed_ac_options(str(bad))
    with pytest.raises(ValueError, match="deepspeed_config applies to checkpoint='deepspeed' only"):
        Student(None, None, 1.0, "torch", deepspeed_config={})
    # cpu_checkpointing: DeepSpeed empties the offloaded inputs, the recompute on CPU fails -> refused by distill
    from test_distributed import _cfg, make_store  # tests/ is on sys.path (pytest rootdir), as for helpers

    from lors_fast.engine.distill import Distiller

    ds = tmp_path / "cpu.json"
    ds.write_text(json.dumps({"activation_checkpointing": {"cpu_checkpointing": True}}))
    store = make_store(tmp_path)
    with pytest.raises(ValueError, match="cpu_checkpointing needs a CUDA device"):
        Distiller(_cfg(tmp_path, store, checkpoint="deepspeed", deepspeed_config=str(ds)))
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"activation_checkpointing": {"number_checkpoints": 3}}))
    d = Distiller(_cfg(tmp_path, store, checkpoint="deepspeed", deepspeed_config=str(ok)))
    from deepspeed.runtime.activation_checkpointing import checkpointing as ac

    assert ac.num_layers == 3 and d.student.checkpoint == "deepspeed"
    d.step()
