"""Training data: folder scan -> decoded uint8 tensor (memory + on-disk cache) -> seeded split -> batches.

Every photo goes through `carvae.preprocess.prepare`, the function the service calls on uploads, with the
policy that ends up in the checkpoint; so a photo is the same array at training and at serving time.
Decoding happens once: the result is one (N, S, S, 3) uint8 tensor, cached on disk as .npy (never pickle)
under a key that changes whenever a file, the image size or the policy changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from carvae.checkpoint import atomic_write_bytes
from carvae.preprocess import DecodeLimits, ImageError, PreprocessPolicy, prepare, to_tensor
from trainer.cli import bar_interval
from trainer.state import CHECKPOINT_FILE, RUN_FILE, STATE_FILE

log = logging.getLogger("trainer")

# .jfif and .jpe are JPEG under the names browsers and Windows save them with. Not .avif or .heic: the
# service's decoder (carvae.preprocess, shared so that training and serving see the same array) does not
# accept them, so such photos could be trained on but never uploaded; they are counted and named instead.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
# Photo formats a phone or camera writes that the decoder refuses: named in the ignored-files line.
CONVERTIBLE_PHOTOS = frozenset({".heic", ".heif", ".avif", ".jxl", ".dng"})
# Files an OS or a file manager leaves in any folder: not the user's, not worth a word.
OS_LITTER = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
IGNORED_SHOWN = 4  # extensions named in the ignored-files line; the rest are counted
# Training photos come from the user's own disk, so only pathological sizes are refused; the service keeps
# its tighter limit for uploads. Side and aspect limits stay the shared defaults.
TRAIN_LIMITS = DecodeLimits(max_pixels=200_000_000)
CACHE_VERSION = 1
CACHE_ENTRY = re.compile(r"(folder|synthetic)-[0-9a-f]{40}\.(npy|json)")  # the names _write_cache gives
CACHE_TEMP = re.compile(r"\.(folder|synthetic)-[0-9a-f]{40}\.(npy|json)\..+\.tmp")  # a writer's own
# Every data set, image size and policy is an entry (6k photos at 128 px: 300 MB), and the cache is shared
# by all runs beside RUN_DIR: writing an entry removes those beyond the CACHE_KEEP most recently used that
# nobody has used for CACHE_IDLE_S. A read marks its entry used before it starts, so an entry a trainer
# is reading is never among them.
CACHE_KEEP = 4
CACHE_IDLE_S = 3600.0
SYNTHETIC_SEED = 0  # the embedded dataset is one fixed set of cars; --seed varies the split and the model
AUGMENTATIONS = ("hflip", "shift", "color")
# A folder holding any of these is a training run's folder, not photos.
RUN_MARKERS = (RUN_FILE, STATE_FILE, CHECKPOINT_FILE)


class DataError(RuntimeError):
    """The data cannot be used at all (missing folder, no usable image); one-line message."""


@dataclass
class Dataset:
    images: torch.Tensor  # (N, S, S, 3) uint8, in the order of the sorted file list
    fingerprint: str  # sha256 of what the data is: relative paths + sizes, or the synthetic parameters
    source: dict[str, Any] = field(default_factory=dict)  # recorded in the checkpoint

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ---------------------------------------------------------------- folder scan and fingerprints


def _is_run_folder(path: Path) -> bool:
    # os.path.exists, not Path.exists: in a folder without search permission (another user's chmod 700)
    # the latter raises EACCES and ended the run; such a folder is not a run of ours, and os.walk then
    # names it as unreadable.
    return any(os.path.exists(path / name) for name in RUN_MARKERS)


def _is_file_or_dangling(path: Path) -> bool:
    """A regular file (or a link to one) or a link to nothing. Not a FIFO, socket or device: reading a FIFO
    named x.jpg blocks forever. A dangling link stays, to be counted as an unreadable file."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return True


def _counts_as_ignored(name: str) -> bool:
    """Is a file the scan leaves out worth telling the user about? Not OS litter or the decode cache's
    own entries (a --cache-dir inside --data), nor, as the scan never looks at them, dotfiles and hidden
    folders (.DS_Store, .git, the default .cache): none of them is a photo the user meant to train on."""
    return name.lower() not in OS_LITTER and not CACHE_ENTRY.fullmatch(name)


def _folder_id(path: Path) -> tuple[int, int] | None:
    """What a folder is, however it is reached (typed, relative, through a link): its device and inode.
    None when it cannot be looked at (gone, or not there yet)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class _Scan:
    files: list[Path]
    ignored: Counter[str]  # by lower-case extension, the files left out that are worth a word
    skipped: list[str]  # one log line's text for each folder left out as not photos


def _scan(root: Path, run_dir: Path | None = None) -> _Scan:
    """The image files under root (see scan_images), the other files and the folders left out."""
    found: list[Path] = []
    ignored: Counter[str] = Counter()
    skipped: list[str] = []
    own = _folder_id(run_dir) if run_dir is not None else None
    # Linked folders are followed (a data set is often assembled from links to folders elsewhere); each
    # folder is scanned once, by the first name the sorted walk reaches it under, so a link back up is
    # no endless loop and two links to one folder put no photo on both sides of the split.
    scanned: dict[tuple[int, int], Path] = {}
    root_id = _folder_id(root)
    if root_id is not None:
        scanned[root_id] = root

    def unreadable(e: OSError) -> None:
        # os.walk skips a folder it cannot list without a word: the photos in a chmod 700 folder of
        # another user's vanished from the run, and an unreadable --data read as "no images under".
        if Path(e.filename or "") == root:
            raise DataError(f"cannot read data folder {root}: {e.strerror or e}")
        log.warning("data: cannot read folder %s (%s); its photos are skipped", e.filename, e.strerror or e)

    def not_photos(folder: Path) -> str | None:
        folder_id = _folder_id(folder)
        # This run's own folder before it holds a run (a first run, or an existing folder of photos):
        # scanned, its photos were trained on once and gone from the data of the next run, whose
        # fingerprint then no longer matched for --resume and --if-missing.
        if folder_id is not None and folder_id == own:
            return "this run's --out folder, not photos"
        if _is_run_folder(folder):
            return "a training run's folder, not photos"
        if folder_id is not None:
            if folder_id in scanned:
                return f"the same folder as {scanned[folder_id]}, scanned once"
            scanned[folder_id] = folder
        return None

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=True):
        # Hidden folders are not the user's photos: thumbnails a photo manager keeps (.thumbnails) would
        # train as duplicates of the photos, across the validation split; .git, the default .cache.
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):  # sorted: which name claims a folder
            why = not_photos(Path(dirpath, d))
            if why is None:
                kept.append(d)
            else:
                skipped.append(f"{Path(dirpath, d)} ({why})")
        dirnames[:] = kept
        for f in filenames:
            suffix = Path(f).suffix.lower()
            if f.startswith("."):
                continue  # macOS's AppleDouble "._IMG_1.jpg" beside every photo copied to a USB stick
            if suffix in IMAGE_EXTENSIONS:
                if _is_file_or_dangling(Path(dirpath, f)):
                    found.append(Path(dirpath, f))
            elif _counts_as_ignored(f):
                ignored[suffix or "(no extension)"] += 1
    return _Scan(sorted(found, key=lambda p: p.relative_to(root).as_posix()), ignored, skipped)


def scan_images(root: Path, run_dir: Path | None = None) -> list[Path]:
    """Every image file under root, recursively, sorted by relative path so the order (and so the split)
    is the same on every machine. Extensions are matched case-insensitively; linked folders are followed,
    each folder once (no cycles, no duplicates); hidden files and folders (a name starting with ".") are
    not photos. Run folders below root (a --out inside --data) are skipped: their loss curves and sample
    grids are not photos, and would change the data's fingerprint after every epoch. So is `run_dir`, the
    run's own --out, from its first run on, whether or not it holds a run yet."""
    return _scan(root, run_dir).files


def describe_ignored(ignored: Counter[str]) -> str:
    """The files `_scan` left out, in one line however varied the folder: "12 file(s) that are not images
    of a supported type: .heic ×10, .txt ×2", the most common extensions first, and how to use phone
    photos when there are some."""
    total = sum(ignored.values())
    top = sorted(ignored.items(), key=lambda item: (-item[1], item[0]))[:IGNORED_SHOWN]  # ties: stable
    text = f"{total} file(s) that are not images of a supported type: "
    text += ", ".join(f"{ext} ×{n}" for ext, n in top)
    if len(ignored) > len(top):
        text += f" and {total - sum(n for _, n in top)} more"
    photos = sorted(CONVERTIBLE_PHOTOS & set(ignored))
    if photos:
        text += f" (convert {'/'.join(photos)} photos to JPEG or PNG to train on them)"
    return text


def _file_stats(root: Path, files: Sequence[Path]) -> list[tuple[str, int, int]]:
    out = []
    for p in files:
        try:
            st = p.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # vanished or unreadable since the scan: decoding will skip and count it
            size, mtime = -1, 0
        out.append((p.relative_to(root).as_posix(), size, mtime))
    return out


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def folder_fingerprint(stats: Sequence[tuple[str, int, int]]) -> str:
    """What the data is, independent of where it lives or when it was copied: relative paths + sizes."""
    return _sha256_json([[name, size] for name, size, _ in stats])


def synthetic_fingerprint(count: int, image_size: int) -> str:
    return _sha256_json({"source": "synthetic", "count": count, "size": image_size, "seed": SYNTHETIC_SEED})


def data_fingerprint(data: str, image_size: int, synthetic_count: int, run_dir: Path | None = None) -> str:
    """The fingerprint `load_data` would record, without decoding anything (used by --if-missing). Silent
    about the folders it leaves out: the load that follows names them."""
    if data == "synthetic":
        return synthetic_fingerprint(synthetic_count, image_size)
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    return folder_fingerprint(_file_stats(root, scan_images(root, run_dir)))


# ---------------------------------------------------------------- decoding and cache


def _quiet_worker() -> None:
    """Pool initializer. A forked worker inherits the trainer's SIGTERM handler (raise KeyboardInterrupt),
    and leaving the pool terminates its workers with SIGTERM: every run that decoded in parallel printed a
    KeyboardInterrupt traceback per worker. Workers die silently on SIGTERM and leave Ctrl-C to the
    parent, which terminates them when it unwinds."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_pool(workers: int) -> multiprocessing.pool.Pool:
    # fork: workers only run PIL/numpy, and skip re-importing torch in every worker.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=_quiet_worker)


def _decode_file(args: tuple[str, dict[str, Any]]) -> tuple[np.ndarray | None, str | None]:
    """One file -> (array, None) or (None, reason). Runs in a worker process; never raises, because one
    bad photo among thousands must cost a log line, not the run."""
    path, policy_dict = args
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None, "unreadable"
    try:
        return prepare(data, PreprocessPolicy.from_dict(policy_dict), TRAIN_LIMITS), None
    except ImageError as e:
        return None, e.code
    except Exception as e:  # a decoder bug on one hostile file is still just a skipped file
        return None, f"error:{type(e).__name__}"


def _decode_all(
    files: Sequence[Path], policy: PreprocessPolicy, workers: int, progress: bool
) -> tuple[list[np.ndarray], Counter[str]]:
    jobs = [(str(p), policy.to_dict()) for p in files]
    kept: list[np.ndarray] = []
    skipped: Counter[str] = Counter()
    bar = tqdm(
        total=len(jobs),
        desc="decoding",
        unit="img",
        disable=not progress,
        leave=False,
        mininterval=bar_interval(),
    )

    def consume(results: Iterator[tuple[np.ndarray | None, str | None]]) -> None:
        for path, (arr, reason) in zip(files, results, strict=True):
            if arr is None:
                skipped[reason or "unknown"] += 1
                log.debug("skipped %s (%s)", path, reason)
            else:
                kept.append(arr)
            bar.update()

    if workers > 1 and len(jobs) > 64:
        with _worker_pool(workers) as pool:
            consume(pool.imap(_decode_file, jobs, chunksize=32))
    else:
        consume(map(_decode_file, jobs))
    bar.close()
    return kept, skipped


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the cache from other users of a shared cache dir
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(cache_dir: Path | None, key: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    if cache_dir is None:
        return None
    arr_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    _mark_used(meta_path)
    # A damaged entry (an emptied .npy, an edited .json) is a cache miss, decoded again and rewritten:
    # np.load raises EOFError on an empty file, and a .json that is not an object has no "count".
    try:
        meta = json.loads(meta_path.read_text())
        arr = np.load(arr_path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("skipped"), int):
        return None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != meta.get("count"):
        return None
    return arr, meta


def _mark_used(meta_path: Path) -> None:
    """The entry's .json mtime is its last use, which pruning goes by. Best effort: another user's entry
    in a shared cache dir cannot be touched; pruned while we read it, it costs us a decode, nothing more."""
    with contextlib.suppress(OSError):
        os.utime(meta_path)


def _write_cache(cache_dir: Path | None, key: str, arr: np.ndarray, meta: dict[str, Any]) -> None:
    """Best effort: a cache that cannot be written costs the next run a decode, never this run."""
    if cache_dir is None:
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save_npy_atomic(cache_dir / f"{key}.npy", arr)
        # The .json is written last and is what marks the entry complete.
        atomic_write_bytes(cache_dir / f"{key}.json", json.dumps(meta).encode())
    except OSError as e:
        log.warning("could not write the decode cache in %s (%s); continuing without it", cache_dir, e)
        return
    entries, total = prune_cache(cache_dir, keep=key)
    log.info(
        "data: decoded images cached in %s (%s; %d entr%s, %s in all; delete the folder to clear it)",
        cache_dir,
        _mb(arr.nbytes),
        entries,
        "y" if entries == 1 else "ies",
        _mb(total),
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class _CacheFile:
    path: Path
    mtime: float
    size: int


def _cache_files(cache_dir: Path) -> tuple[dict[str, list[_CacheFile]], list[_CacheFile]]:
    """The cache's entries (key -> its .npy and .json, or an orphan half of one) and writers' temp files."""
    entries: dict[str, list[_CacheFile]] = {}
    temps: list[_CacheFile] = []
    with os.scandir(cache_dir) as it:
        for f in it:
            entry, temp = CACHE_ENTRY.fullmatch(f.name), CACHE_TEMP.fullmatch(f.name)
            if not (entry or temp):
                continue
            try:
                st = f.stat(follow_symlinks=False)
            except OSError:  # removed meanwhile by another trainer pruning
                continue
            item = _CacheFile(Path(f.path), st.st_mtime, st.st_size)
            if entry:
                entries.setdefault(f.name.rsplit(".", 1)[0], []).append(item)
            else:
                temps.append(item)
    return entries, temps


def _remove(files: Sequence[_CacheFile]) -> int:
    """Unlink an entry's files, .json first: without it the entry is a miss, never half read. A reader
    that already opened the .npy still reads all of it (POSIX); one that had not gets a miss and decodes.
    Returns the bytes freed."""
    freed = 0
    for f in sorted(files, key=lambda f: f.path.suffix != ".json"):
        try:
            f.path.unlink()
            freed += f.size
        except OSError:  # gone already (another trainer pruning), or not ours to remove
            pass
    return freed


def prune_cache(cache_dir: Path, keep: str | None = None) -> tuple[int, int]:
    """Remove the entries beyond the CACHE_KEEP most recently used that nobody has used for CACHE_IDLE_S,
    and temp files left that long by a killed writer (a writer's file grows, so its mtime is fresh).
    `keep`, the entry just written, always stays. Returns the entries and bytes left; never raises: a
    cache that cannot be pruned just stays as large as it is."""
    try:
        entries, temps = _cache_files(cache_dir)
    except OSError as e:
        log.debug("could not prune the decode cache in %s (%s)", cache_dir, e)
        return 0, 0
    last_use = {key: max(f.mtime for f in files) for key, files in entries.items()}
    idle_since = time.time() - CACHE_IDLE_S
    recent = sorted(last_use, key=last_use.__getitem__, reverse=True)
    old = [key for key in recent[CACHE_KEEP:] if key != keep and last_use[key] < idle_since]
    stale = [t for t in temps if t.mtime < idle_since]
    freed = sum(_remove(entries.pop(key)) for key in old) + _remove(stale)
    if old or stale:
        log.info(
            "data: removed %d decode-cache entries and %d temp files unused for over %.0f min from %s (%s)",
            len(old),
            len(stale),
            CACHE_IDLE_S / 60,
            cache_dir,
            _mb(freed),
        )
    return len(entries), sum(f.size for files in entries.values() for f in files)


def load_folder(
    root: Path,
    policy: PreprocessPolicy,
    workers: int = 1,
    cache_dir: Path | None = None,
    progress: bool = False,
    run_dir: Path | None = None,
) -> Dataset:
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    scan = _scan(root, run_dir)
    files, ignored = scan.files, scan.ignored
    for folder in scan.skipped:
        log.info("data: skipping %s", folder)
    if not files:
        held = f"; it holds {describe_ignored(ignored)}" if ignored else ""
        raise DataError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}){held}")
    if ignored:
        log.info("data: ignored %s", describe_ignored(ignored))
    stats = _file_stats(root, files)
    fingerprint = folder_fingerprint(stats)
    key = _sha256_json(
        {"v": CACHE_VERSION, "files": stats, "policy": policy.to_dict(), "limits": TRAIN_LIMITS.__dict__}
    )
    key = f"folder-{key[:40]}"
    cached = _read_cache(cache_dir, key)
    if cached is not None:
        arr, meta = cached
        msg = "data: %d images from cache %s (%s; %d skipped when decoded)"
        log.info(msg, len(arr), cache_dir, _mb(arr.nbytes), meta["skipped"])
    else:
        kept, reasons = _decode_all(files, policy, workers, progress)
        if not kept:
            why = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
            raise DataError(f"none of the {len(files)} image files under {root} could be used ({why})")
        arr = np.stack(kept)
        meta = {"count": len(kept), "skipped": sum(reasons.values()), "skipped_reasons": dict(reasons)}
        msg = "data: decoded %d of %d files under %s; skipped %d%s"
        detail = f" ({', '.join(f'{n} {r}' for r, n in reasons.most_common())})" if reasons else ""
        log.info(msg, len(kept), len(files), root, meta["skipped"], detail)
        _write_cache(cache_dir, key, arr, meta)
    source = {
        "source": "folder",
        "files": len(files),
        "count": int(arr.shape[0]),
        "skipped": int(meta["skipped"]),
        "skipped_reasons": meta.get("skipped_reasons", {}),
    }
    return Dataset(torch.from_numpy(arr), fingerprint, source)


def _synthetic_chunk(args: tuple[int, int, int]) -> np.ndarray:
    from carvae.synthetic import generate  # the procedural cars are only needed for this source

    start, n, size = args
    return generate(n, size=size, seed=SYNTHETIC_SEED, start=start)


def _generate_synthetic(count: int, size: int, workers: int) -> np.ndarray:
    """Car i is a function of (seed, i) alone, so chunks rendered in parallel equal one serial render."""
    chunk = 256
    jobs = [(s, min(chunk, count - s), size) for s in range(0, count, chunk)]
    if workers > 1 and len(jobs) > 1:
        with _worker_pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_synthetic_chunk, jobs)
    else:
        parts = [_synthetic_chunk(j) for j in jobs]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.uint8)


def load_synthetic(count: int, image_size: int, cache_dir: Path | None = None, workers: int = 1) -> Dataset:
    fingerprint = synthetic_fingerprint(count, image_size)
    key = f"synthetic-{fingerprint[:40]}"
    cached = _read_cache(cache_dir, key)
    if cached is not None:
        arr = cached[0]
    else:
        arr = _generate_synthetic(count, image_size, workers)
        _write_cache(cache_dir, key, arr, {"count": count, "skipped": 0})
    log.info("data: %d synthetic cars at %d px", count, image_size)
    source = {"source": "synthetic", "count": count, "skipped": 0, "seed": SYNTHETIC_SEED}
    return Dataset(torch.from_numpy(arr), fingerprint, source)


def load_synthetic_rows(
    count: int, image_size: int, rows: np.ndarray, cache_dir: Path | None = None, workers: int = 1
) -> Dataset:
    """The synthetic set of `count` cars with only `rows` rendered (the others left black), for a scorer
    that reads a few cars of a large set: `evaluate --limit 5` need not render 4000. The whole set when it
    is cached, or when most of it is wanted anyway (rendered in parallel and cached then)."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    fingerprint = synthetic_fingerprint(count, image_size)
    if 2 * len(rows) >= count or _read_cache(cache_dir, f"synthetic-{fingerprint[:40]}") is not None:
        return load_synthetic(count, image_size, cache_dir, workers)
    arr = np.zeros((count, image_size, image_size, 3), dtype=np.uint8)
    for i in rows:
        arr[i] = _synthetic_chunk((int(i), 1, image_size))[0]
    log.info("data: %d of %d synthetic cars at %d px (the ones used)", len(rows), count, image_size)
    source = {"source": "synthetic", "count": count, "skipped": 0, "seed": SYNTHETIC_SEED}
    return Dataset(torch.from_numpy(arr), fingerprint, source)


def load_data(
    data: str,
    policy: PreprocessPolicy,
    synthetic_count: int = 4000,
    workers: int = 1,
    cache_dir: Path | None = None,
    progress: bool = False,
    run_dir: Path | None = None,
) -> Dataset:
    """The data set `data` names; `run_dir`, the training run's own folder, is never part of it."""
    if data == "synthetic":
        return load_synthetic(synthetic_count, policy.image_size, cache_dir, workers)
    return load_folder(Path(data), policy, workers, cache_dir, progress, run_dir)


# ---------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # int64 indices into Dataset.images, ascending
    val: np.ndarray
    seed: int
    val_fraction: float

    @property
    def val_hash(self) -> str:
        """Identifies the exact validation set; evaluate and --resume check it before trusting a split."""
        return hashlib.sha256(np.ascontiguousarray(self.val, dtype="<i8").tobytes()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "train": len(self.train),
            "val": len(self.val),
            "val_hash": self.val_hash,
        }


def make_split(n: int, val_fraction: float, seed: int) -> Split:
    """Seeded split: the same (n, fraction, seed) gives the same indices on every machine and torch build
    (randperm on a CPU generator)."""
    if n < 2:
        raise DataError(f"need at least 2 images for a train/validation split, have {n}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return Split(np.sort(perm[n_val:]), np.sort(perm[:n_val]), seed, val_fraction)


# ---------------------------------------------------------------- batches


def epoch_batches(
    train: np.ndarray, epoch: int, seed: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[np.ndarray]:
    """This process's batches of dataset indices for one epoch. The order is a function of (seed, epoch)
    only — DistributedSampler's seeded permutation — so a resumed run replays the same order, and every
    rank gets the same number of batches (DDP needs that). The last partial batch is dropped when there
    is more than one batch: a handful of images is a poor estimate for the calibrated σ."""
    # Any Sized works as the sampler's "dataset"; torch's annotation asks for a Dataset.
    sampler: DistributedSampler[int] = DistributedSampler(
        range(len(train)),  # type: ignore[arg-type]
        num_replicas=world_size,
        rank=rank,
        shuffle=True,
        seed=seed,
        drop_last=False,
    )
    sampler.set_epoch(epoch)
    order = train[np.fromiter(iter(sampler), dtype=np.int64)]
    n_batches = max(1, len(order) // batch_size)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]


def to_batch(
    images: torch.Tensor, idx: np.ndarray, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """uint8 rows -> float (N, 3, S, S) in [0, 1] on the device. The uint8 rows travel (4× fewer bytes than
    float) and the conversion is `carvae.preprocess.to_tensor`, the service's own."""
    rows = images[torch.as_tensor(idx, device=images.device)]
    x = to_tensor(rows.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def parse_augment(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    ops = tuple(s for s in items if s and s != "none")
    unknown = [s for s in ops if s not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
    return ops


def augment(x: torch.Tensor, ops: Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """Opt-in augmentation of a float batch. Random draws come from a CPU generator (saved for resume), so
    the same seed gives the same augmentations on every device.
    hflip: mirror half the images (off by default: the seed datasets are all left-facing cars).
    shift: translate by up to 1/16 of the size (reflect padding). color: brightness/contrast ±10 %."""
    if not ops:
        return x
    n, _, s, _ = x.shape
    if "hflip" in ops:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if "shift" in ops:
        m = max(1, s // 16)
        padded = torch.nn.functional.pad(x, (m, m, m, m), mode="reflect")
        offs = torch.randint(0, 2 * m + 1, (n, 2), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy : dy + s, dx : dx + s] for i, (dy, dx) in enumerate(offs)])
    if "color" in ops:
        gain = (1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.2).to(x.device)
        contrast = (1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.2).to(x.device)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean * gain).clamp(0, 1)
    return x
