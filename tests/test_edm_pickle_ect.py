"""ECT's own training snapshots through the safe `.pkl` reader (tests/data/ect, see its README)."""

import pickle
import pickletools
import sys

import pytest
import torch

from cm.cli import UsageError
from cm.formats.edm_pickle import BoundMethodRecord, PersistentRecord, load_edm_pickle, read_snapshot
from golden import decode_weights
from song_helpers import ROOT

ECT = ROOT / "tests" / "data" / "ect"
NETS = ["ddpmpp_cond", "ncsnpp_uncond_aug9"]


def ect_weights(name):
    """The golden state_dict of ECT's network, keys without ECMPrecond's `model.` prefix."""
    blob = torch.load(ECT / f"weights_{name}.pt", weights_only=True)
    sd = decode_weights(blob)
    sd.update(blob["fixed_buffers"])
    return {k.removeprefix("model."): v for k, v in sd.items()}


@pytest.mark.parametrize("name", NETS)
def test_ect_snapshot_loads_with_exact_weights(name):
    model, flags = load_edm_pickle(ECT / f"snapshot_{name}.pkl")
    assert "torch_utils" not in sys.modules  # the embedded module source never ran
    expected = ect_weights(name)
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert flags["precond"] == "ECMPrecond" and flags["sigma_min"] == 0.003
    assert flags["augment_dim"] == (9 if "aug9" in name else 0)


def test_ect_loss_object_is_inert_data():
    snap = read_snapshot(ECT / "snapshot_ddpmpp_cond.pkl")
    loss = snap["loss_fn"]
    assert isinstance(loss, PersistentRecord) and loss.class_name == "ECMLoss"
    method = loss.state["t_to_r"]
    assert isinstance(method, BoundMethodRecord) and method.name == "t_to_r_sigmoid"
    assert method.owner.class_name == "ECMLoss" and method.owner.state is loss.state  # the self-reference
    assert loss.state["stage"] == 1 and loss.state["ratio"] == 0.75


def unframed(data):
    """The same pickle without protocol-4 FRAME opcodes, so opcodes can be spliced in."""
    out, ops = [], list(pickletools.genops(data))
    for (op, _, pos), nxt in zip(ops, ops[1:] + [(None, None, len(data))]):
        if op.name != "FRAME":
            out.append(data[pos:nxt[2]])
    return b"".join(out)


def with_prefix(data, code):
    """`code` run (and its result popped) right after the PROTO opcode of a pickle."""
    flat = unframed(data)
    return flat[:2] + code + b"0" + flat[2:]


HOSTILE = {
    "extra_global": (b"cos\nsystem\n(S'echo pwned'\ntR", "'os.system' (not on the EDM snapshot allow-list)"),
    "getattr_of_builtin": (b"cbuiltins\ngetattr\n(S'x'\nS'__class__'\ntR", "getattr on something other"),
    "getattr_of_getattr": (b"cbuiltins\ngetattr\n(cbuiltins\ngetattr\nS'__call__'\ntR", "getattr on something"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_ect_snapshot_with_a_malicious_global_is_refused(tmp_path, case):
    code, message = HOSTILE[case]
    path = tmp_path / "snapshot.pkl"
    path.write_bytes(with_prefix((ECT / "snapshot_ddpmpp_cond.pkl").read_bytes(), code))
    with pytest.raises(UsageError) as e:
        load_edm_pickle(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_unframed_snapshot_still_loads(tmp_path):
    """The splicing helper itself keeps a valid snapshot valid (so the refusals above are the payload's)."""
    path = tmp_path / "snapshot.pkl"
    path.write_bytes(with_prefix((ECT / "snapshot_ddpmpp_cond.pkl").read_bytes(), b"N"))
    model, _ = load_edm_pickle(path)
    assert pickle.loads(b"N.") is None and torch.equal(model.state_dict()["map_label.weight"],
                                                       ect_weights("ddpmpp_cond")["map_label.weight"])
