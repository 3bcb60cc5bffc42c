"""trainer.data: folder scan, odd files, the decode cache, fingerprints, the seeded split, batches."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_support import truncated_pngs
from PIL import Image

import trainer.data as data_mod
from carvae.preprocess import PreprocessPolicy, prepare, to_tensor
from trainer.data import (
    DataError,
    augment,
    data_fingerprint,
    epoch_batches,
    load_folder,
    load_synthetic,
    make_split,
    parse_augment,
    scan_images,
    to_batch,
)

POLICY = PreprocessPolicy(image_size=16)
SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # ../shared seen from the project root
REAL_PHOTOS = SHARED / "datasets" / "stanford-cars-dev" / "images"


def _save(path: Path, img: Image.Image, fmt: str, **kw: object) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _halves(w: int, h: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2 :] = right
    return Image.fromarray(arr, "RGB")


RED, BLUE = (220, 20, 20), (20, 20, 220)


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    """One folder with every kind of file a user's photo folder contains."""
    root = tmp_path / "photos"
    rgb = _halves(40, 30, RED, BLUE)
    _save(root / "a_plain.jpg", rgb, "JPEG", quality=95)
    _save(root / "nested" / "deeper" / "B_UPPER.JPG", rgb, "JPEG")
    _save(root / "c.png", rgb, "PNG")
    _save(root / "d.webp", rgb, "WEBP")
    _save(root / "e.bmp", rgb, "BMP")
    _save(root / "f.tiff", rgb, "TIFF")
    frames = [_halves(24, 24, RED, BLUE), _halves(24, 24, BLUE, RED)]
    frames[0].save(root / "g_anim.gif", save_all=True, append_images=frames[1:], duration=50)
    _save(root / "h_cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    grad16 = (np.tile(np.linspace(0, 65535, 32), (32, 1))).astype(np.uint16)
    _save(root / "i_16bit.png", Image.fromarray(grad16), "PNG")
    pal = Image.new("P", (24, 24), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (12, 0, 24, 24))  # right half index 1 (blue), left half index 0 (red) ...
    _save(root / "j_palette_alpha.png", pal, "PNG", transparency=0)  # ... and index 0 is transparent
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the stored left (red) edge becomes the top
    _save(root / "k_exif_rotated.jpg", _halves(40, 20, RED, BLUE), "JPEG", exif=exif.tobytes())
    _save(root / "l_huge.jpg", Image.new("RGB", (4000, 3000), (40, 160, 90)), "JPEG", quality=70)
    # files that must be skipped and counted, never crash the run
    _save(root / "m_tiny.png", Image.new("RGB", (4, 4)), "PNG")
    (root / "n_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(200))
    good = _save(root / "tmp.jpg", rgb, "JPEG")
    (root / "tmp.jpg").unlink()
    (root / "o_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "p_text.png").write_text("this is not an image")
    (root / "q_empty.webp").write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


KEPT = [
    "a_plain.jpg", "c.png", "d.webp", "e.bmp", "f.tiff", "g_anim.gif", "h_cmyk.jpg", "i_16bit.png",
    "j_palette_alpha.png", "k_exif_rotated.jpg", "l_huge.jpg", "nested/deeper/B_UPPER.JPG",
]  # fmt: skip


def test_scan_is_recursive_case_insensitive_and_sorted(odd_folder: Path) -> None:
    names = [p.relative_to(odd_folder).as_posix() for p in scan_images(odd_folder)]
    assert names == sorted(names)
    assert "nested/deeper/B_UPPER.JPG" in names and "notes.txt" not in names
    assert len(names) == len(KEPT) + 5  # the kept ones + five unusable image-named files


def test_odd_files_are_decoded_or_skipped_and_counted(
    odd_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="trainer"):
        ds = load_folder(odd_folder, POLICY)
    assert ds.images.shape == (len(KEPT), 16, 16, 3) and ds.images.dtype == torch.uint8
    assert ds.source["skipped"] == 5 and ds.source["files"] == len(KEPT) + 5
    reasons = ds.source["skipped_reasons"]
    assert reasons["image_too_small"] == 1 and reasons["empty_file"] == 1
    assert reasons["unsupported_media_type"] == 1 and reasons.get("corrupt_image", 0) >= 2
    assert "skipped 5" in caplog.text
    by_name = dict(zip(KEPT, ds.images.numpy(), strict=True))
    # every kept file is exactly what the service's prepare() makes of the same bytes
    for name in KEPT:
        np.testing.assert_array_equal(by_name[name], prepare((odd_folder / name).read_bytes(), POLICY))
    # EXIF orientation applied: red on top, blue at the bottom (not left/right as stored)
    rot = by_name["k_exif_rotated.jpg"].astype(int)
    assert rot[:6, :, 0].mean() > 150 and rot[:6, :, 2].mean() < 80
    assert rot[-6:, :, 2].mean() > 150 and rot[-6:, :, 0].mean() < 80
    # 16-bit greyscale scaled to 8 bits (not clipped to white): a dark-to-light ramp
    g = by_name["i_16bit.png"].astype(int)
    assert g[:, 0].mean() < 30 and g[:, -1].mean() > 225 and (g[..., 0] == g[..., 2]).all()
    # palette + transparency: the transparent half composited on white, the opaque half stays blue
    p = by_name["j_palette_alpha.png"].astype(int)
    assert (p[:, :6] > 240).all() and p[:, -6:, 2].mean() > 240 and p[:, -6:, 0].mean() < 15
    # CMYK converted to RGB: still red on the left
    c = by_name["h_cmyk.jpg"].astype(int)
    assert c[:, :6, 0].mean() > 150 and c[:, :6, 2].mean() < 100
    # the 12-megapixel photo is kept, resized whole
    assert np.abs(by_name["l_huge.jpg"].astype(int) - (40, 160, 90)).max() <= 3


def test_folder_without_usable_images_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "missing", POLICY)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_folder(tmp_path / "empty", POLICY)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 1 image files"):
        load_folder(tmp_path / "bad", POLICY)


def test_truncated_pngs_are_skipped_and_counted_as_corrupt(tmp_path: Path) -> None:
    """Pillow decodes these without an error (the missing rows black); training on them would teach the
    model blank photos, so they are skipped like any other unreadable file."""
    _save(tmp_path / "whole.png", _halves(40, 30, RED, BLUE), "PNG")
    cases = truncated_pngs()
    for name, data in cases.items():
        (tmp_path / f"{name}.png").write_bytes(data)
    ds = load_folder(tmp_path, POLICY)
    assert len(ds.images) == 1
    assert ds.source["skipped"] == len(cases) and ds.source["skipped_reasons"] == {
        "corrupt_image": len(cases)
    }


def test_second_load_comes_from_the_cache_without_decoding(
    odd_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "cache"
    first = load_folder(odd_folder, POLICY, cache_dir=cache)
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy"]  # numpy + json, no pickle
    np.load(next(cache.glob("*.npy")), allow_pickle=False)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(data_mod, "prepare", no_decoding)
    second = load_folder(odd_folder, POLICY, cache_dir=cache)
    assert torch.equal(first.images, second.images) and second.source["skipped"] == first.source["skipped"]
    assert second.fingerprint == first.fingerprint

    # a changed file, or another policy, misses the cache (and so must decode)
    monkeypatch.undo()
    calls: list[str] = []

    def counting_prepare(data: bytes, *rest: object) -> np.ndarray:
        calls.append("decoded")
        return prepare(data, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(data_mod, "prepare", counting_prepare)
    _save(odd_folder / "c.png", _halves(40, 30, BLUE, RED), "PNG")
    load_folder(odd_folder, POLICY, cache_dir=cache)
    assert calls
    calls.clear()
    load_folder(odd_folder, PreprocessPolicy(image_size=16, resize="center-crop"), cache_dir=cache)
    assert calls


@pytest.mark.parametrize(("npy", "meta"), [(b"", None), (None, b"[1]"), (None, b'{"count": COUNT}')])
def test_a_damaged_cache_entry_is_decoded_again(
    odd_folder: Path, tmp_path: Path, npy: bytes | None, meta: bytes | None
) -> None:
    """An emptied .npy (np.load raises EOFError) or a .json that is not the entry's record was a
    traceback; it is a cache miss, and the entry is rewritten."""
    cache = tmp_path / "cache"
    first = load_folder(odd_folder, POLICY, cache_dir=cache)
    if npy is not None:
        next(cache.glob("*.npy")).write_bytes(npy)
    if meta is not None:
        meta_file = next(cache.glob("*.json"))
        meta_file.write_bytes(
            meta.replace(b"COUNT", str(json.loads(meta_file.read_text())["count"]).encode())
        )
    again = load_folder(odd_folder, POLICY, cache_dir=cache)
    assert torch.equal(first.images, again.images) and again.source == first.source
    assert torch.equal(load_folder(odd_folder, POLICY, cache_dir=cache).images, first.images)


def test_unwritable_cache_is_only_a_warning(odd_folder: Path, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ds = load_folder(odd_folder, POLICY, cache_dir=blocker / "cache")
    assert len(ds) == len(KEPT) and "could not write the decode cache" in caplog.text


def test_parallel_decoding_equals_serial(tmp_path: Path) -> None:
    root = tmp_path / "many"
    rng = np.random.default_rng(0)
    for i in range(70):  # above the size where the worker pool is used
        _save(
            root / f"{i:03d}.png", Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)), "PNG"
        )
    (root / "050_bad.png").write_bytes(b"nope")
    serial = load_folder(root, POLICY, workers=1)
    parallel = load_folder(root, POLICY, workers=2)
    assert torch.equal(serial.images, parallel.images) and parallel.source["skipped"] == 1


def test_fingerprint_follows_content_not_location(odd_folder: Path, tmp_path: Path) -> None:
    fp = data_fingerprint(str(odd_folder), 16, 0)
    assert fp == load_folder(odd_folder, POLICY).fingerprint
    moved = tmp_path / "moved"
    odd_folder.rename(moved)
    assert data_fingerprint(str(moved), 16, 0) == fp
    (moved / "c.png").rename(moved / "c2.png")
    assert data_fingerprint(str(moved), 16, 0) != fp
    assert data_fingerprint("synthetic", 64, 100) != data_fingerprint("synthetic", 64, 101)


def test_synthetic_data_is_deterministic_and_parallel_equals_serial(tmp_path: Path) -> None:
    a = load_synthetic(300, 16, workers=1)
    b = load_synthetic(300, 16, workers=2, cache_dir=tmp_path)
    c = load_synthetic(300, 16, cache_dir=tmp_path)  # from the cache
    assert a.images.shape == (300, 16, 16, 3)
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    assert a.fingerprint == b.fingerprint and a.source["source"] == "synthetic"


def test_split_is_seeded_disjoint_and_complete() -> None:
    s1, s2, s3 = make_split(100, 0.1, seed=0), make_split(100, 0.1, seed=0), make_split(100, 0.1, seed=1)
    assert len(s1.val) == 10 and len(s1.train) == 90
    assert np.array_equal(s1.val, s2.val) and s1.val_hash == s2.val_hash
    assert not np.array_equal(s1.val, s3.val) and s1.val_hash != s3.val_hash
    assert set(s1.train).isdisjoint(s1.val) and set(s1.train) | set(s1.val) == set(range(100))
    assert s1.describe() == {"seed": 0, "val_fraction": 0.1, "train": 90, "val": 10, "val_hash": s1.val_hash}
    assert len(make_split(3, 0.01, 0).val) == 1  # at least one validation image
    with pytest.raises(DataError):
        make_split(1, 0.1, 0)
    with pytest.raises(ValueError):
        make_split(10, 0.0, 0)


def test_epoch_batches_cover_the_train_set_in_a_seeded_order() -> None:
    train = np.arange(0, 200, 2)  # 100 indices
    b0 = epoch_batches(train, epoch=0, seed=5, batch_size=16)
    assert len(b0) == 6 and all(len(b) == 16 for b in b0)  # the partial 7th batch is dropped
    seen = np.concatenate(b0)
    assert len(set(seen)) == 96 and set(seen) <= set(train)
    again = epoch_batches(train, epoch=0, seed=5, batch_size=16)
    assert all(np.array_equal(x, y) for x, y in zip(b0, again, strict=True))
    assert not np.array_equal(np.concatenate(epoch_batches(train, 1, 5, 16)), seen)
    # two ranks: same number of batches, different images
    r0, r1 = epoch_batches(train, 0, 5, 16, 0, 2), epoch_batches(train, 0, 5, 16, 1, 2)
    assert len(r0) == len(r1) == 3 and set(np.concatenate(r0)).isdisjoint(np.concatenate(r1))
    assert len(epoch_batches(train[:5], 0, 5, 16)) == 1  # fewer images than a batch: one short batch


def test_batches_use_the_service_conversion() -> None:
    images = torch.randint(0, 256, (10, 8, 8, 3), dtype=torch.uint8)
    idx = np.array([3, 1, 7])
    x = to_batch(images, idx, torch.device("cpu"), channels_last=True)
    torch.testing.assert_close(x, to_tensor(images[[3, 1, 7]]))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_augmentation_is_opt_in_and_hflip_flips() -> None:
    assert parse_augment(None) == () and parse_augment("none") == () and parse_augment("") == ()
    assert parse_augment("hflip, shift") == ("hflip", "shift")
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_augment("rotate")
    x = torch.rand(32, 3, 8, 8)
    assert augment(x, (), torch.Generator()) is x
    out = augment(x, ("hflip",), torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(out[i], x[i].flip(-1))) for i in range(32)]
    kept = [bool(torch.equal(out[i], x[i])) for i in range(32)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 4 < sum(flipped) < 28
    shifted = augment(x, ("shift", "color"), torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape and shifted.min() >= 0 and shifted.max() <= 1


@pytest.mark.skipif(not REAL_PHOTOS.is_dir(), reason="../shared/datasets/stanford-cars-dev is not here")
def test_real_car_photos_decode_exactly_as_the_service_does(tmp_path: Path) -> None:
    photos = sorted(REAL_PHOTOS.iterdir())[:24]
    for p in photos:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    ds = load_folder(tmp_path, PreprocessPolicy(image_size=64))
    assert ds.images.shape == (24, 64, 64, 3) and ds.source["skipped"] == 0
    first = prepare(photos[0].read_bytes(), PreprocessPolicy(image_size=64))
    np.testing.assert_array_equal(ds.images[0].numpy(), first)


def _deny_listing(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Listing `folder` fails as it does for a chmod 700 folder of another user (root reads them all)."""
    real = os.scandir

    def scandir(path: str) -> object:
        if Path(path) == folder:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_folder_is_named_not_silently_left_out(odd_folder: Path, monkeypatch, caplog) -> None:
    """os.walk drops a folder it cannot list without a word: its photos vanished from the run, and an
    unreadable --data said "no images under" it."""
    _deny_listing(monkeypatch, odd_folder / "nested")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        files = scan_images(odd_folder)
    assert not any("nested" in p.as_posix() for p in files) and files
    assert f"cannot read folder {odd_folder / 'nested'} (Permission denied); its photos are skipped" in (
        caplog.text
    )
    _deny_listing(monkeypatch, odd_folder)
    with pytest.raises(
        DataError, match=f"^cannot read data folder {re.escape(str(odd_folder))}: Permission denied$"
    ):
        load_folder(odd_folder, POLICY)


def test_a_folder_that_cannot_be_searched_is_named_not_a_crash(odd_folder: Path, monkeypatch, caplog) -> None:
    """Without search permission on a folder (chmod 700 of another user, or 000), even the stat of a name
    inside it fails with EACCES. The run-folder check looked there first and ended the whole run with
    "error: [Errno 13] Permission denied: '…/nested/run.json'" instead of skipping the folder."""
    locked = odd_folder / "nested"
    real_scandir, real_stat = os.scandir, os.stat

    def scandir(path: str) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if Path(os.fsdecode(path)).parent == locked:  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", path)
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ds = load_folder(odd_folder, POLICY)
    assert len(ds) > 0
    assert f"cannot read folder {locked} (Permission denied); its photos are skipped" in caplog.text


def test_decoding_bar_in_a_log_file_redraws_rarely(tmp_path: Path, monkeypatch, capsys) -> None:
    """Off a terminal every redraw of a bar is a line of the log; the epoch bar redraws every 30 s there,
    the decoding bar kept tqdm's 0.1 s: ten lines a second while a large folder decoded."""
    rgb = _halves(8, 8, RED, BLUE)
    for i in range(40):
        _save(tmp_path / f"{i:02d}.png", rgb, "PNG")
    real = data_mod._decode_file

    def slow(args: tuple[str, dict[str, object]]) -> tuple[np.ndarray | None, str | None]:
        time.sleep(0.02)
        return real(args)

    monkeypatch.setattr(data_mod, "_decode_file", slow)
    assert len(load_folder(tmp_path, POLICY, workers=1, progress=True)) == 40  # 0.8 s of decoding
    redraws = re.findall(r"decoding:\s+\d+%", capsys.readouterr().err)
    assert redraws and len(redraws) <= 2, redraws  # the first draw, and at most one timed redraw


def test_hidden_files_and_folders_are_not_training_photos(tmp_path: Path) -> None:
    """A folder copied from a Mac to a USB stick holds an AppleDouble "._IMG_1.jpg" beside every photo, and
    photo managers keep thumbnails in hidden folders (.thumbnails). The scan took them as photos: the
    AppleDouble files were skipped as unsupported (half the folder, in the skipped count) and the
    thumbnails trained as duplicates of the photos, some of them across the validation split."""
    rgb = _halves(24, 24, RED, BLUE)
    _save(tmp_path / "IMG_1.jpg", rgb, "JPEG")
    _save(tmp_path / "sub" / "IMG_2.png", rgb, "PNG")
    (tmp_path / "._IMG_1.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    _save(tmp_path / ".thumbnails" / "IMG_1.png", rgb, "PNG")
    _save(tmp_path / "sub" / ".hidden.jpg", rgb, "JPEG")
    names = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path)]
    assert names == ["IMG_1.jpg", "sub/IMG_2.png"]
    ds = load_folder(tmp_path, POLICY)
    assert len(ds) == 2 and ds.source["files"] == 2 and ds.source["skipped"] == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_scan_keeps_regular_files_and_dangling_links_only(tmp_path: Path) -> None:
    rgb = _halves(24, 24, RED, BLUE)
    _save(tmp_path / "a.png", rgb, "PNG")
    os.mkfifo(tmp_path / "fifo.jpg")  # reading it would block the trainer forever
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "linked.png").symlink_to(tmp_path / "a.png")
    names = [p.name for p in scan_images(tmp_path)]
    assert names == ["a.png", "dangling.png", "linked.png"]
    ds = load_folder(tmp_path, POLICY)  # and so it loads instead of hanging
    assert len(ds) == 2 and ds.source["skipped_reasons"] == {"unreadable": 1}


def test_scan_follows_linked_folders_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A data set assembled from links to other folders (`ln -s /data/sedans photos/sedans`) lost every
    photo behind a link without a word. They are followed; a folder reached a second time (a loop back
    up, two links to one folder) is scanned once, so nothing recurses or trains twice across the split."""
    rgb = _halves(24, 24, RED, BLUE)
    root, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    _save(root / "own" / "a.png", rgb, "PNG")
    _save(elsewhere / "b.png", rgb, "PNG")
    (root / "cars-link").symlink_to(elsewhere)
    (root / "same-cars-link").symlink_to(elsewhere)
    (root / "own" / "loop").symlink_to(root)
    with caplog.at_level(logging.INFO, logger="trainer"):
        ds = load_folder(root, POLICY)
    names = [p.relative_to(root).as_posix() for p in scan_images(root)]
    assert names == ["cars-link/b.png", "own/a.png"]
    assert len(ds) == 2
    said = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert said == [
        f"data: skipping {root / 'same-cars-link'} (the same folder as {root / 'cars-link'}, scanned once)",
        f"data: skipping {root / 'own' / 'loop'} (the same folder as {root}, scanned once)",
    ]
    # The run's own --out reached through a link is left out as it is when typed inside the data.
    _save(elsewhere / "run" / "c.png", rgb, "PNG")
    assert [p.name for p in scan_images(root, elsewhere / "run")] == ["b.png", "a.png"]


def test_scan_skips_training_run_folders_inside_the_data(tmp_path: Path) -> None:
    rgb = _halves(24, 24, RED, BLUE)
    _save(tmp_path / "cars" / "a.png", rgb, "PNG")
    fingerprint = data_fingerprint(str(tmp_path), 16, 0)
    for marker in ("run.json", "train_state.pt", "model.safetensors"):
        run = tmp_path / f"run-{marker}"  # a --out inside --data, with the images a run writes
        _save(run / "samples.png", rgb, "PNG")
        _save(run / "nested" / "loss.png", rgb, "PNG")
        (run / marker).write_bytes(b"{}")
    _save(tmp_path / "no-run" / "b.png", rgb, "PNG")  # a folder of photos is still scanned
    names = [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path)]
    assert names == ["cars/a.png", "no-run/b.png"]
    (tmp_path / "no-run" / "b.png").unlink()
    assert data_fingerprint(str(tmp_path), 16, 0) == fingerprint


def test_scan_leaves_out_the_runs_own_folder_before_it_holds_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A --out inside --data that holds no run yet (a first run, or a folder of photos picked as --out)
    was scanned as photos, and skipped once it held a run: the data changed between two runs."""
    rgb = _halves(24, 24, RED, BLUE)
    root = tmp_path / "photos"
    _save(root / "a.png", rgb, "PNG")
    _save(root / "sedans" / "b.png", rgb, "PNG")
    _save(root / "sedans-2" / "c.png", rgb, "PNG")  # a neighbour whose name starts the same: still photos
    alone = data_fingerprint(str(root), 16, 0, root / "sedans")
    assert [p.name for p in scan_images(root, root / "sedans")] == ["a.png", "c.png"]
    everything = [p.name for p in scan_images(root)]
    (root / "sedans" / "run.json").write_text("{}")  # once it holds a run, the data is still the same
    assert data_fingerprint(str(root), 16, 0) == alone
    (root / "sedans" / "run.json").unlink()
    # however --out is typed: relative to the current directory, or through a link from outside the data
    (tmp_path / "runs").symlink_to(root)
    monkeypatch.chdir(tmp_path)
    for typed in (Path("photos/sedans"), tmp_path / "runs" / "sedans", root / "sedans" / ".." / "sedans"):
        assert data_fingerprint(str(root), 16, 0, typed) == alone
    assert [p.name for p in scan_images(root, tmp_path / "elsewhere")] == everything
    assert len(everything) == 3
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert len(load_folder(root, POLICY, run_dir=root / "sedans")) == 2
    said = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert said == [f"data: skipping {root / 'sedans'} (this run's --out folder, not photos)"]


def _worker_is_quiet() -> bool:
    return (
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    )


def _decode_reporting_signals(args: object) -> tuple[None, str]:
    return None, "quiet" if _worker_is_quiet() else "inherited"


def _chunk_reporting_signals(args: tuple[int, int, int]) -> np.ndarray:
    _, n, size = args
    return np.full((n, size, size, 3), int(_worker_is_quiet()), np.uint8)


def test_worker_processes_do_not_inherit_the_trainer_signal_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m trainer` turns SIGTERM into KeyboardInterrupt, and leaving a worker pool sends its
    workers SIGTERM: workers that inherited the handler printed a KeyboardInterrupt traceback each on
    every parallel decode. They must die quietly on SIGTERM and leave Ctrl-C to the parent."""
    from trainer.__main__ import _stop_like_ctrl_c

    root = tmp_path / "many"
    for i in range(70):  # above the size where the worker pool is used
        _save(root / f"{i:03d}.png", _halves(24, 20, RED, BLUE), "PNG")
    monkeypatch.setattr(data_mod, "_decode_file", _decode_reporting_signals)
    monkeypatch.setattr(data_mod, "_synthetic_chunk", _chunk_reporting_signals)
    previous = signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    try:
        _, reasons = data_mod._decode_all(scan_images(root), POLICY, workers=2, progress=False)
        rendered = data_mod._generate_synthetic(600, 8, workers=2)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert reasons == {"quiet": 70}
    assert rendered.shape[0] == 600 and bool((rendered == 1).all())


def test_jfif_and_jpe_files_are_jpeg_photos(tmp_path: Path) -> None:
    """Browsers and Windows save JPEG photos as .jfif or .jpe: they were left out without a word."""
    rgb = _halves(24, 24, RED, BLUE)
    jfif = _save(tmp_path / "saved_from_browser.jfif", rgb, "JPEG")
    _save(tmp_path / "windows.JPE", rgb, "JPEG")
    assert [p.name for p in scan_images(tmp_path)] == ["saved_from_browser.jfif", "windows.JPE"]
    ds = load_folder(tmp_path, POLICY)
    assert len(ds) == 2 and ds.source["skipped"] == 0
    np.testing.assert_array_equal(ds.images[0].numpy(), prepare(jfif, POLICY))


def test_files_left_out_are_counted_by_extension_in_one_line(tmp_path: Path, caplog) -> None:
    """A folder of phone photos (.heic) looked like a smaller data set: "N images", no word about the
    rest. One line counts them, most common extensions first, the tail summed; what is no photo of the
    user's (dotfiles, hidden folders, OS litter, decode-cache entries) is not counted."""
    _save(tmp_path / "a.jpg", _halves(24, 24, RED, BLUE), "JPEG")
    _save(tmp_path / "sub" / "b.png", _halves(24, 24, RED, BLUE), "PNG")
    for i in range(10):
        (tmp_path / "phone" / f"IMG_{i}.HEIC").parent.mkdir(exist_ok=True)
        (tmp_path / "phone" / f"IMG_{i}.HEIC").write_bytes(b"ftypheic")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub" / "list.txt").write_text("x")
    for name in ("clip.mov", "scan.pdf", "raw.avif", "README", "x.psd", "y.xcf"):
        (tmp_path / name).write_bytes(b"x")
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", ".git/config", ".cache/folder-x.npy"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "cache").mkdir()  # a --cache-dir inside --data
    (tmp_path / "cache" / f"folder-{'0' * 40}.npy").write_bytes(b"x")
    (tmp_path / "cache" / f"synthetic-{'a' * 40}.json").write_bytes(b"{}")
    with caplog.at_level(logging.INFO, logger="trainer"):
        ds = load_folder(tmp_path, POLICY)
    assert len(ds) == 2
    lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert lines == [
        "data: ignored 18 file(s) that are not images of a supported type: .heic ×10, .txt ×2, "
        "(no extension) ×1, .avif ×1 and 4 more (convert .avif/.heic photos to JPEG or PNG to train on "
        "them)"
    ]


def test_a_folder_of_only_unsupported_photos_says_what_it_holds(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"IMG_{i}.heic").write_bytes(b"ftypheic")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    with pytest.raises(DataError) as e:
        load_folder(tmp_path, POLICY)
    assert str(e.value).startswith(f"no images under {tmp_path} (looked for .bmp, ")
    assert str(e.value).endswith(
        "; it holds 3 file(s) that are not images of a supported type: .heic ×3 (convert .heic photos to "
        "JPEG or PNG to train on them)"
    )
    (tmp_path / "IMG_0.heic").unlink()
    (tmp_path / "IMG_1.heic").unlink()
    (tmp_path / "IMG_2.heic").unlink()
    with pytest.raises(DataError, match=r"\(looked for [^)]*\)$"):  # an empty folder: nothing to add
        load_folder(tmp_path, POLICY)


def _entry(cache: Path, key: str, age_s: float, names: tuple[str, ...] = ("{key}.npy", "{key}.json")) -> None:
    """A decode-cache entry (or the named files of one) of 1000 bytes a file, last used `age_s` s ago."""
    cache.mkdir(exist_ok=True)
    for name in names:
        path = cache / name.format(key=key)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (time.time() - age_s, time.time() - age_s))


def _key(i: int) -> str:
    return f"folder-{i:040x}"


def test_writing_the_cache_says_where_it_is_how_large_and_how_to_clear_it(tmp_path: Path, caplog) -> None:
    cache = tmp_path / "cache"
    _entry(cache, _key(1), 10)
    with caplog.at_level(logging.INFO, logger="trainer"):
        load_synthetic(400, 16, cache_dir=cache)
    assert (
        f"data: decoded images cached in {cache} (0.3 MB; 2 entries, 0.3 MB in all; delete the folder to "
        "clear it)" in caplog.messages
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        load_folder(_one_photo(tmp_path / "photos"), POLICY, cache_dir=cache)
        load_folder(tmp_path / "photos", POLICY, cache_dir=cache)
    assert caplog.messages[-1] == f"data: 1 images from cache {cache} (0.0 MB; 0 skipped when decoded)"


def _one_photo(root: Path) -> Path:
    _save(root / "a.png", _halves(24, 24, RED, BLUE), "PNG")
    return root


def test_writing_an_entry_prunes_those_beyond_the_most_recent_that_nobody_used_for_an_hour(
    tmp_path: Path, caplog
) -> None:
    """Every data set, size and policy was a new entry, kept forever (a Docker models volume that retrains
    on each change of ./data grew by one per change). Now the CACHE_KEEP most recently used stay, and so
    does any entry used within CACHE_IDLE_S (it may be being read); the rest, and temp files a killed
    writer left, go when an entry is written."""
    assert data_mod.CACHE_KEEP == 4 and data_mod.CACHE_IDLE_S == 3600
    cache = tmp_path / "cache"
    for i in range(5):
        _entry(cache, _key(10 + i), 60 * (i + 1))  # used within the hour: 10..12 kept, 13, 14 young
    for i in range(3):
        _entry(cache, _key(20 + i), 7200 + i)  # idle for two hours, and beyond the 4 most recent
    _entry(cache, _key(30), 7200, ("{key}.npy",))  # an orphan .npy (a writer killed before its .json)
    _entry(cache, _key(31), 7200, (".{key}.npy.abc123.tmp",))  # a killed writer's temp file
    _entry(cache, _key(32), 10, (".{key}.npy.def456.tmp",))  # a writer at work
    (cache / "notes.txt").write_text("not the cache's")
    os.utime(cache / "notes.txt", (0, 0))
    with caplog.at_level(logging.INFO, logger="trainer"):
        load_synthetic(4, 16, cache_dir=cache)
    left = sorted(p.name for p in cache.iterdir())
    new = data_mod._sha256_json({"source": "synthetic", "count": 4, "size": 16, "seed": 0})[:40]
    assert left == sorted(
        [f"{_key(i)}.{part}" for i in range(10, 15) for part in ("json", "npy")]
        + [f"synthetic-{new}.json", f"synthetic-{new}.npy", f".{_key(32)}.npy.def456.tmp", "notes.txt"]
    )
    removed = f"data: removed 4 decode-cache entries and 1 temp files unused for over 60 min from {cache}"
    assert f"{removed} (0.0 MB)" in caplog.messages  # 3 × 2 + 1 + 1 files of 1000 bytes
    assert f"data: decoded images cached in {cache} (0.0 MB; 6 entries, 0.0 MB in all; " in caplog.text


def test_reading_an_entry_marks_it_used_so_pruning_spares_it(tmp_path: Path, monkeypatch) -> None:
    """An entry is marked used before it is read: one that had been idle, and that a trainer starts to
    read as another trainer writes a new entry, is not removed under it."""
    cache = tmp_path / "cache"
    first = load_synthetic(4, 16, cache_dir=cache)
    for f in cache.iterdir():
        os.utime(f, (time.time() - 3 * 3600, time.time() - 3 * 3600))
    for i in range(4):
        _entry(cache, _key(i), 2 * 3600)  # idle as well, but more recent: ours is the 5th
    assert torch.equal(load_synthetic(4, 16, cache_dir=cache).images, first.images)  # from the cache
    data_mod.prune_cache(cache)
    assert len(list(cache.glob("synthetic-*"))) == 2
    # Without the mark (another user's entry cannot be touched), pruning mid-read costs a decode, no more.
    monkeypatch.setattr(data_mod, "_mark_used", lambda path: None)
    real_load = np.load

    def pruned_meanwhile(path: Path, **kw: object) -> np.ndarray:
        for f in cache.glob("synthetic-*"):
            os.utime(f, (0, 0))
        _entry(cache, _key(9), 2 * 3600)  # the first prune left 4 entries: ours is the 5th again
        data_mod.prune_cache(cache)
        assert not Path(path).exists()
        return real_load(path, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(np, "load", pruned_meanwhile)
    assert torch.equal(load_synthetic(4, 16, cache_dir=cache).images, first.images)  # decoded again
