"""Embedding throughput: the bare forward, the embed stage end to end, and the usual hand-written loop.

    python benchmarks/embed.py --model ViT-S-32-alt --samples 1000

prints, for one model on one pool, in one run:
  (a) bare forward: the stage's own forward (both towers, normalise, cosine) on images already
      decoded and preprocessed, in this process, with all CPUs (or the GPU): the ceiling for (b);
  (b) the embed stage end to end from tar shards on an embedded Ray: range reads, decode,
      preprocess, forward, Parquet out; the stage's time as the manifest records it, actor start and
      model load included;
  (c) a baseline written the way DataComp / clip-retrieval users write it: open_clip +
      webdataset + torch DataLoader with worker processes decoding, preprocess and tokenize in the
      workers, forward of both towers in the main process; model creation and loader start included;
and the ratios b/a and b/c. Without --pool it writes a pool of JPEGs (default 640x480, quality 90,
captions of 5 to 30 words) under --work. Ingest runs before (b) and is not timed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

WORDS = ("red blue green small large photo of a the on with dog cat car tree house river mountain city street "
         "person people two three old new wooden metal bright dark sunny rainy table chair window garden").split()


def write_pool(folder: Path, samples: int, shards: int, width: int, height: int, seed: int = 0) -> list[str]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per_shard = -(-samples // shards)
    urls = []
    for shard in range(shards):
        path = folder / f"{shard:08d}.tar"
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
            for index in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                small = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
                draw = ImageDraw.Draw(image)
                for _ in range(3):
                    x, y = rng.integers(0, width - 60), rng.integers(0, height - 60)
                    size = rng.integers(30, 200)
                    draw.ellipse((x, y, x + size, y + size), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                caption = " ".join(rng.choice(WORDS, int(rng.integers(5, 31))))
                key = f"{index:09d}"
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", caption.encode()),
                                   (f"{key}.json", json.dumps({"uid": f"{index:032x}", "caption": caption}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    return urls


def bare_forward(args, urls: list[str], device: str, threads: int) -> float:
    """(a): EmbedWorker.embed on batches decoded and preprocessed beforehand."""
    import torch

    from pipeline import models
    from pipeline.stages import embed

    spec = models.resolve_spec(args.model, args.pretrained)
    worker = embed.EmbedWorker({"embed": vars(spec)}, device, args.precision, threads, args.draft_factor)
    key = next(iter(worker.models))
    prep = worker.preps[key]
    tokenizer = worker.models[key].tokenizer
    images, captions = [], []
    with tarfile.open(urls[0]) as archive:
        members = {m.name: m for m in archive.getmembers()}
        for name in sorted(members):
            if name.endswith(".jpg") and len(images) < args.batch_size * 3:
                images.append(embed.decode_image(archive.extractfile(members[name]).read(), [prep], args.draft_factor)[0])
                captions.append(archive.extractfile(members[name[:-4] + ".txt"]).read().decode())
    batches = [(np.stack(images[i:i + args.batch_size]), tokenizer(captions[i:i + args.batch_size]).numpy().astype(np.int32))
               for i in range(0, len(images), args.batch_size)]
    worker.embed(key, *batches[0])  # warm up
    rounds, count = max(1, args.forward_batches // len(batches)), 0
    started = time.perf_counter()
    for _ in range(rounds):
        for pixels, tokens in batches:
            image, text = worker.embed(key, pixels, tokens)
            (image * text).sum(dim=-1).cpu()
            count += len(pixels)
    if device == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - started)


def stage_end_to_end(args, pool: Path, work: Path, device: str) -> tuple[float, int, dict]:
    """(b): the pipeline with the embed stage; the embed stage's own time from the manifest."""
    from pipeline.runner import run_pipeline
    from tests.helpers import run_config

    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    embed_cfg = {"model": args.model, "pretrained": args.pretrained, "batch_size": args.batch_size,
                 "device": device, "precision": args.precision, "jpeg_draft_factor": args.draft_factor}
    run_pipeline(run_config(pool, out, embed=embed_cfg, basic_filter={"enabled": False}))
    stage = json.loads((out / "manifest.json").read_text())["stages"]["embed"]
    return stage["samples_out"] / stage["seconds"], stage["samples_out"], stage


def naive_loop(args, urls: list[str], device: str) -> tuple[float, int]:
    """(c): open_clip + webdataset + torch DataLoader, as in DataComp's and clip-retrieval's scripts."""
    import open_clip
    import torch
    import webdataset as wds

    started = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    dataset = (
        wds.WebDataset(urls, shardshuffle=False)
        .decode("pil")
        .to_tuple("jpg;png;webp", "txt")
        .map_tuple(preprocess, lambda text: tokenizer([text])[0])
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    count, scores = 0, []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        for images, texts in loader:
            image = model.encode_image(images.to(device))
            text = model.encode_text(texts.to(device))
            image = image / image.norm(dim=-1, keepdim=True)
            text = text / text.norm(dim=-1, keepdim=True)
            scores.append((image * text).sum(dim=-1).float().cpu())
            count += len(images)
    return count / (time.perf_counter() - started), count


def hardware(device: str) -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()} x {cpu}"
    if device == "cuda":
        import torch

        text += f", {torch.cuda.get_device_name(0)}"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-S-32-alt")
    parser.add_argument("--pretrained", default=None, help="tag or checkpoint; default: random weights")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--size", default="640x480", help="source image size of the generated pool, WxH")
    parser.add_argument("--pool", default=None, help="an existing pool of .tar shards instead of a generated one")
    parser.add_argument("--work", default="/tmp/curate-bench-embed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the baseline")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--draft-factor", type=float, default=2.0, help="embed.jpeg_draft_factor; 0 for full decoding")
    parser.add_argument("--forward-batches", type=int, default=6, help="batches timed for (a)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c")
    parser.add_argument("--repeat", type=int, default=2, help="run b and c this many times, alternating; report the best")
    args = parser.parse_args(argv)
    args.draft_factor = args.draft_factor or None

    import torch

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    work = Path(args.work)
    if args.pool:
        pool = Path(args.pool)
        urls = sorted(str(p) for p in pool.glob("*.tar"))
    else:
        pool = work / "pool"
        width, height = (int(v) for v in args.size.split("x"))
        stamp = pool / f".made-{args.samples}-{args.shards}-{args.size}"
        if not stamp.exists():
            shutil.rmtree(pool, ignore_errors=True)
            write_pool(pool, args.samples, args.shards, width, height)
            stamp.touch()
        urls = sorted(str(p) for p in pool.glob("*.tar"))
    skip = set(filter(None, args.skip.split(",")))
    print(f"model {args.model} ({args.pretrained or 'random weights'}), {len(urls)} shards, batch {args.batch_size}, "
          f"device {device}, hardware: {hardware(device)}, torch {torch.__version__}", flush=True)
    print(f"load average before: {os.getloadavg()[0]:.2f} (other work on the machine skews every number)", flush=True)

    results: dict[str, float] = {}
    if "a" not in skip:
        results["a"] = bare_forward(args, urls, device, os.cpu_count())
        print(f"(a) bare forward on pre-decoded tensors: {results['a']:8.1f} img/s", flush=True)
    if "b" not in skip:
        import ray

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    runs: dict[str, list[float]] = {"b": [], "c": []}
    for attempt in range(args.repeat):  # b and c alternate, so a burst of other work hits both alike
        if "b" not in skip:
            rate, count, stage = stage_end_to_end(args, pool, work, device)
            runs["b"].append(rate)
            print(f"(b) embed stage end to end ({count} images, {stage['seconds']:.1f} s): {rate:8.1f} img/s"
                  f"   [load {os.getloadavg()[0]:.2f}]", flush=True)
        if "c" not in skip:
            rate, count = naive_loop(args, urls, device)
            runs["c"].append(rate)
            print(f"(c) open_clip + webdataset + DataLoader({args.workers} workers) ({count} images): {rate:8.1f} img/s"
                  f"   [load {os.getloadavg()[0]:.2f}]", flush=True)
    if "b" not in skip:
        ray.shutdown()
    for part, rates in runs.items():
        if rates:
            results[part] = max(rates)
            if len(rates) > 1:
                print(f"({part}) best of {len(rates)}: {max(rates):.1f} img/s (median {statistics.median(rates):.1f})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if "a" in results and "b" in results:
        print(f"b/a = {results['b'] / results['a']:.2f}")
    if "c" in results and "b" in results:
        print(f"b/c = {results['b'] / results['c']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
