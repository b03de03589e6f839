"""cm.image_datasets on a real folder of images made from scikit-learn's 8x8 digits."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from cm.image_datasets import DataError, list_image_files, load_data

N_PNG = 24


def _digit_rgb(img8):
    """An 8x8 digit (0..16) as a 32x32 RGB uint8 image with distinct channels."""
    v = np.kron(np.round(img8 * 255 / 16), np.ones((4, 4))).astype(np.uint8)
    return np.stack([v, 255 - v, v // 2], axis=-1)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """root/{a few PNGs, sub/{PNGs, a JPG, sub/deeper/{PNGs, a GIF}}} plus a stray .txt.

    Returns (root, {path: (label, HWC uint8 pixels)}).
    """
    root = tmp_path_factory.mktemp("digits")
    folders = [root, root / "sub", root / "sub" / "deeper"]
    for d in folders[1:]:
        d.mkdir()
    digits = load_digits()
    files = {}
    picked = [i for i in range(200) if not np.array_equal(digits.images[i], digits.images[i][:, ::-1])]
    for n, i in enumerate(picked[:N_PNG]):
        label = int(digits.target[i])
        arr = _digit_rgb(digits.images[i])
        path = folders[n % 3] / f"{label}_{i:04d}.png"
        Image.fromarray(arr).save(path)
        files[str(path)] = (label, arr)
    jpg = _digit_rgb(digits.images[picked[N_PNG]])
    Image.fromarray(jpg).save(root / "sub" / "3_photo.jpg", quality=95, subsampling=0)
    files[str(root / "sub" / "3_photo.jpg")] = (3, jpg)
    gif = _digit_rgb(digits.images[picked[N_PNG + 1]])
    Image.fromarray(gif[:, :, 0]).convert("P").save(root / "sub" / "deeper" / "5_anim.gif")
    files[str(root / "sub" / "deeper" / "5_anim.gif")] = (5, np.repeat(gif[:, :, :1], 3, axis=-1))
    (root / "notes.txt").write_text("not an image")
    return root, files


def _to_uint8(images):
    """NCHW [-1, 1] floats back to NHWC uint8 (exact for unresized images)."""
    return np.round((images.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)


def _one_epoch(root, n, **kw):
    """A single deterministic batch holding ``n`` images, no flips, no workers."""
    kw = {"deterministic": True, "random_flip": False, "num_workers": 0, **kw}
    return next(load_data(data_dir=str(root), batch_size=n, image_size=32, **kw))


def test_lists_every_image_recursively_sorted(digits_dir):
    """All png/jpg/gif at any depth, nothing else, names sorted within each folder."""
    root, files = digits_dir
    listed = list_image_files(str(root))
    assert sorted(listed) == sorted(files)
    top = [p for p in listed if os.path.dirname(p) == str(root)]
    assert top == sorted(top)


def test_batches_shapes_range_pixels_and_labels(digits_dir):
    """float32 NCHW in [-1, 1], pixel-exact for PNG/GIF, labels from the file names."""
    root, files = digits_dir
    listed = list_image_files(str(root))
    images, kwargs = _one_epoch(root, len(listed), class_cond=True)
    assert images.shape == (len(listed), 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1 and images.min() == -1
    assert kwargs["y"].dtype == torch.int64
    assert kwargs["y"].tolist() == [files[p][0] for p in listed]
    for img, path in zip(_to_uint8(images), listed):
        want = files[path][1]
        if path.endswith(".jpg"):
            assert np.abs(img.astype(int) - want).mean() < 8
        else:
            np.testing.assert_array_equal(img, want)
    expected = torch.from_numpy(files[listed[0]][1]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(images[0], expected)


def test_no_labels_without_class_cond(digits_dir):
    """class_cond False: the kwargs dict is empty."""
    root, _ = digits_dir
    _, kwargs = _one_epoch(root, 4)
    assert kwargs == {}


def test_two_shards_are_disjoint_and_cover(digits_dir):
    """Shard s holds files[s::2]: together every file once."""
    root, files = digits_dir
    listed = list_image_files(str(root))
    everything = _to_uint8(_one_epoch(root, len(listed))[0])
    shards = [_to_uint8(_one_epoch(root, len(listed) // 2, shard=s, num_shards=2)[0]) for s in (0, 1)]
    for s in (0, 1):
        np.testing.assert_array_equal(shards[s], everything[s::2])
    seen = sorted(x.tobytes() for shard in shards for x in shard)
    assert seen == sorted(x.tobytes() for x in everything)


def test_flip_off_is_deterministic_flip_on_mirrors(digits_dir):
    """random_flip False: identical passes. True: each image is itself or its mirror, both occur."""
    root, files = digits_dir
    n = len(files)
    a, b = _one_epoch(root, n)[0], _one_epoch(root, n)[0]
    assert torch.equal(a, b)
    stream = load_data(data_dir=str(root), batch_size=n, image_size=32, deterministic=True, num_workers=0)
    flips = []
    for _ in range(4):
        batch = next(stream)[0]
        for img, ref in zip(batch, a):
            same, mirrored = torch.equal(img, ref), torch.equal(img, ref.flip(-1))
            assert same or mirrored
            flips.append(mirrored)
    assert any(flips) and not all(flips)


def test_shuffled_stream_loops_forever_with_worker(digits_dir):
    """Default loader (shuffled, one worker) keeps going past one epoch, same images."""
    root, files = digits_dir
    stream = load_data(data_dir=str(root), batch_size=8, image_size=16, random_flip=False)
    batches = [next(stream)[0] for _ in range(7)]  # 26 files // 8 = 3 batches an epoch
    assert all(b.shape == (8, 3, 16, 16) for b in batches)
    epoch = torch.cat(batches[:3])
    assert len({x.numpy().tobytes() for x in epoch}) == 24


def test_resize_and_crop_of_a_large_image(tmp_path):
    """100x80 (left black, right white): centre crop keeps the split in the middle."""
    arr = np.zeros((80, 100, 3), np.uint8)
    arr[:, 50:] = 255
    Image.fromarray(arr).save(tmp_path / "0_big.png")
    images, _ = next(load_data(data_dir=str(tmp_path), batch_size=1, image_size=32, random_flip=False, num_workers=0))
    assert images.shape == (1, 3, 32, 32)
    assert torch.all(images[..., :14] == -1) and torch.all(images[..., 18:] == 1)
    crops = load_data(data_dir=str(tmp_path), batch_size=1, image_size=32, random_crop=True, num_workers=0)
    for _ in range(5):
        img = next(crops)[0]
        assert img.shape == (1, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
        assert img.min() == -1 and img.max() == 1  # a random crop still straddles the split


def _one_line_error(path_text, **kw):
    """load_data(**kw) raises DataError at once: one line, naming ``path_text``."""
    with pytest.raises(DataError) as info:
        load_data(image_size=32, num_workers=0, **kw)  # no next(): raised before any batch
    msg = str(info.value)
    assert "\n" not in msg and path_text in msg
    assert isinstance(info.value, ValueError)
    return msg


def test_error_missing_or_empty_folder(tmp_path):
    """Missing folder, empty data_dir flag, and a folder without images."""
    assert "not found" in _one_line_error(str(tmp_path / "nope"), data_dir=str(tmp_path / "nope"), batch_size=2)
    _one_line_error("data_dir is empty", data_dir="", batch_size=2)
    (tmp_path / "readme.txt").write_text("hi")
    (tmp_path / "sub").mkdir()
    assert "no jpg" in _one_line_error(str(tmp_path), data_dir=str(tmp_path), batch_size=2)


def test_error_class_prefix_missing(tmp_path):
    """class_cond True and a file named without '<class>_': the file is named."""
    for name in ("1_a.png", "nolabel.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    _one_line_error(str(tmp_path / "nolabel.png"), data_dir=str(tmp_path), batch_size=1, class_cond=True)
    # Without classes the same folder is fine.
    load_data(data_dir=str(tmp_path), batch_size=1, image_size=32, num_workers=0)


def test_error_undecodable_image_up_front(tmp_path):
    """Garbage or a truncated PNG is reported by load_data itself, naming the file."""
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "0_good.png")
    (tmp_path / "1_garbage.png").write_bytes(b"this is not a png at all")
    msg = _one_line_error(str(tmp_path / "1_garbage.png"), data_dir=str(tmp_path), batch_size=1)
    assert "cannot read image" in msg
    os.remove(tmp_path / "1_garbage.png")
    noise = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "2_cut.png")
    data = (tmp_path / "2_cut.png").read_bytes()
    (tmp_path / "2_cut.png").write_bytes(data[: len(data) // 2])
    _one_line_error(str(tmp_path / "2_cut.png"), data_dir=str(tmp_path), batch_size=1)


def test_error_undecodable_image_found_late_in_a_worker(tmp_path):
    """check_images=False: the worker's failure still arrives as one clean DataError line."""
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "0_good.png")
    (tmp_path / "1_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    stream = load_data(data_dir=str(tmp_path), batch_size=2, image_size=32, check_images=False, num_workers=1)
    with pytest.raises(DataError) as info:
        next(stream)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "1_bad.png") in msg and "Traceback" not in msg


def test_error_shard_smaller_than_batch(digits_dir):
    """A shard with fewer files than the batch: a clear error, not an empty endless loop."""
    root, files = digits_dir
    msg = _one_line_error(str(root), data_dir=str(root), batch_size=len(files) // 2 + 1, shard=1, num_shards=2)
    assert "fewer than batch_size" in msg
    _one_line_error(str(root), data_dir=str(root), batch_size=1, shard=2, num_shards=2)
