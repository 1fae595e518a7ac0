#!/usr/bin/env python3
"""Loads a pnn model file with safetensors + numpy alone and recomputes its predictions.

Usage: check_export.py MODEL.safetensors DATA_DIR PREDICTIONS.csv

PREDICTIONS.csv is what `pnn-eval --predictions` wrote for the same model and test set. Every
prediction, in both modes (thesis section 4.1), must agree. The one allowed exception is a near
tie: float32 sums in another order (numpy's matmul against pnn's GEMM) may swap two classes whose
goodness differs by less than TIE; such samples are counted and printed, and they must be rare.
Exit status 0 when the predictions agree, 1 when they do not, 3 for a layer kind this script
does not know.
"""

import gzip
import json
import os
import sys

import numpy as np
from safetensors import safe_open

TIE = 1e-4  # relative to the largest goodness magnitude of the sample


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(directory, names):
    for name in names:
        for candidate in (name + ".gz", name):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    raise SystemExit(f"none of {names} in {directory}")


def test_set(dataset, data_dir):
    """(images as uint8 [N, C*H*W] in C,H,W order, labels) of the test split."""
    if dataset in ("mnist", "fashion-mnist"):
        d = os.path.join(data_dir, dataset)
        x = read_idx(find(d, ["t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"]))
        y = read_idx(find(d, ["t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"]))
        return x.reshape(len(x), -1), y
    if dataset in ("cifar10", "cifar100"):
        label_bytes = 1 if dataset == "cifar10" else 2
        names = ["cifar-10-batches-bin", "cifar10"] if dataset == "cifar10" else ["cifar-100-binary", "cifar100"]
        d = next(os.path.join(data_dir, n) for n in names if os.path.isdir(os.path.join(data_dir, n)))
        f = "test_batch.bin" if dataset == "cifar10" else "test.bin"
        raw = np.fromfile(os.path.join(d, f), dtype=np.uint8).reshape(-1, label_bytes + 3072)
        return raw[:, label_bytes:], raw[:, label_bytes - 1]
    raise SystemExit(f"unknown dataset {dataset}")


def main():
    model_path, data_dir, csv_path = sys.argv[1:4]
    with safe_open(model_path, framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "pnn-model", meta.get("format")
    model = json.loads(meta["pnn_model"])
    images, labels = test_set(model["dataset"], data_dir)

    # x = (pixel/255 - mean_c) / std_c, in float32 as pnn computes it.
    c, h, w = model["input_shape"]
    mean = np.asarray(model["normalizer"]["mean"], dtype=np.float32)
    std = np.asarray(model["normalizer"]["std"], dtype=np.float32)
    x = images.reshape(len(images), c, h * w).astype(np.float32) / np.float32(255.0)
    x = ((x - mean[None, :, None]) / std[None, :, None]).reshape(len(images), -1)

    a = x
    goodness = []
    for l, layer in enumerate(model["layers"]):
        if layer["kind"] != "dense":
            print(f"layer {l} is {layer['kind']!r}: this check knows dense layers only")
            sys.exit(3)
        params = {p["role"]: tensors[p["name"]] for p in layer["params"]}
        a = np.maximum(a @ params["weight"].T + params["bias"], np.float32(0))
        goodness.append(a @ tensors[layer["projection"]["name"]])  # G_l = a_l M_l (eq. 1)
    cumulative = np.zeros_like(goodness[0])
    for g in goodness:
        cumulative = cumulative + g

    theirs = np.loadtxt(csv_path, delimiter=",", skiprows=1, dtype=np.int64).reshape(-1, 4)
    assert len(theirs) == len(labels), f"{len(theirs)} predictions for {len(labels)} samples"
    assert (theirs[:, 1] == labels).all(), "the labels differ: not the same test set"
    ok = True
    for column, name, g in [(2, "cumulative", cumulative), (3, "final layer", goodness[-1])]:
        mine = g.argmax(axis=1)
        differ = np.nonzero(mine != theirs[:, column])[0]
        rows = np.arange(len(g))
        gap = np.abs(g[rows, mine] - g[rows, theirs[:, column]])
        scale = np.abs(g).max(axis=1)
        ties = [i for i in differ if gap[i] <= TIE * max(scale[i], 1.0)]
        real = [i for i in differ if i not in ties]
        acc = float((mine == labels).mean())
        print(
            f"{name}: numpy accuracy {acc:.4f}, pnn accuracy {float((theirs[:, column] == labels).mean()):.4f}; "
            f"{len(labels) - len(differ)}/{len(labels)} predictions identical, "
            f"{len(ties)} near-ties, {len(real)} disagreements"
        )
        if real or len(ties) > max(1, len(labels) // 1000):
            ok = False
            for i in (real or ties)[:5]:
                print(f"  sample {i}: numpy {mine[i]}, pnn {theirs[i, column]}, goodness {g[i]}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
