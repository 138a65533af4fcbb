"""Tests for extkd_jax.data: sources, splits, class dropping, augmentation and normalisation (CPU, tiny data)."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from extkd_jax.configs import base
from extkd_jax.data import (
    AUGMENTATIONS,
    TFDS_NAMES,
    ArrayDataset,
    augment_batch,
    channel_stats,
    default_augmentation,
    drop_classes,
    load_split,
    open_split,
    prepare_datasets,
    split_validation,
)
from extkd_jax.data.sources import DataNotFoundError
from extkd_jax.train.step import normalize


def _data_config(**values) -> ml_collections.ConfigDict:
    """The data block of configs/base.py (the one place defaults live) with `values` set."""
    config = base.get_config().data
    config.update(values)
    return config


SHARED_MNIST = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _make_ds(n=60, num_classes=5, hw=(4, 4), c=1, seed=0, name="toy"):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n,) + hw + (c,), dtype=np.uint8)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    return ArrayDataset(images, labels, num_classes, name)


def _write_npz_folder(root, name="toy", parts=(7, 5), n_test=4, hw=(6, 6), channels=None, num_classes=10):
    """Writes root/name/train_<k>.npz (one per entry of `parts`) and test.npz; returns the arrays."""
    folder = root / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    shape = hw if channels is None else hw + (channels,)
    xs, ys = [], []
    for k, n in enumerate(parts):
        x = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
        y = rng.integers(0, num_classes, size=n).astype(np.uint8)
        np.savez(folder / f"train_{k}.npz", x_train=x, y_train=y)
        xs.append(x)
        ys.append(y)
    xt = rng.integers(0, 256, size=(n_test,) + shape, dtype=np.uint8)
    yt = rng.integers(0, num_classes, size=n_test).astype(np.uint8)
    np.savez(folder / "test.npz", x_test=xt, y_test=yt)
    return np.concatenate(xs), np.concatenate(ys), xt, yt


# ------------------------------------------------------------------------------------------------ ArrayDataset


def test_array_dataset_validates():
    ds = _make_ds(n=6)
    assert len(ds) == 6 and ds.image_shape == (4, 4, 1)
    with pytest.raises(ValueError, match="float32, expected uint8"):
        ArrayDataset(ds.images.astype(np.float32), ds.labels, 5, "x")
    with pytest.raises(ValueError, match="int64, expected int32"):
        ArrayDataset(ds.images, ds.labels.astype(np.int64), 5, "x")
    with pytest.raises(ValueError, match="4 axes"):
        ArrayDataset(ds.images[..., 0], ds.labels, 5, "x")
    with pytest.raises(ValueError, match=r"label 4 out of range \[0, num_classes=3\)"):
        ArrayDataset(ds.images, ds.labels, 3, "x")
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        ArrayDataset(ds.images, ds.labels[:5], 5, "x")


# ------------------------------------------------------------------------------------------------------ npz


def test_npz_loads_and_concatenates_parts_in_numeric_order(tmp_path):
    x, y, xt, yt = _write_npz_folder(tmp_path, name="mnist", parts=(7, 5))
    train = load_split("npz", "mnist", "train", tmp_path)
    assert train.images.shape == (12, 6, 6, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int32 and train.num_classes == 10 and train.name == "mnist"
    np.testing.assert_array_equal(train.images[..., 0], x)
    np.testing.assert_array_equal(train.labels, y)
    test = load_split("npz", "mnist", "test", str(tmp_path / "mnist"))  # the folder itself also works
    np.testing.assert_array_equal(test.images[..., 0], xt)
    np.testing.assert_array_equal(test.labels, yt)


def test_npz_numeric_part_order_and_unknown_name_classes(tmp_path):
    # 11 parts: train_10 must come after train_9 (not after train_1).
    parts = (1,) * 11
    x, y, _, _ = _write_npz_folder(tmp_path, name="rgb", parts=parts, hw=(3, 3), channels=3, num_classes=4)
    train = load_split("npz", "rgb", "train", tmp_path)
    np.testing.assert_array_equal(train.images, x)
    assert train.image_shape == (3, 3, 3)
    # Unknown name: num_classes is max label + 1 over every file of the folder, the same for both splits.
    test = load_split("npz", "rgb", "test", tmp_path)
    assert train.num_classes == test.num_classes


def test_npz_missing_folder_and_files(tmp_path):
    with pytest.raises(
        DataNotFoundError, match=rf"no folder {tmp_path}/nowhere \(nor npz files in {tmp_path}\)"
    ) as err:
        load_split("npz", "nowhere", "train", tmp_path)
    assert "train_0.npz" in str(err.value)
    folder = tmp_path / "toy"
    folder.mkdir()
    np.savez(folder / "test.npz", x_test=np.zeros((2, 3, 3), np.uint8), y_test=np.zeros(2, np.uint8))
    with pytest.raises(FileNotFoundError, match="train_0.npz"):
        load_split("npz", "toy", "train", tmp_path)
    (folder / "test.npz").unlink()
    np.savez(folder / "train_0.npz", x_train=np.zeros((2, 3, 3), np.uint8), y_train=np.zeros(2, np.uint8))
    with pytest.raises(FileNotFoundError, match="test.npz"):
        load_split("npz", "toy", "test", tmp_path)


def test_unknown_source_name_and_split():
    with pytest.raises(ValueError, match="known sources"):
        load_split("csv", "mnist", "train")
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="unknown tfds dataset 'imagenet': tensorflow-datasets has no such"):
        load_split("tfds", "imagenet", "train")
    with pytest.raises(ValueError, match="known sklearn names"):
        load_split("sklearn", "iris", "train")
    with pytest.raises(ValueError, match="known splits"):
        load_split("sklearn", "digits", "validation")


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST folder absent")
def test_real_mnist_npz_shapes():
    test = load_split("npz", "mnist", "test", SHARED_MNIST.parent)
    assert test.images.shape == (10000, 28, 28, 1) and test.num_classes == 10
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


# ----------------------------------------------------------------------------------------------------- tfds


@pytest.mark.parametrize("name,shape,num_classes", [("mnist", (28, 28, 1), 10), ("cifar100", (32, 32, 3), 100)])
def test_tfds_under_mock(name, shape, num_classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    # USE_CODE (what AUTO falls back to) works with data_source; USE_FILES needs metadata files that TFDS lacks.
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = load_split("tfds", name, "test")
    assert ds.images.shape == (6,) + shape and ds.images.dtype == np.uint8
    assert ds.labels.shape == (6,) and ds.labels.dtype == np.int32
    assert ds.num_classes == num_classes and ds.name == name


def test_any_tfds_image_dataset_opens_not_only_the_presets(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = load_split("tfds", "svhn_cropped", "train", download=True)
    assert "svhn_cropped" not in TFDS_NAMES and ds.images.shape == (4, 32, 32, 3) and ds.num_classes == 10


# ------------------------------------------------------------------------- where a run finds its data


def _two_copies(tmp_path):
    """Two npz copies of 'mnist' told apart by their test labels: A (all 1) and B (all 2)."""
    for copy, label in (("A", 1), ("B", 2)):
        folder = tmp_path / copy / "mnist"
        folder.mkdir(parents=True)
        np.savez(folder / "train_0.npz", x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.full(3, label, np.uint8))
        np.savez(folder / "test.npz", x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.full(2, label, np.uint8))
    return tmp_path / "A", tmp_path / "B"


def test_data_dir_then_extkd_data_dir_then_tfds(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    a, b = _two_copies(tmp_path)
    monkeypatch.setenv("EXTKD_DATA_DIR", str(b))
    assert set(load_split("npz", "mnist", "test", str(a)).labels) == {1}  # data.dir first
    assert set(load_split("npz", "mnist", "test").labels) == {2}  # then $EXTKD_DATA_DIR/<name>
    monkeypatch.setenv("EXTKD_DATA_DIR", str(b / "mnist"))  # the dataset's folder itself
    assert set(load_split("npz", "mnist", "test").labels) == {2}
    # a folder of another dataset's files is not taken for mnist: tfds is next (its mock here)
    monkeypatch.setenv("EXTKD_DATA_DIR", str(b / "mnist"))
    with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
        other = open_split("npz", "cifar10", "test", None, download=False)
        assert other.origin.startswith("tfds 'cifar10'") and len(other) == 7 and other.image_shape == (32, 32, 3)
        monkeypatch.delenv("EXTKD_DATA_DIR")
        assert open_split("npz", "mnist", "train").origin.startswith("tfds 'mnist'")
        # an explicit data.dir is the only place looked at: no fallback to tfds (nor to $EXTKD_DATA_DIR)
        monkeypatch.setenv("EXTKD_DATA_DIR", str(b))
        with pytest.raises(DataNotFoundError, match="2. .*not tried: data.dir is set"):
            open_split("npz", "mnist", "train", str(tmp_path / "empty"))


def test_no_data_anywhere_names_every_way_and_the_prepare_command(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.delenv("EXTKD_DATA_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(DataNotFoundError) as err:
        load_split("npz", "mnist", "train", download=False)
    lines = str(err.value).splitlines()
    assert lines[0] == "dataset 'mnist' not found. A run takes it from the first of:"
    assert lines[1].startswith("  1. --config.data.dir=DIR") and lines[1].endswith(": not set")
    assert lines[2] == "  2. $EXTKD_DATA_DIR/mnist, an npz folder: $EXTKD_DATA_DIR is not set"
    assert lines[3].startswith("  3. tensorflow-datasets 'mnist' under $TFDS_DATA_DIR")
    assert "not prepared, and --config.data.download=False" in lines[3]
    assert "  extkd data prepare mnist --out=DIR [--from=PATH]" in lines

    # downloads allowed: tried only when the network answers (tfds's retries take minutes to fail offline)
    from extkd_jax.data import tfds_split

    calls = []

    def data_source(name, **kwargs):
        calls.append(kwargs["download"])
        raise ConnectionError("Failed to resolve 'storage.googleapis.com'")

    monkeypatch.setattr(tfds, "data_source", data_source)
    monkeypatch.setattr(tfds_split, "network_problem", lambda: "cannot reach storage.googleapis.com: no route")
    with pytest.raises(DataNotFoundError, match=r"downloading it is impossible offline \(cannot reach storage"):
        load_split("npz", "mnist", "train", download=True)
    assert calls == [False]
    monkeypatch.setattr(tfds_split, "network_problem", lambda: None)
    with pytest.raises(DataNotFoundError, match=r"downloading it failed \(ConnectionError: Failed to resolve"):
        load_split("npz", "mnist", "train", download=True)
    assert calls == [False, False, True]


def test_the_network_probe_names_an_unreachable_host(monkeypatch):
    from extkd_jax.data.tfds_split import network_problem

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert "cannot reach host.invalid" in network_problem("host.invalid", timeout_s=5)  # RFC 6761: never resolves
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert network_problem("host.invalid") is None  # behind a proxy only the download itself can tell


@pytest.mark.slow
def test_the_no_data_message_prints_without_a_traceback(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorflow_datasets")
    from extkd_jax import cli

    monkeypatch.delenv("EXTKD_DATA_DIR", raising=False)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    rc = cli.main(["train", "--config=mnist_teacher", f"--workdir={tmp_path / 'w'}", "--config.data.download=False"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("extkd train: error: dataset 'mnist' not found. A run takes it from the first of:\n")
    assert "$EXTKD_DATA_DIR/mnist" in err and "extkd data prepare mnist --out=DIR" in err


def test_a_workdir_resumes_from_another_copy_of_its_data(tmp_path):
    """data.dir and data.download say where the data is read from, not what is computed: not the workdir's identity."""
    from extkd_jax.train.workdir import check_or_write_config

    config = base.get_config()
    config.data.dir = "../shared/data/mnist"  # as the committed docs/results configs record it
    check_or_write_config(tmp_path, config, kind="train", write=True)
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')  # started
    config.data.dir, config.data.download = "", False
    check_or_write_config(tmp_path, config, kind="train", write=False)
    config.data.name = "cifar10"
    with pytest.raises(ValueError, match="data.name: 'mnist' -> 'cifar10'"):
        check_or_write_config(tmp_path, config, kind="train", write=False)


def test_tfds_not_prepared_is_file_not_found(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="not prepared in ArrayRecord"):
        load_split("tfds", "mnist", "test", tmp_path)


# -------------------------------------------------------------------------------------------------- sklearn


def test_sklearn_digits():
    train = load_split("sklearn", "digits", "train")
    test = load_split("sklearn", "digits", "test")
    assert train.images.shape == (1200, 8, 8, 1) and test.images.shape == (597, 8, 8, 1)
    assert train.images.dtype == np.uint8 and int(train.images.max()) == 255 and train.num_classes == 10
    assert set(np.unique(test.labels)) == set(range(10))
    again = load_split("sklearn", "digits", "train")
    np.testing.assert_array_equal(train.images, again.images)
    np.testing.assert_array_equal(train.labels, again.labels)


# --------------------------------------------------------------------------------------------------- splits


def test_split_validation_deterministic_disjoint_sizes():
    ds = _make_ds(n=50)
    ids = np.arange(50)
    train, val = split_validation(ds, 12, seed=3)
    assert len(train) == 38 and len(val) == 12 and val.image_shape == ds.image_shape
    # Identify examples by their (random, distinct) pixels.
    key = {ds.images[i].tobytes(): i for i in ids}
    t_ids = {key[im.tobytes()] for im in train.images}
    v_ids = {key[im.tobytes()] for im in val.images}
    assert not t_ids & v_ids and t_ids | v_ids == set(ids)
    train2, val2 = split_validation(ds, 12, seed=3)
    np.testing.assert_array_equal(val.images, val2.images)
    np.testing.assert_array_equal(train.labels, train2.labels)
    _, val3 = split_validation(ds, 12, seed=4)
    assert not np.array_equal(val.images, val3.images)
    train0, val0 = split_validation(ds, 0, seed=0)
    assert len(val0) == 0 and val0.images.shape == (0, 4, 4, 1) and len(train0) == 50
    with pytest.raises(ValueError, match="val_size 50"):
        split_validation(ds, 50, seed=0)


def test_drop_classes():
    ds = _make_ds(n=100, num_classes=5)  # 20 per class
    out = drop_classes(ds, (1, 3))
    assert not np.isin(out.labels, [1, 3]).any() and len(out) == 60 and out.num_classes == 5
    part = drop_classes(ds, (1, 3), keep_fraction=0.25, seed=7)
    counts = np.bincount(part.labels, minlength=part.num_classes)
    assert counts.tolist() == [20, 5, 20, 5, 20]
    again = drop_classes(ds, (1, 3), keep_fraction=0.25, seed=7)
    np.testing.assert_array_equal(part.images, again.images)
    assert drop_classes(ds, ()) is ds


@pytest.mark.parametrize(
    "classes,keep,match",
    [
        ((5,), 0.0, "class 5"),
        ((-1,), 0.0, "class -1"),
        ((2, 2), 0.0, "duplicates"),
        ((1,), 1.0, "keep_fraction 1.0"),
        ((1,), -0.1, "keep_fraction -0.1"),
        ((0, 1, 2, 3, 4), 0.0, "every one"),
    ],
)
def test_drop_classes_errors(classes, keep, match):
    with pytest.raises(ValueError, match=match):
        drop_classes(_make_ds(n=20), classes, keep_fraction=keep)


def test_prepare_datasets(tmp_path):
    _write_npz_folder(tmp_path, name="mnist", parts=(40, 40), n_test=30, hw=(5, 5))
    cfg = _data_config(source="npz", name="mnist", dir=str(tmp_path), val_size=10, drop_classes=(2, 7))
    d = prepare_datasets(cfg)
    train_labels = d.plan.train_source.labels[d.plan.train]
    assert d.train_size == 70 and len(d.val) == 10 and len(d.test) == 30
    assert d.drop_classes == (2, 7) and d.num_classes == 10
    assert not np.isin(d.transfer.labels, [2, 7]).any()
    assert len(d.transfer) == d.transfer_size == int((~np.isin(train_labels, [2, 7])).sum())
    assert np.isin(train_labels, [2, 7]).any() and np.isin(d.test.labels, [2, 7]).any()
    assert d.val.num_classes == d.test.num_classes == 10
    # one process's share of the transfer set: exactly those rows of the whole, and only they are read
    share = prepare_datasets(cfg, transfer_rows=slice(5, 15))
    np.testing.assert_array_equal(share.transfer.images, d.transfer.images[5:15])
    np.testing.assert_array_equal(share.transfer.labels, d.transfer.labels[5:15])
    assert share.transfer_size == d.transfer_size and share.transfer_rows == slice(5, 15)
    # Empty transfer set is an error.
    cfg2 = _data_config(source="npz", name="one", dir=str(tmp_path), val_size=0, drop_classes=(0,))
    folder = tmp_path / "one"
    folder.mkdir()
    np.savez(folder / "train_0.npz", x_train=np.zeros((3, 2, 2), np.uint8), y_train=np.zeros(3, np.uint8))
    np.savez(folder / "test.npz", x_test=np.zeros((2, 2, 2), np.uint8), y_test=np.array([0, 1], np.uint8))
    with pytest.raises(ValueError, match="transfer set is empty"):
        prepare_datasets(cfg2)


def test_npz_images_are_read_by_row_when_stored_and_whole_when_compressed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 6, 6, 3), dtype=np.uint8)
    y = (np.arange(50) % 10).astype(np.uint8)
    for folder, save in (("stored", np.savez), ("compressed", np.savez_compressed)):
        (tmp_path / folder).mkdir()
        save(tmp_path / folder / "train_0.npz", x_train=x, y_train=y)
        save(tmp_path / folder / "test.npz", x_test=x[:5], y_test=y[:5])
    stored = open_split("npz", "stored", "train", str(tmp_path))
    compressed = open_split("npz", "compressed", "train", str(tmp_path))
    assert stored.bytes_read == 0 and compressed.bytes_read == x.nbytes  # a compressed member is read whole
    rows = np.array([40, 3, 17, 3])
    np.testing.assert_array_equal(stored.read(rows), x[rows])
    np.testing.assert_array_equal(compressed.read(rows), x[rows])
    assert stored.bytes_read == 4 * x[0].nbytes  # only the rows asked for
    np.testing.assert_array_equal(stored.labels, y)


# -------------------------------------------------------------------------------------------------- augment


def _find_transform(orig, out, pad, allow_flip):
    """All (dy, dx, flip) such that out == flip?(shift of zero-padded orig by crop offset (dy, dx))."""
    h, w, _ = orig.shape
    padded = np.pad(orig, ((pad, pad), (pad, pad), (0, 0)))
    found = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            for flip in (False, True) if allow_flip else (False,):
                if np.array_equal(crop[:, ::-1] if flip else crop, out):
                    found.append((dy - pad, dx - pad, flip))
    return found


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.integers(1, 256, size=(16, 8, 8, 3), dtype=np.uint8)  # no zero pixels: padding is recognisable


def test_augment_cifar_is_shifted_flipped_copy(batch):
    fn = jax.jit(augment_batch, static_argnames="kind")
    offsets, flips = set(), set()
    for seed in (0, 1):
        out = np.asarray(fn(jax.random.key(seed), batch, kind="cifar"))
        assert out.dtype == np.uint8 and out.shape == batch.shape
        for i in range(len(batch)):
            found = _find_transform(batch[i], out[i], pad=4, allow_flip=True)
            assert len(found) == 1, (seed, i, found)
            offsets.add(found[0][:2])
            flips.add(found[0][2])
    assert flips == {False, True} and len(offsets) > 5


def test_augment_mnist_jitter_within_two_pixels(batch):
    gray = batch[..., :1]
    out = np.asarray(augment_batch(jax.random.key(3), gray, "mnist"))
    assert out.dtype == np.uint8 and out.shape == gray.shape
    shifts = set()
    for i in range(len(gray)):
        found = _find_transform(gray[i], out[i], pad=2, allow_flip=False)
        assert len(found) == 1 and max(abs(found[0][0]), abs(found[0][1])) <= 2
        shifts.add(found[0][:2])
    assert len(shifts) > 3


def test_augment_reproducible_and_position_based(batch):
    key = jax.random.key(5)
    a = np.asarray(augment_batch(key, batch, "cifar"))
    np.testing.assert_array_equal(a, np.asarray(augment_batch(key, batch, "cifar")))
    # Example i's result depends only on the key and its position, not on the other examples.
    other = batch.copy()
    other[1:] = batch[::-1][:-1]
    b = np.asarray(augment_batch(key, other, "cifar"))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a, np.asarray(augment_batch(jax.random.key(6), batch, "cifar")))
    np.testing.assert_array_equal(np.asarray(augment_batch(key, batch, "none")), batch)
    with pytest.raises(ValueError, match="known kinds"):
        augment_batch(key, batch, "rotate")
    assert set(AUGMENTATIONS) == {"cifar", "mnist", "flip", "none"}
    assert [default_augmentation(n) for n in ("cifar10", "cifar100", "mnist", "fashion_mnist", "digits")] == [
        "cifar",
        "cifar",
        "mnist",
        "mnist",
        "none",
    ]


def test_channel_stats_and_normalize():
    ds = _make_ds(n=10, c=3)
    mean, std = channel_stats(ds, chunk=3)
    x = ds.images.astype(np.float64)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-5)
    assert mean.dtype == np.float32 and mean.shape == (3,)
    y = jax.jit(normalize, static_argnums=3)(ds.images, mean, std, jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), (x - mean) / std, rtol=1e-5, atol=1e-5)
    flat = np.asarray(y).reshape(-1, 3)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(0), 1.0, atol=1e-4)
