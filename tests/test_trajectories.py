"""Trajectory store: round trips, sliced reads, resume semantics, corrupt files, reference importer."""

import json

import pytest
import torch

from lors_fast.engine.trajectories import SCHEMA, TrajectoryStore, import_reference_buffers

IMG = [{"name": "w", "shape": [2, 3]}, {"name": "b", "shape": [2]}]
TXT = [{"name": "lin", "shape": [4]}]


def _meta(**kw):
    return {
        "spec": {"image_arch": "convnet"},
        "encoder": "hash:4",
        "dataset": "abc123",
        "epochs": 3,
        "img_params": IMG,
        "txt_params": TXT,
        "seed": 0,
        **kw,
    }


def test_round_trip_snapshot_and_ids(tmp_path):
    st = TrajectoryStore.create(tmp_path / "s", _meta())
    g = torch.Generator().manual_seed(0)
    data = {i: (torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)) for i in (0, 2, 11)}
    for i, (a, b) in data.items():
        st.write_expert(i, a, b, info={"r_mean": float(i)}, extra={"forget_events": torch.ones(5)})
    assert st.expert_ids == [0, 2, 11] and (tmp_path / "s" / "expert_0011.safetensors").is_file()
    again = TrajectoryStore(tmp_path / "s")
    for i, (a, b) in data.items():
        ra, rb = again.read_expert(i)
        assert torch.equal(ra, a) and torch.equal(rb, b)
        for e in range(4):
            sa, sb = again.snapshot(i, e)
            assert torch.equal(sa, a[e]) and torch.equal(sb, b[e])
    extra, info = again.read_extra(2)
    assert info == {"r_mean": 2.0} and torch.equal(extra["forget_events"], torch.ones(5))
    again.finalize()
    idx = json.loads((tmp_path / "s" / "index.json").read_text())
    assert idx["experts"] == [0, 2, 11] and idx["schema"] == SCHEMA
    assert not list((tmp_path / "s").glob("*.tmp"))  # atomic writes leave no temp files


def test_create_resumes_or_refuses(tmp_path):
    TrajectoryStore.create(tmp_path, _meta())
    TrajectoryStore.create(tmp_path, _meta())  # same metadata: reopen for resuming
    with pytest.raises(ValueError, match=r"different metadata for \['epochs', 'seed'\]"):
        TrajectoryStore.create(tmp_path, _meta(epochs=4, seed=1))


def test_bad_inputs_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="trajectory store folder not found"):
        TrajectoryStore(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="index.json"):
        TrajectoryStore(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json: malformed JSON"):
        TrajectoryStore(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"schema": "other/9", "epochs": 0}))
    with pytest.raises(
        ValueError, match=r"missing key 'spec'.*schema 'other/9' is not supported.*epochs must be"
    ):
        TrajectoryStore(tmp_path)
    (tmp_path / "index.json").unlink()
    st = TrajectoryStore.create(tmp_path, _meta())
    with pytest.raises(ValueError, match=r"expected \(4, 8\) / \(4, 4\)"):
        st.write_expert(0, torch.zeros(3, 8), torch.zeros(3, 4))
    with pytest.raises(FileNotFoundError, match="expert 5 not in store"):
        st.snapshot(5, 0)
    st.write_expert(1, torch.zeros(4, 8), torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"epoch must be an int in \[0, 3\]"):
        st.snapshot(1, 4)
    p = st.path(1)
    p.write_bytes(p.read_bytes()[:-20])  # truncated
    with pytest.raises(ValueError, match="expert_0001.safetensors"):
        st.read_expert(1)
    assert not st.has_expert(1)
    p.write_bytes(b"\x00" * 7)  # garbage
    with pytest.raises(ValueError, match="expert_0001.safetensors: not a readable safetensors file"):
        st.snapshot(1, 0)


def _ref_traj(g, epochs, shapes):
    return [[torch.randn(*s, generator=g) for s in shapes] for _ in range(epochs + 1)]


def test_import_reference_pairs_by_number(tmp_path):
    src = tmp_path / "ref"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    img_shapes, txt_shapes = [(2, 3), (2,)], [(4,)]
    trajs = {}
    for n in (10, 2, 1):  # written out of order; "10" sorts before "2" as a string
        trajs[n] = (_ref_traj(g, 3, img_shapes), _ref_traj(g, 3, txt_shapes))
        torch.save([trajs[n][0]], src / f"img_replay_buffer_{n}.pt")
        torch.save([trajs[n][1]], src / f"txt_replay_buffer_{n}.pt")
    st = import_reference_buffers(
        src, tmp_path / "out", {"spec": {"image_arch": "nfnet_l0"}, "encoder": "hf:bert", "dataset": "flickr"}
    )
    assert st.expert_ids == [0, 1, 2] and st.epochs == 3
    assert [p["shape"] for p in st.meta["img_params"]] == [[2, 3], [2]]
    for eid, n in enumerate((1, 2, 10)):  # numeric order of the buffer index
        a, b = st.read_expert(eid)
        ti, tt = trajs[n]
        assert torch.equal(a, torch.stack([torch.cat([t.reshape(-1) for t in s]) for s in ti]))
        assert torch.equal(b, torch.stack([torch.cat([t.reshape(-1) for t in s]) for s in tt]))


def test_import_reference_errors(tmp_path):
    src = tmp_path / "ref"
    src.mkdir()
    with pytest.raises(FileNotFoundError, match="no img_replay_buffer"):
        import_reference_buffers(src, tmp_path / "o", {})
    g = torch.Generator().manual_seed(0)
    torch.save([_ref_traj(g, 1, [(2,)])], src / "img_replay_buffer_0.pt")
    with pytest.raises(ValueError, match=r"indices \[0\] have an img or a txt file but not both"):
        import_reference_buffers(src, tmp_path / "o", {})

    torch.save([torch.nn.Linear(2, 2)], src / "txt_replay_buffer_0.pt")  # a pickled module: refused
    with pytest.raises(
        ValueError, match=r"txt_replay_buffer_0.pt: cannot be loaded with torch.load\(weights_only=True\)"
    ):
        import_reference_buffers(src, tmp_path / "o", {"spec": {}, "encoder": "x", "dataset": "y"})


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    from lors_fast.data.io import (
        atomic_write,
        load_safetensors_checked,
        read_json_checked,
        save_safetensors_atomic,
        write_json_atomic,
    )

    p = tmp_path / "sub" / "f.bin"
    atomic_write(p, b"old")

    def boom(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(p, boom)
    assert p.read_bytes() == b"old" and sorted(x.name for x in p.parent.iterdir()) == ["f.bin"]
    atomic_write(p, lambda tmp: tmp.write_bytes(b"new"))
    assert p.read_bytes() == b"new"
    write_json_atomic({"b": 1, "a": [1, 2]}, tmp_path / "x.json")
    assert read_json_checked(tmp_path / "x.json") == {"a": [1, 2], "b": 1}
    t = {"a": torch.arange(6.0).view(2, 3)[:, 1:]}  # non-contiguous input is fine
    save_safetensors_atomic(t, tmp_path / "t.safetensors", {"k": "v"})
    got, meta = load_safetensors_checked(tmp_path / "t.safetensors")
    assert torch.equal(got["a"], t["a"]) and meta == {"k": "v"}
    with pytest.raises(ValueError, match="metadata must map str -> str"):
        save_safetensors_atomic(t, tmp_path / "u.safetensors", {"k": 1})
    with pytest.raises(ValueError, match=r"t.safetensors: missing tensors \['b'\]"):
        load_safetensors_checked(tmp_path / "t.safetensors", keys=["b"])
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_safetensors_checked(tmp_path / "nothing.safetensors")
