"""results.json -> results.md (tables). Run: venv/bin/python formats.py report"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

LAB = Path(__file__).resolve().parent

WRITER_OF = {"npmemmap": "npmemmap", "npmemmap_madv_random": "npmemmap", "np_pread": "npmemmap",
             "arrow_ipc_npview_madv_random": "arrow_ipc", "arrow_ipc_npview": "arrow_ipc", "arrow_ipc_take": "arrow_ipc",
             "hf_binary_arrow": "hf_binary", "hf_array3d_numpy": "hf_array3d", "mds_getitem": "mds",
             "litdata_getitem": "litdata", "litdata_getitem_default": "litdata"}
REMOTE = {"npmemmap": "none (copy down first)",
          "arrow_ipc": "pyarrow.fs S3/GCS byte-range reads (no mmap)",
          "hf_binary": "load_from_disk('s3://..', storage_options) via fsspec+s3fs/gcsfs: downloads all, then mmap",
          "hf_array3d": "same as hf_binary",
          "mds": "StreamingDataset(remote='s3://..'/'gs://..', local=cache, cache_limit=)",
          "litdata": "StreamingDataset('s3://..'/'gs://..', cache_dir=, max_cache_size=)"}


def clean(lst):
    return [(p, m) for p, m in (lst or []) if not any(x in p for x in ("bash_tool", "bash_jobs", "ddpm-", "prefect"))]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=0):
    if x is None:
        return "–"
    if isinstance(x, float) and nd:
        return f"{x:.{nd}f}"
    return f"{round(x):,}"


def spread(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return ""
    return f" ({min(xs):,.0f}–{max(xs):,.0f})"


def config_table(tag, cfg):
    n = cfg["config"]["n"]
    hw = cfg["config"]["hw"]
    lines = [f"## {tag}: N={n:,} images of {hw}x{hw}x3 uint8 ({cfg['config']['bytes_raw'] / 2**20:.0f} MiB raw), "
             f"batch {cfg['config']['batch']}", ""]
    w = cfg["write"]
    base_w = w.get("npmemmap", {}).get("img_s")
    lines += ["### Write (one run each, incl. fsync; source images pre-generated, read from a memmap)", "",
              "| writer | write s | img/s | x memmap | MiB on disk | x raw | files | writer VmHWM MiB incl. file pages (children) | extra temp |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for k, d in w.items():
        if "error" in d and "write_s" not in d:
            lines.append(f"| {k} | ERROR {d['error']} | | | | | | | |")
            continue
        extra = []
        if "generator_cache_MiB" in d:
            extra.append(f"from_generator cache {d['generator_cache_MiB']} MiB, then save_to_disk copy "
                         f"({d['from_generator_s']}s + {d['save_to_disk_s']}s)")
        if clean(d.get("new_files_outside_lab")):
            extra.append("; ".join(f"{p} +{m} MiB" for p, m in clean(d["new_files_outside_lab"])[:3]))
        lines.append(f"| {k} | {d['write_s']} | {fmt(d['img_s'])} | {d['img_s'] / base_w:.2f} | {d['disk_MiB']} | "
                     f"{d['disk_ratio_vs_raw']} | {d['n_files']} | {d['writer_hwm_MiB']:.0f} ({d['children_peak_rss_MiB']:.0f}) | "
                     f"{' '.join(extra)} |")
    lines.append("")
    r = cfg["read"]
    base = r.get("npmemmap", [])
    b_warm = med([x.get("random_warm", {}).get("img_s_median") for x in base])
    b_cold = med([x.get("random_cold", {}).get("img_s") for x in base])
    b_cont = med([x.get("contiguous_warm", {}).get("img_s") for x in base])
    b_cpu = med([x.get("random_warm", {}).get("img_per_cpu_s_median") for x in base])
    rounds = max(len(v) for v in r.values())
    lines += [f"### Read (fresh process per reader; {rounds} interleaved round(s); medians, range over rounds in brackets)", "",
              "| reader | import s | open s | spawn→1st batch s | random cold img/s | random warm img/s | x memmap | "
              "random img per CPU-s | x memmap | contiguous img/s | x memmap | RSS peak growth MiB (epoch 0) | anon growth MiB | "
              "RssAnon / RssFile MiB after epoch | mmapped dataset files (MiB) | threads / child procs | same bytes |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    same = cfg.get("same_bytes_as_npmemmap", {})
    for k, v in r.items():
        ok = [x for x in v if "random_cold" in x]
        if not ok:
            lines.append(f"| {k} | ERROR {v[0].get('error')} |" + " |" * 15)
            continue
        cold = [x["random_cold"]["img_s"] for x in ok]
        warm = [x.get("random_warm", {}).get("img_s_median") for x in ok]
        cpu = [x.get("random_warm", {}).get("img_per_cpu_s_median") for x in ok]
        cont = [x.get("contiguous_warm", {}).get("img_s") for x in ok]
        m = ok[-1]["mem_epoch0"]
        s = same.get(k, {})
        same_s = "yes" if s and s.get("contiguous") and s.get("spot_check_vs_generator") and s.get("epoch0_order") in (True, None) else str(s)
        lim = ok[0].get("random_items_per_epoch")
        note = f" (first {lim:,} idx)" if lim and lim < cfg["config"]["n"] else ""
        lines.append(
            f"| {k}{note} | {med([x['import_s'] for x in ok]):.2f} | {med([x['open_s'] for x in ok]):.3f} | "
            f"{med([x.get('spawn_to_first_batch_s') for x in ok]):.2f} | {fmt(med(cold))}{spread(cold)} | "
            f"{fmt(med(warm))}{spread(warm)} | {med(warm) / b_warm:.3f} | {fmt(med(cpu))} | {med(cpu) / b_cpu:.3f} | "
            f"{fmt(med(cont))}{spread(cont)} | {med(cont) / b_cont:.3f} | "
            f"{med([x['mem_epoch0']['rss_peak_growth_MiB'] for x in ok]):.1f} | {med([x['mem_epoch0']['anon_growth_MiB'] for x in ok]):.1f} | "
            f"{m['RssAnon']:.0f} / {m['RssFile']:.0f} | {ok[-1]['mapped_under_dataset']['n_files']} ({ok[-1]['mapped_under_dataset']['mapped_MiB']}) | "
            f"{ok[-1]['after_open']['threads']} / {ok[-1]['after_open']['child_processes']} | {same_s} |")
    lines.append("")
    lines.append(f"Baseline np.memmap: random warm {fmt(b_warm)} img/s, cold {fmt(b_cold)} img/s, contiguous {fmt(b_cont)} img/s.")
    lines.append("")
    lines.append("Per-reader API and side effects:")
    lines.append("")
    for k, v in r.items():
        x = v[-1]
        side = []
        if x.get("dev_shm_new_while_open"):
            side.append(f"/dev/shm while open: {', '.join(x['dev_shm_new_while_open'])}")
        if clean(x.get("new_files_outside_lab")):
            side.append("left behind: " + "; ".join(f"{p} (+{mb} MiB)" for p, mb in clean(x["new_files_outside_lab"])))
        if x.get("after_open", {}).get("child_cmds"):
            side.append("child: " + "; ".join(x["after_open"]["child_cmds"]))
        lines.append(f"- **{k}**: `{x.get('api')}`; per-item only: {x.get('per_item_only')}. "
                     f"Remote: {REMOTE[WRITER_OF[k]]}. {' '.join(side)}")
    lines.append("")
    return lines


QUAL = {  # reader -> (mmap?, bounded-memory result in the cgroup runs)
    "npmemmap": ("yes (np.memmap)", "thrashes: 100x read amplification, 166 img/s, killed"),
    "npmemmap_madv_random": ("yes + MADV_RANDOM", "completes: 2.0x/1.2x read ampl."),
    "np_pread": ("no (preadv)", "completes: RSS flat (~42 MiB)"),
    "arrow_ipc_npview": ("yes (pa.memory_map)", "thrashes like np.memmap"),
    "arrow_ipc_npview_madv_random": ("yes + MADV_RANDOM", "completes"),
    "arrow_ipc_take": ("yes, but take() concatenates all chunks", "OOM-killed on first batch"),
    "hf_binary_arrow": ("yes (MemoryMappedTable)", "thrashes like np.memmap"),
    "hf_array3d_numpy": ("yes", "not run (same mmap path)"),
    "mds_getitem": ("no: open()+read() per sample", "completes: 1.4x read ampl."),
    "litdata_getitem": ("yes (MADV_SEQUENTIAL+WILLNEED)", "thrashes: 42x read ampl.; optimize() OOM in 768 MiB"),
    "litdata_getitem_default": ("yes", "–"),
}


def summary(res):
    cfg = res.get("n50000_32x32")
    if not cfg:
        return []
    r, w = cfg["read"], cfg["write"]
    bw = med([x["random_warm"]["img_s_median"] for x in r["npmemmap"]])
    bc = med([x["contiguous_warm"]["img_s"] for x in r["npmemmap"]])
    lines = ["## Summary (N=50,000 32x32; medians of 2 rounds; ratios vs np.memmap in the same run)", "",
             "| reader | write img/s | MiB on disk | import+open s | random warm img/s (x memmap) | "
             "random img per CPU-s | contiguous img/s (x memmap) | epoch RSS growth: anon / file MiB | mmap | "
             "bounded-memory run (cgroup, data 4x limit) |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for k, v in r.items():
        ok = [x for x in v if "random_warm" in x]
        if not ok:
            continue
        wd = w.get(WRITER_OF[k], {})
        warm = med([x["random_warm"]["img_s_median"] for x in ok])
        cont = med([x["contiguous_warm"]["img_s"] for x in ok])
        lines.append(
            f"| {k} | {fmt(wd.get('img_s'))} | {wd.get('disk_MiB')} | "
            f"{med([x['import_s'] + x['open_s'] for x in ok]):.2f} | {fmt(warm)} ({warm / bw:.3f}) | "
            f"{fmt(med([x['random_warm']['img_per_cpu_s_median'] for x in ok]))} | {fmt(cont)} ({cont / bc:.3f}) | "
            f"{med([x['mem_epoch0']['anon_growth_MiB'] for x in ok]):.1f} / {med([x['mem_epoch0']['file_growth_MiB'] for x in ok]):.1f} | "
            f"{QUAL[k][0]} | {QUAL[k][1]} |")
    lines += ["", "np_pread / *_madv_random readers were added after the main matrix and measured only in the "
              "cgroup runs (their 3,072-image smoke run is not shown).", ""]
    return lines


def main():
    res = json.loads((LAB / "results.json").read_text())
    out = ["# Prepared-dataset storage formats: measurements", "",
           "Generated by `formats.py report` from results.json. Machine: 2 vCPU shared with other heavy jobs "
           "(load average 4–5 during the runs), ext4 on virtio disk; wall-clock numbers are noisy, "
           "CPU-time throughput (img per CPU-s) is steadier. 'cold' = the dataset's pages were evicted "
           "(fsync + POSIX_FADV_DONTNEED) before the reader process started; 'warm' = the following epochs.", "",
           "Reproduce: `cd /work/formats-lab && OMP_NUM_THREADS=1 bash reproduce.sh`", ""]
    out += summary(res)
    for tag, cfg in res.items():
        if isinstance(cfg, dict) and "read" in cfg and "config" in cfg:
            out += config_table(tag, cfg)
    if "cgroup" in res:
        out += ["## Bounded memory: one random epoch (cold) inside a memory-limited cgroup (v1 memory controller)", "",
                "Data written inside the same cgroup, then evicted from the page cache before the reader starts. "
                "Readers that did not finish within the time cap were killed; 'img/s' is then the rate until the kill. "
                "'disk read' = the reader's /proc/self/io read_bytes (the host may serve these from its own cache).", "",
                "| dataset | reader | limit MiB | dataset MiB | completed | img/s | disk read MiB (x dataset) | major faults | "
                "cgroup peak MiB | VmHWM MiB | RssAnon / RssFile MiB | note |",
                "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for dtag, dd in res["cgroup"].items():
            if dtag in ("env", "runs"):
                continue
            for k, d in dd.get("read", {}).items():
                m = d.get("mem_epoch0") or {}
                pr = d.get("progress_at_kill") or {}
                done = d.get("completed")
                ips = d.get("random_cold", {}).get("img_s") if done else d.get("img_s_until_kill")
                rd = d.get("disk_read_MiB_epoch0") if done else pr.get("disk_read_MiB")
                ds = d.get("dataset_MiB") or 1
                note = "" if done else (d.get("error", "") + (f"; {pr.get('items_done'):,} images read before the kill" if pr else ""))
                if "rc=-9" in str(d.get("error")):
                    note = "OOM-killed by the cgroup"
                if "No chunks found" in str(d.get("stderr_tail")):
                    note = "nothing to read: the LitData write above failed silently"
                hwm = m.get("hwm", pr.get("VmHWM"))
                ra = m.get("RssAnon", pr.get("RssAnon"))
                rf = m.get("RssFile", pr.get("RssFile"))
                out.append(f"| {dtag} | {k} | {d.get('limit_MiB')} | {d.get('dataset_MiB')} | {done} | {fmt(ips)} | "
                           f"{fmt(rd)} ({(rd or 0) / ds:.1f}x) | {fmt(d.get('cgroup_pgmajfault'))} | {d.get('cgroup_peak_MiB')} | "
                           f"{fmt(hwm)} | {fmt(ra)} / {fmt(rf)} | {note} |")
            for k, d in dd.get("write", {}).items():
                inside = d.get("written_inside_cgroup", True)
                ok = "write_s" in d and (d.get("disk_MiB") or 0) > 1
                note = d.get("error", "")
                if "write_s" in d and not ok:
                    note = ("optimize() returned normally (exit 0) but its worker process was OOM-killed "
                            "by the cgroup: index.json lists no chunks, dataset empty")
                if not inside:
                    note = (note + " written outside the cgroup").strip()
                out.append(f"| {dtag} | write: {k} | | {d.get('disk_MiB')} | {ok} | "
                           f"{fmt(int(dtag.split('x')[0]) / d['write_s'] if 'write_s' in d else None)} | | | "
                           f"{d.get('cgroup_peak_MiB') if inside else '–'} | {fmt(d.get('writer_hwm_MiB')) if inside else '–'} | | {note} |")
        out.append("")
    if "ulimit_v" in res:
        out += ["## `ulimit -v` (RLIMIT_AS) vs memory mapping", "", "| check | result |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in res["ulimit_v"].items()]
        out.append("")
    if "remote" in res:
        out += ["## Versions and remote-URL APIs (checked offline in the installed packages)", "", "```",
                json.dumps(res["remote"], indent=1), "```", ""]
    (LAB / "results.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
