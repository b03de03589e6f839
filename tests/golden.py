"""Loading the golden files produced by the original implementation (tests/data/)."""

import json
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"


def load_cases():
    return json.loads((DATA / "cases.json").read_text())


def case(name):
    return next(c for c in load_cases()["cases"] if c["name"] == name)


def decode_weights(blob):
    """Unpack the int4-packed golden weights into a float32 state_dict (see cases.json)."""
    packed = blob["packed"].to(torch.int16)
    codes = torch.stack([packed & 15, packed >> 4], dim=1).reshape(-1) - 7
    sd = {}
    for e in blob["index"]:
        n = 1
        for s in e["shape"]:
            n *= s
        q = codes[2 * e["start"] : 2 * e["start"] + n].to(torch.float32)
        sd[e["key"]] = (e["offset"] + q * e["step"]).reshape(e["shape"])
    return sd


def golden_state_dict(config):
    return decode_weights(torch.load(DATA / f"weights_{config}.pt", weights_only=True))


def inputs():
    return torch.load(DATA / "inputs.pt", weights_only=True)


def expected():
    return torch.load(DATA / "expected.pt", weights_only=True)


def read_manifest(name="manifest_full.txt"):
    """[(key, shape tuple)] in file order."""
    rows = []
    for line in (DATA / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(",")) if shape else ()))
    return rows
