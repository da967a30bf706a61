"""Every method end to end on random-weight models of the real architectures (``random:<model>`` specs, no
download) at the papers' resolutions, on the CPU: per-stage seconds and peak memory (issue 21).

    nice -n 5 python benchmarks/bench_real_arch.py [--methods iseg diffsegmenter diclip moduseg-sam
        moduseg-superpixel sd21-parts synseg] [--threads 2] [--limit-gib 24] [--out benchmarks/results]

A rerun of some cases (``--methods``) on the same day replaces those rows of the day's file and keeps the
others. ``sd21-parts`` is not a method: the VAE encoder and one UNet forward of SD-2.1-base apart, to
attribute the diffusion methods' ``unet`` stage. ModuSeg's SAM proposer is split into its own sub-stages
(image encoder, prompt encoder + mask decoder, logit upsampling, filtering). What the results say:
benchmarks/results/real_arch_cpu_2026-12-06_findings.md.

Each method runs in its own child process (so one method's peak does not hide another's), builds through
``weakseg.create(name, **settings)`` and segments one image (a 512² toy-world scene; SynSeg 448²) with
image-level labels for 3 foreground classes + background, once (the first call: one-time costs such as
building the text rows are included). Timed: the model build, ``segment`` as a whole, and the method's own
stages (``method.timer.totals``; SynSeg has no stage timer, so its only stage is ``segment``).

Memory is the process's resident set (RSS): read from ``/proc/self/statm`` by a sampling thread every 5 ms,
the peak per stage (``peak_rss_gib``) and its growth over the RSS when the stage started
(``stage_growth_gib``: what the stage itself allocated on top of the models and the earlier stages' live
data), plus ``ru_maxrss`` of the whole child. RSS counts every allocation (tensors, the allocator's cache,
Python); it is an upper bound on the tensors alive. When the RSS passes ``--limit-gib`` (24 GiB, or what the
machine has available less 1 GiB if that is lower) the child records the stage it was in and its peak and
exits; the run goes on with the next method.

Writes ``<out>/real_arch_cpu_<date>.{json,md}`` with the date, command, torch version and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

GIB = 2 ** 30
PAGE = os.sysconf("SC_PAGE_SIZE")
CLASSES = ["background", "person", "dog", "car"]

#: method -> (registered method name, settings for weakseg.create, image side, notes)
CASES: dict[str, tuple[str, dict, int, str]] = {
    "iseg": ("iseg", dict(model="random:stabilityai/stable-diffusion-2-1-base", size=512,
                          clip_model="random:ViT-B-16"), 512,
             "SD-2.1-base at 512² (64x64 latents, self-attention P = 4096), the config's defaults (10 steps)"),
    "diffsegmenter": ("diffsegmenter", dict(model="random:stable-diffusion-v1-5/stable-diffusion-v1-5",
                                            image_size=512, clip_model="random:ViT-B-16"), 512,
                      "SD-1.5 at 512² (P = 4096), the config's defaults"),
    "diclip": ("diclip", dict(clip_model="random:ViT-B-16", sd_model="random:stabilityai/stable-diffusion-2-1-base"),
               512, "CLIP ViT-B/16 + SD-2.1-base at the config's size 320 (20x20 CLIP grid, 40x40 SD latents), "
                    "no key-value cache (cam_source static without a cache = patch), refine caa + walk"),
    "moduseg-sam": ("moduseg", dict(backbone="dinov2", backbone_model="random:facebook/dinov2-base", proposer="sam",
                                    proposer_model="random:facebook/sam-vit-base", check_backbone=False), 512,
                    "DINOv2-base + SAM ViT-B (1024² input, 32² points, the reference's AMG thresholds); random "
                    "SAM weights pass few or no masks through the thresholds, so the stages after 'propose' may "
                    "not run (see moduseg-superpixel)"),
    "moduseg-superpixel": ("moduseg", dict(backbone="dinov2", backbone_model="random:facebook/dinov2-base",
                                           proposer="superpixel", check_backbone=False), 512,
                           "DINOv2-base + the weight-free superpixel proposer (real regions, so every stage runs)"),
    "sd21-parts": ("sd21-parts", dict(model="random:stabilityai/stable-diffusion-2-1-base"), 512,
                   "not a method: the two halves of iSeg's 'unet' stage apart, the VAE encoder at 512² and one UNet "
                   "forward on 64x64 latents (every attention layer through SDPA, no capture)"),
    "synseg": ("synseg", dict(clip_model="random:ViT-B-16"), 448,
               "CLIP ViT-B/16 at the config's size 224, 5 views (whole + 4 quadrants) of a 448² image, an "
               "untrained head"),
}


# --------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


class StagePeaks:
    """A sampling thread: the peak RSS of every open stage (stages nest: ``push`` / ``pop``); past ``limit`` it
    calls ``on_limit(innermost stage, rss)``."""

    def __init__(self, limit: int, on_limit, period: float = 0.005):
        self.limit, self.on_limit, self.period = limit, on_limit, period
        self.open: list[str] = []
        self.start: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _update(self, now: int) -> None:
        for st in self.open:
            if now > self.peak.get(st, 0):
                self.peak[st] = now

    def push(self, stage: str) -> None:
        now = rss_bytes()
        with self._lock:
            self.open.append(stage)
            self.start.setdefault(stage, now)
            self._update(now)

    def pop(self) -> None:
        now = rss_bytes()
        with self._lock:
            self._update(now)
            self.open.pop()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            now = rss_bytes()
            with self._lock:
                self._update(now)
                stage = self.open[-1] if self.open else "setup"
            if now > self.limit:
                self.on_limit(stage, now)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def instrument_timer(timer, peaks: StagePeaks) -> None:
    """Make the method's StageTimer report its stages to ``peaks``."""
    import contextlib

    call = type(timer).__call__

    def wrapped(self, stage, device=None):
        inner = call(self, stage, device)

        @contextlib.contextmanager
        def ctx():
            peaks.push(stage)
            try:
                with inner:
                    yield
            finally:
                peaks.pop()
        return ctx()

    timer.__class__ = type("InstrumentedTimer", (type(timer),), {"__call__": wrapped})


def instrument_sam(proposer, peaks: StagePeaks, seconds: dict, calls: dict) -> None:
    """Sub-stages of SAM's automatic mask generation (inside ModuSeg's ``propose``): the image encoder, the
    prompt encoder + mask decoder, the image processor's upsampling of the mask logits, the filtering."""

    def timed(stage, fn):
        def run(*args, **kwargs):
            peaks.push(stage)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
                calls[stage] = calls.get(stage, 0) + 1
                peaks.pop()
        return run

    model, ip = proposer.model, proposer.image_processor
    model.get_image_embeddings = timed("sam: image encoder", model.get_image_embeddings)
    model.forward = timed("sam: prompt encoder + mask decoder", model.forward)
    ip.post_process_masks = timed("sam: post_process_masks (logits to image size)", ip.post_process_masks)
    proposer._filter_masks = timed("sam: filter (IoU, stability, crop edge)", proposer._filter_masks)


# --------------------------------------------------------------------------------------------- one method
def run_one(case: str, threads: int, limit: int, result_path: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    name, settings, side, note = CASES[case]
    row: dict = {"case": case, "method": name, "settings": settings, "image": f"{side}x{side}",
                 "classes": CLASSES, "note": note, "threads": threads}

    def on_limit(stage, now):
        row.update(status="over memory limit", failed_stage=stage, failed_rss_gib=round(now / GIB, 2),
                   limit_gib=round(limit / GIB, 2))
        row["stages"] = stage_rows()
        from weakseg.io import write_json
        write_json(result_path, row)
        os._exit(3)

    peaks = StagePeaks(limit, on_limit)
    seconds: dict[str, float] = {}
    calls: dict[str, int] = {}

    def stage_rows():
        out = {}
        for st, peak in peaks.peak.items():
            out[st] = {"seconds": round(seconds[st], 3) if st in seconds else None,
                       "peak_rss_gib": round(peak / GIB, 3),
                       "stage_growth_gib": round((peak - peaks.start.get(st, peak)) / GIB, 3)}
        return out

    import weakseg
    from weakseg.toy.world import ToyWorld

    if name == "sd21-parts":
        run_sd_parts(settings["model"], side, peaks, seconds, row, result_path)
        return
    tmp = Path(tempfile.mkdtemp(prefix="weakseg-real-arch-"))
    if name == "moduseg":
        settings = dict(settings, bank=str(make_bank(tmp / "bank.safetensors", dim=768)))
        row["settings"] = settings
    peaks.push("build")
    t0 = time.perf_counter()
    method = weakseg.create(name, device="cpu", **settings)
    if name == "moduseg":
        _ = method.proposer  # built lazily: count it with the build
    if name == "diclip":
        _ = method.sd  # built lazily: count it with the build
    seconds["build"] = time.perf_counter() - t0
    peaks.pop()
    if getattr(method, "_proposer", None) is not None and hasattr(method._proposer, "image_processor"):
        instrument_sam(method._proposer, peaks, seconds, calls)
    timer = getattr(method, "timer", None)
    if timer is not None:
        instrument_timer(timer, peaks)
        timer.reset()
    image = ToyWorld(size=side, split="test", num_scenes=1)[0].image
    labels = torch.ones(1, len(CLASSES), dtype=torch.bool)
    peaks.push("segment")
    t0 = time.perf_counter()
    out = method.segment([image], CLASSES, labels)
    seconds["segment"] = time.perf_counter() - t0
    peaks.pop()
    peaks.close()
    if timer is not None:
        seconds.update(timer.totals)
        calls.update(timer.counts)
    row["stage_calls"] = calls
    row["stages"] = stage_rows()
    row["status"] = "ok"
    row["output"] = {"scores": list(out.scores.shape), "labels_present": sorted(set(out.labels.unique().tolist())),
                     "finite": bool(torch.isfinite(out.scores).all())}
    row["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
    from weakseg.io import write_json
    write_json(result_path, row)


def run_sd_parts(spec: str, side: int, peaks: StagePeaks, seconds: dict, row: dict, result_path: Path) -> None:
    import torch
    from weakseg.core import BACKBONES
    from weakseg.io import write_json
    from weakseg.toy.world import ToyWorld

    peaks.push("build")
    t0 = time.perf_counter()
    sd = BACKBONES.build("stable-diffusion", spec, device="cpu", dtype=torch.float32)
    seconds["build"] = time.perf_counter() - t0
    peaks.pop()
    image = ToyWorld(size=side, split="test", num_scenes=1)[0].image
    embeds, _ = sd.encode_prompt(["a photograph of person and dog and car"])
    for stage, fn in (("vae encode", lambda: sd.encode_images([image], side, resample="bilinear")),
                      ("unet forward", lambda: sd.unet(torch.randn(1, 4, side // 8, side // 8), 100, embeds))):
        peaks.push(stage)
        t0 = time.perf_counter()
        out = fn()
        seconds[stage] = time.perf_counter() - t0
        peaks.pop()
        del out
    peaks.close()
    row["stages"] = {st: {"seconds": round(seconds[st], 3), "peak_rss_gib": round(peaks.peak[st] / GIB, 3),
                          "stage_growth_gib": round((peaks.peak[st] - peaks.start[st]) / GIB, 3)} for st in seconds}
    row["status"] = "ok"
    row["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
    write_json(result_path, row)


def make_bank(path: Path, dim: int) -> Path:
    """A small ModuSeg bank of random unit vectors of the backbone's dim (4 classes x 64 rows)."""
    import torch
    from weakseg.methods.moduseg import FeatureBank

    g = torch.Generator().manual_seed(0)
    n = 64 * len(CLASSES)
    vectors = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    bank = FeatureBank(vectors, torch.arange(n) % len(CLASSES), torch.arange(n) // len(CLASSES),
                       [f"random-{i}" for i in range(64)], list(CLASSES), "random-vectors")
    return bank.save(path)


# --------------------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit-gib", type=float, default=24.0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    limit = int(min(a.limit_gib * GIB, available_bytes() - GIB))
    if a.one:
        try:
            run_one(a.one, a.threads, limit, Path(a.result))
        except Exception as e:  # recorded by the parent
            from weakseg.io import write_json
            write_json(Path(a.result), {"case": a.one, "status": "error", "error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]})
            return 1
        return 0

    import torch
    from weakseg.bench import machine_facts
    from weakseg.io import write_json, write_text

    torch.set_num_threads(a.threads)
    facts = machine_facts(["cpu"])
    facts["load_avg_start"] = [round(v, 2) for v in os.getloadavg()]
    facts["memory_limit_gib"] = round(limit / GIB, 2)
    facts["mem_total_gib"] = round(os.sysconf("SC_PHYS_PAGES") * PAGE / GIB, 1)
    rows = []
    for case in a.methods:
        with tempfile.TemporaryDirectory() as d:
            res = Path(d) / "row.json"
            t0 = time.perf_counter()
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
            proc = subprocess.run([sys.executable, __file__, "--one", case, "--result", str(res),
                                   "--threads", str(a.threads), "--limit-gib", str(a.limit_gib)], env=env)
            wall = time.perf_counter() - t0
            row = json.loads(res.read_text()) if res.is_file() else {
                "case": case, "status": f"child exited {proc.returncode} without a result (killed?)"}
        row["child_wall_s"] = round(wall, 1)
        row["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
        rows.append(row)
        print(f"{case}: {row.get('status')} in {wall:.0f} s", flush=True)
    facts["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    stamp = time.strftime("%Y-%m-%d")
    out = Path(a.out)
    for r in rows:
        r["run"] = facts["date"]
    previous = out / f"real_arch_cpu_{stamp}.json"
    if previous.is_file():  # a partial rerun (--methods) replaces its cases and keeps the others of the day
        old = json.loads(previous.read_text())
        runs = [f for f in old.get("runs", [old.get("facts")]) if f] + [facts]
        done = {r["case"] for r in rows}
        kept = [dict(r, run=r.get("run") or old["facts"]["date"]) for r in old.get("rows", []) if r.get("case") not in done]
        rows = sorted(kept + rows, key=lambda r: list(CASES).index(r["case"]) if r["case"] in CASES else 99)
    else:
        runs = [facts]
    write_json(out / f"real_arch_cpu_{stamp}.json", {"facts": facts, "runs": runs, "rows": rows})
    write_text(out / f"real_arch_cpu_{stamp}.md", markdown(runs, rows))
    print(markdown(runs, rows))
    return 0


def markdown(runs: list[dict], rows: list[dict]) -> str:
    lines = [f"# Every method on random-weight real architectures, CPU ({runs[0]['date'][:10]})", ""]
    for facts in runs:
        lines += [f"Run {facts['date']}: `{facts['command']}` — torch {facts['torch']}, {facts['cpu_threads']} threads of "
                  f"{facts['cpu_count']} CPUs ({facts['cpu']}), {facts['mem_total_gib']} GiB RAM, memory limit "
                  f"{facts['memory_limit_gib']} GiB; load average at the start {facts['load_avg_start']}, at the end "
                  f"{facts['load_avg_end']}.", ""]
    lines += ["The machine is shared: other jobs ran during the measurements (see the load averages), so the "
              "seconds are upper bounds for this CPU.", "",
             "Models: `random:<model>` (real architecture, random weights, fp32). One image, classes "
             f"{', '.join(CLASSES)} with image-level labels (all present), the first `segment` call. Memory: the "
             "process RSS sampled every 5 ms; *peak* is the highest RSS during the stage, *growth* the peak less "
             "the RSS when the stage began (what the stage allocated on top of the models). Stages nest: "
             "`segment` holds the method's own stages.", ""]
    for r in rows:
        lines.append(f"## {r['case']}" + (f" (run {r['run']})" if r.get("run") else ""))
        lines.append("")
        if r.get("note"):
            lines.append(f"{r['note']}. Settings: `{json.dumps(r.get('settings', {}))}`, image {r.get('image')}.")
            lines.append("")
        status = r.get("status")
        if status != "ok":
            lines.append(f"**{status}**" + (f": {r['error']}" if r.get("error") else "") +
                         (f" — stage `{r['failed_stage']}` at {r['failed_rss_gib']} GiB RSS (limit "
                          f"{r['limit_gib']} GiB)" if r.get("failed_stage") else ""))
            lines.append("")
        if r.get("stages"):
            lines += ["| stage | calls | seconds | peak RSS GiB | growth GiB |", "|---|---|---|---|---|"]
            calls = r.get("stage_calls", {})
            for st, v in r["stages"].items():
                sec = "" if v["seconds"] is None else f"{v['seconds']:.2f}"
                lines.append(f"| {st} | {calls.get(st, 1)} | {sec} | {v['peak_rss_gib']:.2f} | "
                             f"{v['stage_growth_gib']:.2f} |")
            lines.append("")
        extra = [f"child wall {r.get('child_wall_s')} s", f"load average after {r.get('load_avg_after')}"]
        if r.get("max_rss_gib") is not None:
            extra.insert(0, f"process peak (ru_maxrss) {r['max_rss_gib']:.2f} GiB")
        if r.get("output"):
            extra.append(f"output {r['output']}")
        lines.append("; ".join(extra) + ".")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
