"""`extkd data prepare`: CIFAR tarballs and MNIST idx files built in their original byte layout, prepared, compared
exactly; a pickle that would run code refused with nothing run; tfds through its mock; a run on the prepared folder."""

import gzip
import io
import os
import pathlib
import pickle
import struct
import tarfile

import numpy as np
import pytest

from extkd_jax import cli
from extkd_jax.data import prepare as prep
from extkd_jax.data.sources import open_split
from tests.tiny import tiny_config

SHARED = pathlib.Path(os.environ.get("EXTKD_DATA_DIR") or pathlib.Path(__file__).resolve().parents[2] / "shared/data")


def _sample(name: str, n: int, shape: tuple[int, ...], num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images and labels: a slice of the real test set when this workspace has it, else random ones."""
    path = SHARED / name / "test.npz"
    if path.is_file():
        with np.load(path) as f:
            x, y = f["x_test"][seed * n : (seed + 1) * n], f["y_test"][seed * n : (seed + 1) * n]
        return x.reshape(n, *shape), y.astype(np.uint8)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, num_classes, n).astype(np.uint8)


def _py2_pickle(obj) -> bytes:
    """Protocol-2 bytes as Python 2's cPickle wrote the CIFAR batches: str as SHORT_BINSTRING/BINSTRING, numpy arrays
    through numpy.core.multiarray._reconstruct with their raw bytes as a Python 2 str."""
    out = bytearray(b"\x80\x02")

    def string(b: bytes):
        out.extend(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)

    def integer(n: int):
        out.extend(b"K" + bytes([n]) if 0 <= n < 256 else b"M" + struct.pack("<H", n) if 0 <= n < 65536 else b"")
        if n < 0 or n >= 65536:
            out.extend(b"J" + struct.pack("<i", n))

    def put(v):
        if isinstance(v, dict):
            out.extend(b"}(")
            for key, value in v.items():
                put(key)
                put(value)
            out.extend(b"u")
        elif isinstance(v, list):
            out.extend(b"](")
            for value in v:
                put(value)
            out.extend(b"e")
        elif isinstance(v, str):
            string(v.encode("latin1"))
        elif isinstance(v, int):
            integer(v)
        else:  # a uint8 ndarray: _reconstruct(ndarray, (0,), 'b') then BUILD (1, shape, dtype, False, raw)
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01")
            for d in v.shape:
                integer(d)
            out.extend({1: b"\x85", 2: b"\x86", 3: b"\x87"}[v.ndim])
            out.extend(b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            out.extend(b"\x89")
            string(v.tobytes())
            out.extend(b"tb")

    put(obj)
    return bytes(out + b".")


def _tarball(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _chw_rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072))  # CIFAR's rows: R plane, G, B


def _cifar10_tarball(folder: pathlib.Path, x, y, xt, yt, batches: int = 5) -> pathlib.Path:
    members = {}
    for i, rows in enumerate(np.array_split(np.arange(len(x)), batches), start=1):
        members[f"cifar-10-batches-py/data_batch_{i}"] = _py2_pickle(
            {
                "batch_label": f"training batch {i} of 5",
                "labels": [int(v) for v in y[rows]],
                "data": _chw_rows(x[rows]),
                "filenames": [f"image_{r}.png" for r in rows],
            }
        )
    members["cifar-10-batches-py/test_batch"] = _py2_pickle(
        {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in yt], "data": _chw_rows(xt), "filenames": []}
    )
    members["cifar-10-batches-py/batches.meta"] = _py2_pickle(
        {"num_cases_per_batch": len(x) // batches, "label_names": ["airplane", "automobile"], "num_vis": 3072}
    )
    return _tarball(folder / "cifar-10-python.tar.gz", members)


def _read_folder(folder: pathlib.Path) -> dict[str, np.ndarray]:
    parts = sorted(folder.glob("train_*.npz"), key=lambda p: int(p.stem.split("_")[1]))
    x = np.concatenate([np.load(p)["x_train"] for p in parts])
    y = np.concatenate([np.load(p)["y_train"] for p in parts])
    with np.load(folder / "test.npz") as f:
        return {"x_train": x, "y_train": y, "x_test": f["x_test"], "y_test": f["y_test"], "parts": len(parts)}


def test_the_py2_style_pickle_is_what_python_reads(tmp_path):
    """The hand-written Python 2 layout is a valid pickle: the standard unpickler (our own bytes) reads it back."""
    x, y = _sample("cifar10", 4, (32, 32, 3), 10, seed=3)
    batch = pickle.loads(_py2_pickle({"data": _chw_rows(x), "labels": [int(v) for v in y]}), encoding="latin1")
    np.testing.assert_array_equal(batch["data"], _chw_rows(x))
    assert batch["labels"] == y.tolist() and batch["data"].dtype == np.uint8


def test_cifar10_tarball_round_trip_and_a_run_reads_it(tmp_path, capsys):
    x, y = _sample("cifar10", 50, (32, 32, 3), 10, seed=0)
    xt, yt = _sample("cifar10", 12, (32, 32, 3), 10, seed=5)
    tarball = _cifar10_tarball(tmp_path, x, y, xt, yt)
    out = tmp_path / "data"
    rc = cli.main(["data", "prepare", "cifar10", f"--from={tarball}", f"--out={out}", "--part-size=20"])
    assert rc == 0, capsys.readouterr().err
    assert f"EXTKD_DATA_DIR={out}" in capsys.readouterr().out
    got = _read_folder(out / "cifar10")
    assert got["parts"] == 3  # 50 images in parts of 20
    for key, want in {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}.items():
        assert got[key].dtype == np.uint8
        np.testing.assert_array_equal(got[key], want)  # CHW rows -> HWC images, exactly
    assert not list((out / "cifar10").glob("*.tmp"))
    # the engine's data loading opens it, both through --config.data.dir and $EXTKD_DATA_DIR
    split = open_split("npz", "cifar10", "train", str(out))
    np.testing.assert_array_equal(split.read(np.arange(50)), x)
    # the extracted folder (as torchvision leaves it) reads the same
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    again = prep.read_cifar(prep.epath.Path(tmp_path / "extracted"), "cifar10")
    np.testing.assert_array_equal(again["x_test"], xt)


def test_cifar100_tarball_keeps_the_fine_labels(tmp_path, capsys):
    x, _ = _sample("cifar10", 30, (32, 32, 3), 10, seed=1)
    xt, _ = _sample("cifar10", 6, (32, 32, 3), 10, seed=7)
    fine, coarse = np.arange(30) * 3 % 100, np.arange(30) % 20  # fine labels above 9: not CIFAR-10's
    members = {
        "cifar-100-python/train": _py2_pickle(
            {
                "filenames": [],
                "batch_label": "training batch 1 of 1",
                "fine_labels": [int(v) for v in fine],
                "coarse_labels": [int(v) for v in coarse],
                "data": _chw_rows(x),
            }
        ),
        "cifar-100-python/test": _py2_pickle(
            {"fine_labels": [99] * 6, "coarse_labels": [19] * 6, "data": _chw_rows(xt), "filenames": []}
        ),
        "cifar-100-python/meta": _py2_pickle({"fine_label_names": ["apple"], "coarse_label_names": ["fish"]}),
    }
    tarball = _tarball(tmp_path / "cifar-100-python.tar.gz", members)
    assert cli.main(["data", "prepare", "cifar100", f"--from={tmp_path}", f"--out={tmp_path / 'cifar100'}"]) == 0
    got = _read_folder(tmp_path / "cifar100")  # --out named like the dataset: written there, not in cifar100/cifar100
    np.testing.assert_array_equal(got["x_train"], x)
    np.testing.assert_array_equal(got["y_train"], fine)
    np.testing.assert_array_equal(got["y_test"], [99] * 6)
    assert open_split("npz", "cifar100", "test", str(tmp_path / "cifar100")).num_classes == 100
    assert tarball.is_file()


def _idx(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    return gzip.compress(struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes())


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_files_round_trip(tmp_path, name, capsys):
    x, y = _sample("mnist", 40, (28, 28), 10, seed=0)
    xt, yt = _sample("mnist", 10, (28, 28), 10, seed=9)
    raw = tmp_path / "downloads"
    raw.mkdir()
    for stem, array in [
        ("train-images-idx3-ubyte", x),
        ("train-labels-idx1-ubyte", y),
        ("t10k-images-idx3-ubyte", xt),
        ("t10k-labels-idx1-ubyte", yt),
    ]:
        (raw / f"{stem}.gz").write_bytes(_idx(array))
    assert cli.main(["data", "prepare", name, f"--from={raw}", f"--out={tmp_path / 'data'}"]) == 0
    got = _read_folder(tmp_path / "data" / name)
    np.testing.assert_array_equal(got["x_train"], x[..., None])  # NHWC
    np.testing.assert_array_equal(got["y_train"], y)
    np.testing.assert_array_equal(got["x_test"], xt[..., None])
    np.testing.assert_array_equal(got["y_test"], yt)
    # a wrong magic number is named with the file
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx(xt))
    assert cli.main(["data", "prepare", name, f"--from={raw}", f"--out={tmp_path / 'again'}"]) == 1
    err = capsys.readouterr().err
    assert "t10k-labels-idx1-ubyte.gz: magic number 2051, expected 2049" in err and "Traceback" not in err


def _code_pickle(marker: pathlib.Path) -> bytes:
    """A Python 2 style pickle whose loading calls os.system (posix.system) to create `marker`."""
    command = f"touch {marker}".encode()
    return b"\x80\x02cposix\nsystem\nU" + bytes([len(command)]) + command + b"\x85R."


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    proof = tmp_path / "the_payload_works"
    pickle.loads(_code_pickle(proof))  # our own payload, run on purpose: it does create its file
    assert proof.exists()
    marker = tmp_path / "ran"
    x, y = _sample("cifar10", 10, (32, 32, 3), 10, seed=2)
    tarball = _cifar10_tarball(tmp_path, x, y, x[:2], y[:2])
    with tarfile.open(tarball) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    members["cifar-10-batches-py/data_batch_3"] = _code_pickle(marker)
    (tmp_path / "bad").mkdir()
    bad = _tarball(tmp_path / "bad" / "cifar-10-python.tar.gz", members)
    rc = cli.main(["data", "prepare", "cifar10", f"--from={bad}", f"--out={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 1 and not marker.exists()
    assert str(bad) in err and "member cifar-10-batches-py/data_batch_3" in err and "posix.system" in err, err
    assert "Traceback" not in err and not (tmp_path / "out" / "cifar10").exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("_codecs", "encode"), ("numpy", "load")])
def test_the_unpickler_admits_only_numpys_array_reconstruction(module, name):
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    with pytest.raises(prep.UnsafePickleError, match=rf"archive.tar: member m names the global {module}\.{name}"):
        prep.load_pickle(payload, "archive.tar: member m")


def test_tfds_dataset_prepared_through_the_mock(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        folder = prep.prepare("mnist", str(tmp_path), download=False)
        want = tfds.data_source("mnist", split="test", download=False)
        want = [want[i] for i in range(len(want))]
    got = _read_folder(folder)
    assert got["x_train"].shape == (5, 28, 28, 1) and got["x_test"].dtype == np.uint8
    np.testing.assert_array_equal(got["x_test"], np.stack([r["image"] for r in want]))
    np.testing.assert_array_equal(got["y_test"], [r["label"] for r in want])


def test_bad_invocations_are_named(tmp_path, capsys):
    assert cli.main(["data", "prepare", "svhn", f"--from={tmp_path}", f"--out={tmp_path}"]) == 1
    assert "leave out --from to take 'svhn' from tensorflow-datasets" in capsys.readouterr().err
    assert cli.main(["data", "prepare", "cifar10", f"--from={tmp_path}", f"--out={tmp_path}"]) == 1
    assert "holds neither cifar-10-python.tar.gz nor its extracted cifar-10-batches-py/" in capsys.readouterr().err
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "test.npz").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already holds test.npz"):
        prep.write_npz_folder(prep.epath.Path(tmp_path / "mnist"), {})
    assert cli.main(["data"]) == 2 and "prepare" in capsys.readouterr().err
    assert cli.main(["data", "prepare", "--help"]) == 0
    assert "admits only numpy's array" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_on_a_prepared_folder(tmp_path, capsys):
    """`extkd data prepare mnist --from=idx files` then `extkd train` on it, one epoch of a tiny MLP."""
    from extkd_jax.train.loop import train_and_evaluate

    x, y = _sample("mnist", 120, (28, 28), 10, seed=1)
    raw = tmp_path / "raw"
    raw.mkdir()
    for stem, array in [("train-images", x[:100]), ("train-labels", y[:100]), ("t10k-images", x[100:])]:
        (raw / f"{stem}-idx{3 if 'images' in stem else 1}-ubyte.gz").write_bytes(_idx(array))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx(y[100:]))
    assert cli.main(["data", "prepare", "mnist", f"--from={raw}", f"--out={tmp_path / 'data'}"]) == 0
    config = tiny_config(
        tmp_path / "data",
        **{"model.kwargs.input_size": 784, "data.val_size": 20, "num_epochs": 1, "data.augment": "none"},
    )
    result = train_and_evaluate(config, tmp_path / "run", mode="train")
    assert result["epoch"] == 1 and np.isfinite(result["train_loss"]) and 0.0 <= result["test_acc"] <= 1.0, result


GS_SCRIPT = """
import json, os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from tests import gcs_server
server, url = gcs_server.start()
os.environ.update(gcs_server.environment(url))
from etils import epath
from extkd_jax import cli
from extkd_jax.data.sources import open_split
rc = cli.main(["data", "prepare", "mnist", "--from=" + sys.argv[2], "--out=gs://bucket/data", "--part-size=25"])
test, train = (open_split("npz", "mnist", s, "gs://bucket/data") for s in ("test", "train"))
np.save(sys.argv[3], test.read(np.arange(len(test))))
names = sorted(p.name for p in epath.Path("gs://bucket/data/mnist").iterdir())
print(json.dumps({"rc": rc, "files": names, "train": len(train), "origin": test.origin}))
server.stop()
"""


@pytest.mark.slow
def test_prepare_writes_a_gs_folder_that_a_run_reads(tmp_path):
    """--out=gs://... against the local GCS server of tests/gcs_server.py, read back through data.dir=gs://..."""
    import json
    import subprocess
    import sys

    for package in ("gcp_storage_emulator", "gcsfs", "tests.gcs_server"):
        pytest.importorskip(package)
    x, y = _sample("mnist", 60, (28, 28), 10, seed=4)
    raw = tmp_path / "raw"
    raw.mkdir()
    for stem, array in [("train-images-idx3", x[:50]), ("train-labels-idx1", y[:50]), ("t10k-images-idx3", x[50:])]:
        (raw / f"{stem}-ubyte.gz").write_bytes(_idx(array))
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx(y[50:]))
    (tmp_path / "gs_prepare.py").write_text(GS_SCRIPT)
    repo = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(tmp_path / "gs_prepare.py"), str(repo), str(raw), str(tmp_path / "test.npy")],
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repo)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    files = ["README.md", "test.npz", "train_0.npz", "train_1.npz"]
    assert result["rc"] == 0 and result["files"] == files, result  # no .tmp
    assert result["train"] == 50 and result["origin"] == "npz folder gs://bucket/data/mnist"
    np.testing.assert_array_equal(np.load(tmp_path / "test.npy"), x[50:, :, :, None])


def test_a_folder_says_what_its_pixels_are_and_reports_quote_it(tmp_path):
    """The data note in results.json comes from the npz folder's README (its first line), not from the dataset's
    name: a prepared folder says it holds the source's pixels, a folder whose README says its pixels were decoded from
    JPEG gives that note, and a folder without README gives none."""
    import types

    from extkd_jax.data import npz
    from extkd_jax.experiment.describe import dataset_info

    x, y = _sample("cifar10", 12, (32, 32, 3), 10, seed=0)
    xt, yt = _sample("cifar10", 4, (32, 32, 3), 10, seed=1)
    raw = _cifar10_tarball(tmp_path, x, y, xt, yt)
    assert cli.main(["data", "prepare", "cifar10", f"--from={raw}", f"--out={tmp_path / 'data'}"]) == 0
    note = npz.folder_note("cifar10", tmp_path / "data")
    assert note.startswith("cifar10, written by `extkd data prepare` from") and "unchanged" in note, note
    assert not list((tmp_path / "data" / "cifar10").glob("*.tmp"))

    lossy = tmp_path / "lossy" / "cifar10"
    lossy.mkdir(parents=True)
    (lossy / "README.md").write_text("\n# CIFAR-10: decoded from lossy JPEG\n\nmore\n")
    assert npz.folder_note("cifar10", tmp_path / "lossy") == "CIFAR-10: decoded from lossy JPEG"
    (lossy / "README.md").unlink()
    assert npz.folder_note("cifar10", tmp_path / "lossy") == ""
    assert npz.folder_note("cifar10", tmp_path / "nowhere") == ""

    config = types.SimpleNamespace(data=types.SimpleNamespace(name="cifar10", source="npz", dir=str(tmp_path / "data")))
    datasets = types.SimpleNamespace(
        num_classes=10, class_names=[], train_size=12, transfer_size=12, val=[], test=[0] * 4
    )
    assert dataset_info(config, datasets)["note"] == note
    config.data.source = "tfds"  # not read from a folder: no folder's note
    assert dataset_info(config, datasets)["note"] == ""
