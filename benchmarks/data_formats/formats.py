#!/usr/bin/env python3
"""Measure storage formats for prepared (decoded, resized) uint8 image datasets.

Formats: a raw np.memmap (.npy), an Arrow IPC file read with pyarrow directly, Hugging Face
`datasets` (save_to_disk / load_from_disk; Array3D column and raw binary column), MosaicML
Streaming (MDSWriter / StreamingDataset) and LitData (optimize / StreamingDataset).

Every write and every read runs in its own fresh subprocess (single process, OMP_NUM_THREADS=1),
so open time is a real cold start and memory numbers belong to one format only.

  venv/bin/python formats.py run --n 50000 --hw 32 --tag n50k_32     # the whole matrix
  venv/bin/python formats.py cgroup --n 350000 --hw 32 --limit-mb 256  # >RAM-limit epoch
  venv/bin/python formats.py ulimit                                   # ulimit -v vs mmap
  venv/bin/python formats.py remote                                   # remote-URL APIs
  venv/bin/python formats.py report                                   # results.json -> results.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

T_PROCESS_START = time.time()
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

LAB = Path(__file__).resolve().parent
PY = sys.executable
BATCH = 128
SEED = 1234
GEN_CHUNK = 1024

# writer key -> reader keys that read that writer's files
WRITERS = {
    "npmemmap": ["npmemmap", "npmemmap_madv_random", "np_pread"],
    "arrow_ipc": ["arrow_ipc_npview", "arrow_ipc_npview_madv_random", "arrow_ipc_take"],
    "hf_binary": ["hf_binary_arrow"],
    "hf_array3d": ["hf_array3d_numpy"],
    "mds": ["mds_getitem"],
    "litdata": ["litdata_getitem", "litdata_getitem_default"],
}


# ----------------------------------------------------------------------------- data
def make_images(start: int, count: int, hw: int) -> np.ndarray:
    """Deterministic smooth-ish images; image i depends only on (SEED, i // GEN_CHUNK, i)."""
    assert start % GEN_CHUNK == 0
    out = np.empty((count, hw, hw, 3), np.uint8)
    yy, xx = np.mgrid[0:hw, 0:hw].astype(np.float32) / hw
    done = 0
    while done < count:
        chunk_id = (start + done) // GEN_CHUNK
        rng = np.random.default_rng([SEED, chunk_id])
        c = min(GEN_CHUNK, count - done)
        p = rng.random((GEN_CHUNK, 7, 3), dtype=np.float32)[:c]
        base = 0.2 + 0.6 * p[:, 0]
        amp = 0.1 + 0.25 * p[:, 1]
        freq = 1.0 + 5.0 * p[:, 2]
        ang = 6.2832 * p[:, 3]
        ph = 6.2832 * p[:, 4]
        proj = (np.cos(ang)[:, None, None, :] * xx[None, :, :, None]
                + np.sin(ang)[:, None, None, :] * yy[None, :, :, None])
        img = base[:, None, None, :] + amp[:, None, None, :] * np.sin(
            6.2832 * freq[:, None, None, :] * proj + ph[:, None, None, :])
        img += 0.03 * rng.standard_normal((c, hw, hw, 3), dtype=np.float32)
        out[done:done + c] = np.clip(img * 255.0, 0, 255).astype(np.uint8)
        done += c
    return out


def source_path(n: int, hw: int) -> Path:
    return LAB / "data" / f"source_{n}_{hw}.npy"


def ensure_source(n: int, hw: int) -> float:
    """Generate the synthetic images once (so write timings measure the format, not the generator)."""
    p = source_path(n, hw)
    if p.exists():
        return 0.0
    t0 = time.perf_counter()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, hw, hw, 3))
    for s in range(0, n, GEN_CHUNK):
        mm[s:s + GEN_CHUNK] = make_images(s, min(GEN_CHUNK, n - s), hw)
    mm.flush()
    del mm
    tmp.rename(p)
    return time.perf_counter() - t0


def iter_chunks(n: int, hw: int):
    """Chunks of 1024 images from the pre-generated source (a memmap: cheap, bounded memory)."""
    src = np.load(source_path(n, hw), mmap_mode="r")
    for s in range(0, n, GEN_CHUNK):
        yield s, np.array(src[s:s + GEN_CHUNK])


def epoch_perm(n: int, epoch: int) -> np.ndarray:
    """Our own order: a function of (seed, epoch) only."""
    return np.random.default_rng([SEED, epoch]).permutation(n)


# ----------------------------------------------------------------------------- process info
def proc_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSize", "Threads"):
                v = v.strip().split()[0]
                out[k] = int(v) if k == "Threads" else int(v) / 1024.0  # MiB
    return out


def io_read_MiB() -> float:
    with open("/proc/self/io") as f:
        for ln in f:
            if ln.startswith("read_bytes:"):
                return int(ln.split()[1]) / 2**20
    return 0.0


def reset_hwm():
    """Reset VmHWM (peak RSS) so the next peak belongs to the next phase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mapped_files_under(root: Path) -> dict:
    root_s = str(root.resolve())
    files, nbytes = set(), 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip().startswith(root_s):
                a, b = (int(x, 16) for x in parts[0].split("-"))
                files.add(parts[5].strip())
                nbytes += b - a
    return {"n_files": len(files), "mapped_MiB": round(nbytes / 2**20, 1)}


def children_info() -> dict:
    import psutil
    p = psutil.Process()
    kids = p.children(recursive=True)
    return {"threads": p.num_threads(), "child_processes": len(kids),
            "child_cmds": [" ".join(k.cmdline()[:3])[:120] for k in kids][:5]}


def dir_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    tot = 0
    for dp, _, fns in os.walk(p):
        for fn in fns:
            try:
                tot += os.lstat(os.path.join(dp, fn)).st_size
            except OSError:
                pass
    return tot


def sync_tree(root: Path) -> None:
    for dp, _, fns in os.walk(root):
        for fn in fns:
            fd = os.open(os.path.join(dp, fn), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def evict(root: Path) -> None:
    """fsync + POSIX_FADV_DONTNEED every file under root: a cold page cache for just these files."""
    paths = [root] if root.is_file() else [Path(dp) / fn for dp, _, fns in os.walk(root) for fn in fns]
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_MiB(root: Path) -> float | None:
    """Page-cache residency of the files under root (util-linux fincore)."""
    paths = [str(root)] if root.is_file() else [os.path.join(dp, fn) for dp, _, fns in os.walk(root) for fn in fns]
    if not paths or not shutil.which("fincore"):
        return None
    r = subprocess.run(["fincore", "-b", "-n", "-o", "RES", *paths], capture_output=True, text=True)
    try:
        return round(sum(int(x) for x in r.stdout.split()) / 2**20, 1)
    except ValueError:
        return None


CACHE_SPOTS = ["/tmp", "/dev/shm", os.path.expanduser("~/.cache"), os.path.expanduser("~/.lightning"), "/cache"]


def snapshot_spots() -> dict:
    snap = {}
    for spot in CACHE_SPOTS:
        sp = Path(spot)
        if not sp.is_dir():
            continue
        for e in sp.iterdir():
            try:
                if e.is_dir() and not e.is_symlink():
                    for e2 in e.iterdir():
                        snap[str(e2)] = dir_bytes(e2)
                    snap[str(e)] = dir_bytes(e)
                else:
                    snap[str(e)] = e.lstat().st_size
            except OSError:
                pass
    return snap


def snapshot_diff(before: dict, after: dict) -> list:
    out = []
    for k, v in after.items():
        if k.startswith(str(LAB)) or any(x in k for x in ("ddpm-", "prefect", "bash_tool", "bash_jobs")):
            # ours, the shell tool's, or other jobs on this machine
            continue
        if k not in before or v - before[k] > 4096:
            out.append((k, round((v - before.get(k, 0)) / 2**20, 3)))
    return sorted(out)[:20]


def digest(h, arr):
    h.update(np.ascontiguousarray(arr).tobytes())


# ----------------------------------------------------------------------------- writers
def _lit_fn(spec):
    start, count, hw, n = spec
    arr = np.array(np.load(source_path(n, hw), mmap_mode="r")[start:start + count])
    for i in range(count):
        yield {"img": arr[i]}


def write_format(fmt: str, root: Path, n: int, hw: int) -> dict:
    info: dict = {}
    t_imp = time.perf_counter()
    if fmt == "npmemmap":
        t0 = time.perf_counter()
        path = root / "images.npy"
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, hw, hw, 3))
        for s, arr in iter_chunks(n, hw):
            mm[s:s + len(arr)] = arr
        mm.flush()
        del mm
    elif fmt == "arrow_ipc":
        import pyarrow as pa
        t0 = time.perf_counter()
        rowb = hw * hw * 3
        rb_rows = max(GEN_CHUNK, (64 * 2**20 // rowb) // GEN_CHUNK * GEN_CHUNK)
        schema = pa.schema([("img", pa.binary(rowb))], metadata={"shape": json.dumps([hw, hw, 3])})
        buf = np.empty((rb_rows, hw, hw, 3), np.uint8)
        fill = 0
        with pa.OSFile(str(root / "images.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            def flush(k):
                arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(rowb), k, [None, pa.py_buffer(buf[:k])])
                w.write_batch(pa.record_batch([arr], schema=schema))
            for s, arr in iter_chunks(n, hw):
                buf[fill:fill + len(arr)] = arr
                fill += len(arr)
                if fill == rb_rows:
                    flush(fill)
                    fill = 0
            if fill:
                flush(fill)
        info["record_batch_rows"] = rb_rows
    elif fmt in ("hf_binary", "hf_array3d"):
        import datasets
        datasets.disable_progress_bars()
        t0 = time.perf_counter()
        if fmt == "hf_binary":
            feats = datasets.Features({"img": datasets.Value("binary")})
        else:
            feats = datasets.Features({"img": datasets.Array3D(shape=(hw, hw, 3), dtype="uint8")})

        def gen(n, hw, binary):
            for s, arr in iter_chunks(n, hw):
                for a in arr:
                    yield {"img": a.tobytes() if binary else a}
        cache = root.parent / (root.name + "_hfcache")
        ds = datasets.Dataset.from_generator(gen, features=feats, cache_dir=str(cache),
                                             gen_kwargs={"n": n, "hw": hw, "binary": fmt == "hf_binary"})
        t_gen = time.perf_counter() - t0
        ds.save_to_disk(str(root))
        info["from_generator_s"] = round(t_gen, 2)
        info["save_to_disk_s"] = round(time.perf_counter() - t0 - t_gen, 2)
        info["generator_cache_MiB"] = round(dir_bytes(cache) / 2**20, 1)
        del ds
        shutil.rmtree(cache, ignore_errors=True)
    elif fmt == "mds":
        from streaming import MDSWriter
        t0 = time.perf_counter()
        with MDSWriter(out=str(root), columns={"img": f"ndarray:uint8:{hw},{hw},3"}, compression=None) as w:
            for s, arr in iter_chunks(n, hw):
                for a in arr:
                    w.write({"img": a})
    elif fmt == "litdata":
        from litdata import optimize
        t0 = time.perf_counter()
        specs = [(s, min(GEN_CHUNK, n - s), hw, n) for s in range(0, n, GEN_CHUNK)]
        optimize(fn=_lit_fn, inputs=specs, output_dir=str(root), chunk_bytes="64MB", num_workers=1,
                 mode="overwrite", verbose=False)
    else:
        raise ValueError(fmt)
    t_w = time.perf_counter()
    sync_tree(root)  # durable: count the fsync in the write time
    info["import_s"] = round(t0 - t_imp, 2)
    info["fsync_s"] = round(time.perf_counter() - t_w, 2)
    info["write_s"] = round(time.perf_counter() - t0, 2)
    return info


# ----------------------------------------------------------------------------- readers
class Reader:
    per_item = False
    api = ""
    modules: tuple = ()
    random_limit = None  # read only this many indices per random epoch (for very slow paths)

    def __init__(self, root: Path, n: int, hw: int):
        self.root, self.n, self.hw = root, n, hw

    def batch(self, idx: np.ndarray) -> np.ndarray: ...

    def slice(self, s: int, e: int) -> np.ndarray:
        return self.batch(np.arange(s, e))


class NpMemmap(Reader):
    api = "np.load(path, mmap_mode='r')[idx]  (fancy index = one copy)"

    def open(self):
        self.a = np.load(self.root / "images.npy", mmap_mode="r")

    def batch(self, idx):
        return self.a[idx]

    def slice(self, s, e):
        return np.array(self.a[s:e])


def madvise_random(addr: int, length: int) -> int:
    """madvise(MADV_RANDOM) on a mapping: no readahead around page faults."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = os.sysconf("SC_PAGE_SIZE")
    start = addr - addr % page
    rc = libc.madvise(start, length + (addr - start), 1)  # 1 = MADV_RANDOM
    if rc != 0:
        raise OSError(ctypes.get_errno(), "madvise")
    return rc


class NpMemmapRandom(NpMemmap):
    api = "np.load(path, mmap_mode='r') + mmap.madvise(MADV_RANDOM); a[idx]"

    def open(self):
        import mmap
        super().open()
        self.a._mmap.madvise(mmap.MADV_RANDOM)


class NpPread(Reader):
    api = "os.preadv(fd, [out[k]], header + i*rowbytes) per index into one buffer (no mmap)"

    def open(self):
        p = self.root / "images.npy"
        with open(p, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            self.off = f.tell()
        self.fd = os.open(p, os.O_RDONLY)
        self.rowb = self.hw * self.hw * 3

    def batch(self, idx):
        out = np.empty((len(idx), self.hw, self.hw, 3), np.uint8)
        fd, off, rowb = self.fd, self.off, self.rowb
        for k, i in enumerate(idx.tolist()):
            os.preadv(fd, [out[k]], off + i * rowb)
        return out

    def slice(self, s, e):
        out = np.empty((e - s, self.hw, self.hw, 3), np.uint8)
        os.preadv(self.fd, [out], self.off + s * self.rowb)
        return out


def _fsb_chunk_view(chunk, hw):
    """Zero-copy numpy view of a FixedSizeBinaryArray chunk (the mmapped bytes)."""
    rowb = hw * hw * 3
    data = np.frombuffer(chunk.buffers()[1], np.uint8)
    return data[chunk.offset * rowb:(chunk.offset + len(chunk)) * rowb].reshape(len(chunk), hw, hw, 3)


class ArrowNpView(Reader):
    modules = ("pyarrow",)
    api = "pa.ipc.open_file(pa.memory_map(p)).read_all(); numpy views of chunk buffers; view[idx]"

    def open(self):
        import pyarrow as pa
        self.table = pa.ipc.open_file(pa.memory_map(str(self.root / "images.arrow"), "r")).read_all()
        chunks = self.table.column("img").chunks
        self.views = [_fsb_chunk_view(c, self.hw) for c in chunks]
        self.rb = len(chunks[0])
        assert all(len(c) == self.rb for c in chunks[:-1])

    def batch(self, idx):
        ci, oi = np.divmod(idx, self.rb)
        if ci.min() == ci.max():
            return self.views[ci[0]][oi]
        out = np.empty((len(idx), self.hw, self.hw, 3), np.uint8)
        for c in np.unique(ci):
            m = ci == c
            out[m] = self.views[c][oi[m]]
        return out

    def slice(self, s, e):
        return self.batch(np.arange(s, e))


class ArrowNpViewRandom(ArrowNpView):
    api = ArrowNpView.api + " + madvise(MADV_RANDOM) on the mapping"

    def open(self):
        import pyarrow as pa
        mm = pa.memory_map(str(self.root / "images.arrow"), "r")
        whole = mm.read_buffer(mm.size())  # zero-copy: the mapping itself
        madvise_random(whole.address, whole.size)
        mm.seek(0)
        self.table = pa.ipc.open_file(mm).read_all()
        chunks = self.table.column("img").chunks
        self.views = [_fsb_chunk_view(c, self.hw) for c in chunks]
        self.rb = len(chunks[0])


class ArrowTake(Reader):
    modules = ("pyarrow",)
    api = "table.column('img').take(idx) (pyarrow compute) -> numpy via buffer"

    def open(self):
        import pyarrow as pa
        self.pa = pa
        self.table = pa.ipc.open_file(pa.memory_map(str(self.root / "images.arrow"), "r")).read_all()
        self.col = self.table.column("img")

    def _np(self, arr):
        if isinstance(arr, self.pa.ChunkedArray):
            arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
        return _fsb_chunk_view(arr, self.hw)

    def batch(self, idx):
        return self._np(self.col.take(self.pa.array(idx)))

    def slice(self, s, e):
        return self._np(self.col.slice(s, e - s)).copy()


def _binary_to_np(col, hw):
    import pyarrow as pa
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    rowb, k = hw * hw * 3, len(col)
    offs = np.frombuffer(col.buffers()[1], np.int32 if col.type == pa.binary() else np.int64,
                         count=k + 1, offset=col.offset * (4 if col.type == pa.binary() else 8))
    assert offs[-1] - offs[0] == k * rowb
    return np.frombuffer(col.buffers()[2], np.uint8, count=k * rowb, offset=int(offs[0])).reshape(k, hw, hw, 3)


class HfBinaryArrow(Reader):
    modules = ("datasets",)
    api = "load_from_disk(p).with_format('arrow')[idx] -> binary column -> np.frombuffer"

    def open(self):
        import datasets
        datasets.disable_progress_bars()
        self.ds = datasets.load_from_disk(str(self.root)).with_format("arrow")

    def batch(self, idx):
        return _binary_to_np(self.ds[idx].column("img"), self.hw)

    def slice(self, s, e):
        return _binary_to_np(self.ds[s:e].column("img"), self.hw).copy()


class HfArray3dNumpy(Reader):
    modules = ("datasets",)
    api = "load_from_disk(p).with_format('numpy', dtype=np.uint8)[idx]['img']  (Array3D feature)"

    def open(self):
        import datasets
        datasets.disable_progress_bars()
        # NB: without dtype=... the numpy formatter returns int64 for integer columns (8x the bytes)
        self.ds = datasets.load_from_disk(str(self.root)).with_format("numpy", dtype=np.uint8)

    def batch(self, idx):
        return self.ds[idx]["img"]

    def slice(self, s, e):
        return self.ds[s:e]["img"]


class MdsGetItem(Reader):
    modules = ("streaming",)
    per_item = True
    api = "StreamingDataset(local=p, remote=None, shuffle=False)[i]['img'] per index, np.stack"

    def open(self):
        from streaming import StreamingDataset
        self.ds = StreamingDataset(local=str(self.root), remote=None, shuffle=False, batch_size=BATCH)

    def batch(self, idx):
        ds = self.ds
        return np.stack([ds[int(i)]["img"] for i in idx])


class LitGetItem(Reader):
    modules = ("litdata",)
    per_item = True
    api = "litdata.StreamingDataset(p, batch_decode=False)[i]['img'] per index, np.stack"

    def open(self):
        import litdata
        # NB: the default batch_decode='auto' decodes a window of ~256 items on every random
        # __getitem__ (made for sequential iteration): ~4 ms per item at random indices.
        self.ds = litdata.StreamingDataset(str(self.root), batch_decode=False)

    def batch(self, idx):
        ds = self.ds
        return np.stack([ds[int(i)]["img"] for i in idx])


class LitGetItemDefault(LitGetItem):
    api = "litdata.StreamingDataset(p)[i]['img'] per index (default batch_decode='auto')"
    random_limit = 4096

    def open(self):
        import litdata
        self.ds = litdata.StreamingDataset(str(self.root))


READERS = {"npmemmap": NpMemmap, "npmemmap_madv_random": NpMemmapRandom, "np_pread": NpPread,
           "arrow_ipc_npview_madv_random": ArrowNpViewRandom, "arrow_ipc_npview": ArrowNpView, "arrow_ipc_take": ArrowTake,
           "hf_binary_arrow": HfBinaryArrow, "hf_array3d_numpy": HfArray3dNumpy,
           "mds_getitem": MdsGetItem, "litdata_getitem": LitGetItem,
           "litdata_getitem_default": LitGetItemDefault}


def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_format(rname: str, root: Path, n: int, hw: int, warm_epochs: int, max_warm_s: float,
                cgroup_mode: bool = False) -> dict:
    res: dict = {}
    shm0 = set(os.listdir("/dev/shm"))
    reset_hwm()
    st0 = proc_status()
    import importlib
    ti = time.perf_counter()
    r = READERS[rname](root, n, hw)
    for m in r.modules:
        importlib.import_module(m)
    t0 = time.perf_counter()
    res["import_s"] = round(t0 - ti, 3)
    res["api"], res["per_item_only"] = r.api, r.per_item
    r.open()
    t1 = time.perf_counter()
    res["open_s"] = round(t1 - t0, 3)
    res["after_open"] = {**proc_status(), **children_info()}
    res["dev_shm_new_while_open"] = sorted(set(os.listdir("/dev/shm")) - shm0)
    perm = epoch_perm(n, 0)
    b0 = r.batch(perm[:BATCH])
    t2 = time.perf_counter()
    res["first_batch_s"] = round(t2 - t1, 4)
    res["start_to_first_batch_s"] = round(time.time() - T_PROCESS_START, 3)
    res["first_batch_abs_time"] = time.time()
    assert b0.dtype == np.uint8 and b0.shape == (BATCH, hw, hw, 3), (b0.dtype, b0.shape)

    n_rand = min(n, r.random_limit or n)
    res["random_items_per_epoch"] = n_rand

    prog_path = os.environ.get("FORMATS_PROGRESS")

    def run_epoch(perm):
        c0, w0 = cpu_s(), time.perf_counter()
        for k, s in enumerate(range(0, n_rand, BATCH)):
            b = r.batch(perm[s:s + BATCH])
            if prog_path and k % 20 == 0:
                st = proc_status()
                Path(prog_path).write_text(json.dumps({"items_done": s + len(b), "wall_s": time.perf_counter() - w0,
                                                       "cpu_s": cpu_s() - c0, "VmHWM": st["VmHWM"],
                                                       "disk_read_MiB": round(io_read_MiB() - io0, 1),
                                                       "RssAnon": st["RssAnon"], "RssFile": st["RssFile"]}))
        return time.perf_counter() - w0, cpu_s() - c0, b

    # epoch 0: cold page cache (files evicted above); then warm epochs
    reset_hwm()
    st_pre = proc_status()
    io0 = io_read_MiB()
    w, c, _ = run_epoch(perm)
    st_post = proc_status()
    res["disk_read_MiB_epoch0"] = round(io_read_MiB() - io0, 1)
    res["random_cold"] = {"wall_s": round(w, 3), "cpu_s": round(c, 3), "img_s": round(n_rand / w),
                          "img_per_cpu_s": round(n_rand / c)}
    res["mem_epoch0"] = {"rss_before": st_pre["VmRSS"], "rss_after": st_post["VmRSS"], "hwm": st_post["VmHWM"],
                         "rss_peak_growth_MiB": round(st_post["VmHWM"] - st_pre["VmRSS"], 1),
                         "anon_growth_MiB": round(st_post["RssAnon"] - st_pre["RssAnon"], 1),
                         "file_growth_MiB": round(st_post["RssFile"] - st_pre["RssFile"], 1),
                         "shmem_MiB": st_post["RssShmem"], "RssAnon": st_post["RssAnon"], "RssFile": st_post["RssFile"]}
    res["mapped_under_dataset"] = mapped_files_under(root)
    res["after_epoch"] = children_info()
    if cgroup_mode:
        return res
    if r.random_limit:
        warm_epochs = 1
    warm = []
    for ep in range(1, 1 + warm_epochs):
        w, c, _ = run_epoch(epoch_perm(n, ep))
        warm.append((w, c))
        if sum(x[0] for x in warm) > max_warm_s:
            break
    ws = sorted(x[0] for x in warm)
    cs = sorted(x[1] for x in warm)
    res["random_warm"] = {"epochs": len(warm), "wall_s_all": [round(x[0], 3) for x in warm],
                          "img_s_median": round(n_rand / ws[len(ws) // 2]), "img_s_best": round(n_rand / ws[0]),
                          "img_per_cpu_s_median": round(n_rand / cs[len(cs) // 2])}
    # contiguous slices (warm)
    c0, w0 = cpu_s(), time.perf_counter()
    for s in range(0, n, BATCH):
        b = r.slice(s, min(n, s + BATCH))
    w, c = time.perf_counter() - w0, cpu_s() - c0
    res["contiguous_warm"] = {"wall_s": round(w, 3), "img_s": round(n / w), "img_per_cpu_s": round(n / c)}
    # verification (untimed): digest of epoch 0 in our order + digest of contiguous pass
    h = hashlib.blake2b(digest_size=16)
    n_ver = n_rand if r.random_limit else n
    for s in range(0, n_ver, BATCH):
        digest(h, r.batch(perm[s:s + BATCH]))
    res["digest_epoch0" if n_ver == n else "digest_epoch0_partial"] = h.hexdigest()
    h = hashlib.blake2b(digest_size=16)
    for s in range(0, n, BATCH):
        b = r.slice(s, min(n, s + BATCH))
        assert b.dtype == np.uint8 and b.shape[1:] == (hw, hw, 3)
        digest(h, b)
    res["digest_contiguous"] = h.hexdigest()
    # spot check against the generator
    spot = np.array([0, 1, n // 2, n - 1])
    ref = np.stack([make_images(i // GEN_CHUNK * GEN_CHUNK, i % GEN_CHUNK + 1, hw)[-1] for i in spot])
    res["spot_check_ok"] = bool(np.array_equal(r.batch(spot), ref))
    res["final"] = {**proc_status(), **children_info()}
    return res


# ----------------------------------------------------------------------------- orchestration
def sub(args: list, timeout: float = 1800, prefix: list | None = None, evict_root: Path | None = None) -> dict:
    out = LAB / "tmp_sub.json"
    if out.exists():
        out.unlink()
    before_snap = snapshot_spots()
    resident = None
    if evict_root is not None:
        evict(evict_root)
        resident = resident_MiB(evict_root)
    cmd = (prefix or []) + [PY, str(LAB / "formats.py"), *args, "--json-out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    prog = LAB / "tmp_progress.json"
    prog.unlink(missing_ok=True)
    env["FORMATS_PROGRESS"] = str(prog)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        d = {"error": f"timeout after {timeout}s (killed)", "process_wall_s": round(time.time() - t0, 1)}
        if prog.exists():
            d["progress_at_kill"] = json.loads(prog.read_text())
            pr = d["progress_at_kill"]
            d["img_s_until_kill"] = round(pr["items_done"] / max(pr["wall_s"], 1e-9))
        return d
    wall = time.time() - t0
    if p.returncode != 0 or not out.exists():
        return {"error": f"rc={p.returncode}", "stderr_tail": p.stderr[-3000:], "stdout_tail": p.stdout[-1000:],
                "process_wall_s": round(wall, 2)}
    d = json.loads(out.read_text())
    d["process_wall_s"] = round(wall, 2)
    d["resident_MiB_after_evict"] = resident
    d["new_files_outside_lab"] = snapshot_diff(before_snap, snapshot_spots())
    if "first_batch_abs_time" in d:
        d["spawn_to_first_batch_s"] = round(d["first_batch_abs_time"] - t0, 3)
    d["stderr_tail"] = p.stderr[-600:]
    return d


def loadavg():
    return open("/proc/loadavg").read().split()[:3]


def cmd_run(a):
    data_root = LAB / "data" / a.tag
    data_root.mkdir(parents=True, exist_ok=True)
    results_path = LAB / "results.json"
    allres = json.loads(results_path.read_text()) if results_path.exists() else {}
    cfg = allres.setdefault(a.tag, {})
    cfg["config"] = {"n": a.n, "hw": a.hw, "batch": BATCH, "seed": SEED, "bytes_raw": a.n * a.hw * a.hw * 3}
    cfg.setdefault("write", {})
    cfg.setdefault("read", {})
    writers = a.formats.split(",") if a.formats else list(WRITERS)
    gen_s = ensure_source(a.n, a.hw)
    if gen_s:
        cfg["config"]["generate_source_s"] = round(gen_s, 1)
    for wname in writers:
        root = data_root / wname
        if a.rewrite or not root.exists():
            shutil.rmtree(root, ignore_errors=True)
            if wname not in ("npmemmap", "arrow_ipc"):
                pass
            else:
                root.mkdir(parents=True)
            print(f"[{time.strftime('%X')}] write {wname} load={loadavg()}", flush=True)
            d = sub(["_write", wname, str(root), str(a.n), str(a.hw)])
            d["loadavg"] = loadavg()
            if "write_s" in d:
                d["img_s"] = round(a.n / d["write_s"])
                d["disk_MiB"] = round(dir_bytes(root) / 2**20, 1)
                d["disk_ratio_vs_raw"] = round(dir_bytes(root) / (a.n * a.hw * a.hw * 3), 3)
                d["files"] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:12]
                d["n_files"] = sum(1 for p in root.rglob("*") if p.is_file())
            cfg["write"][wname] = d
            print("   ", {k: d.get(k) for k in ("write_s", "img_s", "disk_MiB", "error")}, flush=True)
            results_path.write_text(json.dumps(allres, indent=1))
    rounds = a.rounds
    for rnd in range(rounds):
        for wname in writers:
            for rname in WRITERS[wname]:
                if a.readers and rname not in a.readers.split(","):
                    continue
                root = data_root / wname
                print(f"[{time.strftime('%X')}] read {rname} round {rnd} load={loadavg()}", flush=True)
                d = sub(["_read", rname, str(root), str(a.n), str(a.hw), "--warm-epochs", str(a.warm_epochs)],
                        evict_root=root)
                d["loadavg"] = loadavg()
                cfg["read"].setdefault(rname, []).append(d)
                print("   ", {k: d.get(k) for k in ("open_s", "start_to_first_batch_s", "random_cold", "random_warm",
                                                     "contiguous_warm", "spot_check_ok", "error")}, flush=True)
                results_path.write_text(json.dumps(allres, indent=1))
    # consistency: every reader must produce the same bytes in our order
    def dset(v, key):
        return {x.get(key) for x in v if x.get(key)}
    base = cfg["read"].get("npmemmap", [])
    cfg["same_bytes_as_npmemmap"] = {
        r: {"epoch0_order": (dset(v, "digest_epoch0") == dset(base, "digest_epoch0")) if dset(v, "digest_epoch0") else None,
            "contiguous": dset(v, "digest_contiguous") == dset(base, "digest_contiguous"),
            "spot_check_vs_generator": all(x.get("spot_check_ok") for x in v)}
        for r, v in cfg["read"].items()}
    results_path.write_text(json.dumps(allres, indent=1))
    if not a.keep:
        shutil.rmtree(data_root, ignore_errors=True)
        source_path(a.n, a.hw).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- cgroup (v1 memory controller here)
CG_V1 = Path("/sys/fs/cgroup/memory")


def cg_stat(cg: Path) -> dict:
    out = {}
    for ln in (cg / "memory.stat").read_text().splitlines():
        k, v = ln.split()
        out[k] = int(v)
    return out


def cmd_cgroup(a):
    """Write a dataset ~4x the limit, then read one epoch inside a memory-limited cgroup."""
    results_path = LAB / "results.json"
    allres = json.loads(results_path.read_text()) if results_path.exists() else {}
    out = allres.setdefault("cgroup", {})
    out.setdefault("runs", []).append(" ".join(sys.argv[1:]))
    out["env"] = {"cgroup_v2_unified_controllers": Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().strip(),
                  "v1_memory_controller": CG_V1.is_dir()}
    data_root = LAB / "data" / f"cg_{a.n}_{a.hw}"
    data_root.mkdir(parents=True, exist_ok=True)
    limit = a.limit_mb * 2**20
    cg = CG_V1 / f"formats_lab_{os.getpid()}"
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(str(limit))
    try:
        (cg / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError:
        pass
    prefix = ["bash", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "cg"]
    ensure_source(a.n, a.hw)
    evict(source_path(a.n, a.hw))
    try:
        for wname in a.formats.split(","):
            root = data_root / wname
            if not root.exists():
                if wname in ("npmemmap", "arrow_ipc"):
                    root.mkdir(parents=True)
                print(f"[{time.strftime('%X')}] cg write {wname}", flush=True)
                # the writer runs inside the cgroup too (bounded-memory writing)
                (cg / "memory.max_usage_in_bytes").write_text("0")
                d = sub(["_write", wname, str(root), str(a.n), str(a.hw)], prefix=None if a.write_outside else prefix)
                d["written_inside_cgroup"] = not a.write_outside
                d["cgroup_peak_MiB"] = round(int((cg / "memory.max_usage_in_bytes").read_text()) / 2**20, 1)
                d["disk_MiB"] = round(dir_bytes(root) / 2**20, 1)
                out.setdefault(f"{a.n}x{a.hw}" + ("_written_outside" if a.write_outside else ""), {}).setdefault("write", {})[wname] = d
                print("   ", {k: d.get(k) for k in ("write_s", "disk_MiB", "cgroup_peak_MiB", "error")}, flush=True)
            for rname in WRITERS[wname]:
                if a.readers and rname not in a.readers.split(","):
                    continue
                (cg / "memory.max_usage_in_bytes").write_text("0")
                fail0 = int((cg / "memory.failcnt").read_text())
                print(f"[{time.strftime('%X')}] cg read {rname}", flush=True)
                stat0 = cg_stat(cg)
                d = sub(["_read", rname, str(root), str(a.n), str(a.hw), "--cgroup-mode"], prefix=prefix,
                        evict_root=root, timeout=a.read_timeout)
                stat1 = cg_stat(cg)
                d["cgroup_pages_charged_MiB"] = round((stat1.get("pgpgin", 0) - stat0.get("pgpgin", 0)) * 4096 / 2**20, 1)
                d["cgroup_pgmajfault"] = stat1.get("pgmajfault", 0) - stat0.get("pgmajfault", 0)
                d["limit_MiB"] = a.limit_mb
                d["dataset_MiB"] = round(dir_bytes(root) / 2**20, 1)
                d["cgroup_peak_MiB"] = round(int((cg / "memory.max_usage_in_bytes").read_text()) / 2**20, 1)
                d["cgroup_failcnt_delta"] = int((cg / "memory.failcnt").read_text()) - fail0
                oom = (cg / "memory.oom_control").read_text()
                d["oom_kill_total"] = [ln for ln in oom.splitlines() if ln.startswith("oom_kill ")]
                d["completed"] = "random_cold" in d
                # make sure nothing of ours is left in the cgroup (a killed reader's children)
                for pid in (cg / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), 9)
                    except OSError:
                        pass
                out.setdefault(f"{a.n}x{a.hw}" + ("_written_outside" if a.write_outside else ""), {}).setdefault("read", {})[rname] = d
                print("   ", {k: d.get(k) for k in ("completed", "random_cold", "mem_epoch0", "cgroup_peak_MiB",
                                                     "oom_kill_total", "error")}, flush=True)
                results_path.write_text(json.dumps(allres, indent=1))
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.2)
        results_path.write_text(json.dumps(allres, indent=1))
        if not a.keep:
            shutil.rmtree(data_root, ignore_errors=True)
            source_path(a.n, a.hw).unlink(missing_ok=True)


def cmd_ulimit(a):
    """Does `ulimit -v` (RLIMIT_AS) break memory mapping? mmap counts towards the virtual size."""
    results_path = LAB / "results.json"
    allres = json.loads(results_path.read_text()) if results_path.exists() else {}
    d = LAB / "data" / "ulimit"
    d.mkdir(parents=True, exist_ok=True)
    f = d / "big.npy"
    size = 1024 * 2**20
    mm = np.lib.format.open_memmap(f, mode="w+", dtype=np.uint8, shape=(size,))
    mm[::4096] = 1
    mm.flush()
    del mm
    out = {}
    code_np = ("import numpy as np; a=np.load('%s', mmap_mode='r'); print('ok', int(a[::4096].sum()))" % f)
    for lim in (768, 2048):
        p = subprocess.run(["bash", "-c", f"ulimit -v {lim * 1024}; exec {PY} -c \"{code_np}\""],
                           capture_output=True, text=True)
        out[f"np_mmap_1GiB_file_ulimit_v_{lim}MiB"] = (p.stdout.strip() or p.stderr.strip().splitlines()[-1])[:200]
    for mod in ("pyarrow", "datasets", "streaming", "litdata", "torch"):
        p = subprocess.run(["bash", "-c", f"ulimit -v {2048 * 1024}; exec {PY} -c 'import {mod}; print(\"ok\")'"],
                           capture_output=True, text=True)
        out[f"import_{mod}_ulimit_v_2GiB"] = (p.stdout.strip() or (p.stderr.strip().splitlines() or ["?"])[-1])[:200]
        p = subprocess.run([PY, "-c", f"import {mod}; print(open('/proc/self/status').read())"],
                           capture_output=True, text=True)
        vm = [ln for ln in p.stdout.splitlines() if ln.startswith(("VmSize", "VmRSS"))]
        out[f"import_{mod}_vm"] = " ".join(" ".join(x.split()) for x in vm)
    allres["ulimit_v"] = out
    results_path.write_text(json.dumps(allres, indent=1))
    shutil.rmtree(d, ignore_errors=True)
    print(json.dumps(out, indent=1))


def cmd_remote(a):
    """Verify (offline) each library's remote-URL API exists in the installed version."""
    import importlib
    import importlib.metadata as md
    import inspect
    out = {}

    def has(mod):
        try:
            importlib.import_module(mod)
            return True
        except Exception as e:  # noqa: BLE001
            return f"no ({type(e).__name__})"
    vers = {}
    for pkg in ("numpy", "pyarrow", "datasets", "mosaicml-streaming", "litdata", "torch", "torchvision", "fsspec",
                "huggingface-hub", "boto3", "google-cloud-storage", "obstore", "s3fs", "gcsfs", "psutil", "pillow"):
        try:
            vers[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            vers[pkg] = None
    out["versions"] = vers
    import datasets
    import litdata
    import pyarrow.fs as pafs
    import streaming
    out["datasets"] = {
        "load_from_disk": str(inspect.signature(datasets.load_from_disk)),
        "save_to_disk": str(inspect.signature(datasets.Dataset.save_to_disk)),
        "fsspec_s3_protocol_needs": "s3fs", "s3fs_importable": has("s3fs"), "gcsfs_importable": has("gcsfs"),
        "note": "load_from_disk on a remote fsspec URL first fs.download()s the whole dataset to a local temp "
                "dir (arrow_dataset.py), then memory-maps it; load_dataset(..., streaming=True) is the "
                "streaming path but returns an IterableDataset (no random index).",
    }
    sd = inspect.signature(streaming.StreamingDataset.__init__)
    from streaming.base.storage import download as sdl
    out["mosaicml-streaming"] = {
        "StreamingDataset params": [p for p in sd.parameters if p in ("remote", "local", "cache_limit", "predownload",
                                                                     "download_timeout", "shuffle", "batch_size")],
        "downloaders": [n for n in dir(sdl) if n.endswith("Downloader") and n != "CloudDownloader"],
        "boto3_importable": has("boto3"), "google.cloud.storage_importable": has("google.cloud.storage"),
        "note": "StreamingDataset(remote='s3://b/p' or 'gs://b/p', local='/cache/dir'): whole shards are "
                "downloaded into local, cache_limit evicts shards.",
    }
    ld = inspect.signature(litdata.StreamingDataset.__init__)
    try:
        from litdata.streaming import downloader as ldl
        dls = [n for n in dir(ldl) if n.endswith("Downloader")]
    except Exception as e:  # noqa: BLE001
        dls = repr(e)
    out["litdata"] = {
        "StreamingDataset params": [p for p in ld.parameters if p in ("input_dir", "cache_dir", "max_cache_size",
                                                                     "storage_options", "max_pre_download")],
        "downloaders": dls, "boto3_importable": has("boto3"), "obstore_importable": has("obstore"),
        "google.cloud.storage_importable": has("google.cloud.storage"),
        "note": "StreamingDataset('s3://b/p' | 'gs://b/p', cache_dir=..., max_cache_size=...): chunks downloaded to "
                "a local cache (default ~/.lightning/chunks); optimize(output_dir='s3://...') uploads.",
    }
    out["pyarrow"] = {"filesystems": [n for n in dir(pafs) if n.endswith("FileSystem")],
                      "note": "pa.fs.S3FileSystem/GcsFileSystem.open_input_file() + pa.ipc.open_file() reads record "
                              "batches by byte range (no mmap); pa.memory_map needs a local file."}
    out["npmemmap"] = {"note": "local files only; copy down first (e.g. fsspec/boto3 get)."}
    allres_path = LAB / "results.json"
    allres = json.loads(allres_path.read_text()) if allres_path.exists() else {}
    allres["remote"] = out
    allres_path.write_text(json.dumps(allres, indent=1))
    print(json.dumps(out, indent=1))


def main():
    ap = argparse.ArgumentParser()
    sp = ap.add_subparsers(dest="cmd", required=True)
    r = sp.add_parser("run")
    r.add_argument("--n", type=int, default=50000)
    r.add_argument("--hw", type=int, default=32)
    r.add_argument("--tag", default=None)
    r.add_argument("--formats", default="")
    r.add_argument("--readers", default="")
    r.add_argument("--rounds", type=int, default=1)
    r.add_argument("--warm-epochs", type=int, default=3)
    r.add_argument("--rewrite", action="store_true")
    r.add_argument("--keep", action="store_true")
    c = sp.add_parser("cgroup")
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--hw", type=int, default=32)
    c.add_argument("--limit-mb", type=int, required=True)
    c.add_argument("--formats", default="npmemmap,arrow_ipc")
    c.add_argument("--readers", default="")
    c.add_argument("--keep", action="store_true")
    c.add_argument("--read-timeout", type=float, default=180)
    c.add_argument("--write-outside", action="store_true", help="write outside the cgroup (read inside)")
    sp.add_parser("ulimit")
    sp.add_parser("remote")
    sp.add_parser("report")
    w = sp.add_parser("_write")
    w.add_argument("fmt")
    w.add_argument("root")
    w.add_argument("n", type=int)
    w.add_argument("hw", type=int)
    w.add_argument("--json-out", required=True)
    rd = sp.add_parser("_read")
    rd.add_argument("rname")
    rd.add_argument("root")
    rd.add_argument("n", type=int)
    rd.add_argument("hw", type=int)
    rd.add_argument("--warm-epochs", type=int, default=3)
    rd.add_argument("--max-warm-s", type=float, default=90)
    rd.add_argument("--cgroup-mode", action="store_true")
    rd.add_argument("--json-out", required=True)
    a = ap.parse_args()
    if a.cmd == "run":
        a.tag = a.tag or f"n{a.n}_{a.hw}"
        cmd_run(a)
    elif a.cmd == "cgroup":
        cmd_cgroup(a)
    elif a.cmd == "ulimit":
        cmd_ulimit(a)
    elif a.cmd == "remote":
        cmd_remote(a)
    elif a.cmd == "report":
        import report
        report.main()
    elif a.cmd == "_write":
        st = proc_status()
        d = write_format(a.fmt, Path(a.root), a.n, a.hw)
        d["writer_hwm_MiB"] = proc_status()["VmHWM"]
        d["writer_start_rss_MiB"] = st["VmRSS"]
        d["children_peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        Path(a.json_out).write_text(json.dumps(d))
    elif a.cmd == "_read":
        d = read_format(a.rname, Path(a.root), a.n, a.hw, a.warm_epochs, a.max_warm_s, a.cgroup_mode)
        Path(a.json_out).write_text(json.dumps(d))


if __name__ == "__main__":
    main()
