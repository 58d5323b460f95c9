"""Images per second that the real data loader delivers from a JPEG folder, per worker count and pipeline.

    python benchmarks/bench_data.py --json bench_data.json       # ../shared/data/imagenette.tar, unpacked to a temp dir
    python benchmarks/bench_data.py --data /imagenet --workers 8,16 --seconds 30
    python benchmarks/bench_data.py --data cifar10_root --img-size 32 --workers 0,1,2 --json bench_data_c10.json

Pipelines (each timed for --seconds per worker count, after its first batch, which is reported apart: worker start-up):
    mae          the scripts' loader (mae.build_dataset + mae.Run.loader: ImageFolder, PIL decode, Run.epoch_items,
                 pinned memory on CUDA) with mae.train_transform (RandomResizedCrop 0.2-1 bicubic + flip); batches are
                 copied to the device as the training loop does. micl.py and mimco.py use the same transform.
    moco         the same loader with moco.TwoViews (BYOL's two asymmetric views: crop, colour jitter, grey, blur,
                 solarize, flip); img/s counts images, each delivered as two views. Skipped when moco.py is missing.
    mae-in-memory, moco-in-memory
                 --in-memory as the scripts run it: the split decoded once (its time reported as decode_s), held as
                 uint8 on --device, each batch of indices augmented there by mae.train_transform_batch /
                 moco.two_views_batch (one draw per image). No workers. "ratios" in the JSON: img/s over the PIL
                 loader's at each worker count. For CIFAR-size images: --data CIFAR_ROOT --img-size 32.
    moco-step, moco-step-in-memory
                 end to end: moco.py's main() for 40 steps of ViT-T/4 with each loader, img/s of its log lines
                 (default only on CUDA: on a CPU the model, not the loader, is the bottleneck).
    mae-decode-on-device
                 workers only read the JPEG files' bytes; the main process decodes the batch with TorchCodec's
                 decode_jpeg(list of byte tensors, device=--device) (nvJPEG on a GPU) when torchcodec is installed,
                 else with PIL on the CPU (the "decode" column says which), and does the RandomResizedCrop (same
                 scale, ratio and bicubic antialiased resize) + flip + normalization on --device. torchvision.io's
                 decoders, which this used, are deprecated since torchvision 0.29 in favour of TorchCodec's.
                 Default only when the device is CUDA (--pipelines mae-decode-on-device runs it on a CPU too).
The scripts' loader restarts its workers every epoch (persistent_workers off), and a run of --seconds spans epochs on
a small folder: that cost is part of what the scripts pay, so it is part of the figure.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # the project root: mae, moco, ...
import mae  # noqa: E402

IMAGENETTE_TAR = os.path.join(ROOT, "..", "shared", "data", "imagenette.tar")
PIPELINES = ["mae", "moco", "mae-in-memory", "moco-in-memory", "mae-decode-on-device", "moco-step",
             "moco-step-in-memory"]


SCRATCH = []  # temporary folders (output dirs, decoded caches of --in-memory), removed when main() ends


def scratch(prefix):
    SCRATCH.append(tempfile.mkdtemp(prefix=prefix))
    return SCRATCH[-1]


def provenance(device, argv):
    import torchvision
    try:
        commit = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(["python", "benchmarks/bench_data.py", *argv]),
            "device": f"{name}; {os.cpu_count()} logical CPU cores", "host": socket.gethostname(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": _pillow_version(), "project_commit": commit}


def _pillow_version():
    try:
        import PIL
        return PIL.__version__
    except ImportError:
        return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)

# ------------------------------------------------------------------------------------------------ the pipelines


def script_loader(mod, transform_fn, data, split, batch_size, workers, img_size, device):
    """The method script's own dataset and loader (its appendix's Run.loader, one process), built from its own
    command-line defaults; the output folder Run makes is a temporary one. Returns (epoch -> that epoch's DataLoader,
    as Run.batches makes it, the number of images)."""
    args = mod.get_args(["--data", data, "--img-size", str(img_size), "--batch-size", str(batch_size),
                         "--num-workers", str(workers), "--output-dir", scratch("bench_data_")])
    dataset = mod.build_dataset(args, transform_fn(args), split)
    run = mod.Run(args)
    loader = run.loader(dataset)  # the PIL path (without --in-memory the batched transform is unused)
    run.stop("loader built")  # the folder's lock closed, this process's signal handlers restored

    def epoch_loader(epoch):
        epoch_batches = loader(run.epoch_items(epoch))
        epoch_batches.pin_memory = device.type == "cuda"  # Run pins whenever CUDA exists; --device cpu: unpinned
        return epoch_batches
    return epoch_loader, run.images


def in_memory_batches(mod, transform_fn, batch_fn, data, split, batch_size, img_size, device):
    """--in-memory as the scripts run it: Run.loader decodes the split once (into a temporary --data-root, so the
    decode is timed too), then each batch of indices is augmented on `device` by the script's batched transform,
    from torch's RNG, as Run.batches does. Returns (epoch -> that epoch's batches, consume, seconds the decode took,
    the number of images)."""
    args = mod.get_args(["--data", data, "--img-size", str(img_size), "--batch-size", str(batch_size), "--in-memory",
                         "--data-root", scratch("bench_cache_"), "--output-dir", scratch("bench_data_")])
    run = mod.Run(args)
    run.device = device
    t = time.perf_counter()
    batches = run.loader(mod.build_dataset(args, transform_fn(args), split), batch_fn)
    run.stop("loader built")  # the folder's lock closed, this process's signal handlers restored
    return (lambda epoch: batches(run.epoch_items(epoch)), lambda batch: mod.augment_in_memory(run, batch),
            time.perf_counter() - t, run.images)


def moco_step(data, split, batch_size, img_size, in_memory, workers, steps=40):
    """End to end: moco.py's own main() for `steps` steps of ViT-T/4 (tiny heads: the loader is the question), the
    img/s of its log lines after the first (start-up, compilation of kernels)."""
    import moco
    out = scratch("bench_step_")
    argv = ["--data", data, "--img-size", str(img_size), "--batch-size", str(batch_size), "--model", "vit_tiny",
            "--patch-size", "4", "--moco-mlp-dim", "1024", "--num-workers", str(workers), "--output-dir", out,
            "--max-steps", str(steps), "--log-every", "10", "--save-every-minutes", "0", "--epochs", "100",
            "--warmup-epochs", "1", "--data-root", scratch("bench_cache_")] + (["--in-memory"] if in_memory else [])
    t = time.perf_counter()
    moco.main(argv)
    with open(os.path.join(out, "log.jsonl")) as f:
        rates = [json.loads(line)["img_per_s"] for line in f][1:]
    shutil.rmtree(out, ignore_errors=True)
    return {"img_per_s": sum(rates) / max(1, len(rates)), "images": batch_size * 10 * len(rates),
            "batches": 10 * len(rates), "seconds": time.perf_counter() - t, "first_batch_s": float("nan"),
            "epochs_started": 0}


class FileBytes(torch.utils.data.Dataset):
    """The raw bytes of each image file; decoding happens later. Python bytearrays, not tensors: a worker then sends one
    pickled batch, not one shared-memory file descriptor per image (which runs into the open-file limit)."""
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            return bytearray(f.read())  # writable: torch.frombuffer shares it without a warning


def bytes_loader(data, split, batch_size, workers, device):
    import torchvision.datasets as datasets
    folder = datasets.ImageFolder(os.path.join(data, split))  # only for its sorted file list
    sampler = torch.utils.data.DistributedSampler(folder, 1, 0, shuffle=True, seed=0, drop_last=True)
    loader = torch.utils.data.DataLoader(FileBytes([p for p, _ in folder.samples]), batch_size=batch_size,
                                         sampler=sampler, num_workers=workers, collate_fn=list, drop_last=True)

    def epoch_loader(epoch):
        sampler.set_epoch(epoch)
        return loader
    return epoch_loader, len(folder), len(loader)


class DecodeOnDevice:
    """A batch of JPEG bytes -> (B, 3, S, S) float on `device`, normalized: TorchCodec's decode_jpeg on the device
    (PIL on the CPU without torchcodec), then per image MAE's RandomResizedCrop (scale 0.2-1, ratio 3/4-4/3, bicubic,
    antialiased) and a horizontal flip with p 0.5."""
    def __init__(self, img_size, device):
        import torchvision.transforms as T
        try:
            from torchcodec.decoders import decode_jpeg
        except ImportError:  # an optional dependency: PIL, as the scripts' loader
            decode_jpeg = None
        self.decode_jpeg, self.size, self.device, self.cpu_fallbacks = decode_jpeg, img_size, device, 0
        on_device = f"torchcodec decode_jpeg on {device.type}" + (" (nvJPEG)" if device.type == "cuda" else "")
        self.decoder = on_device if decode_jpeg else "PIL on the CPU, in the main process (torchcodec is not installed)"
        self.rrc = T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC)
        self.mean = torch.tensor(mae.IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(mae.IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, batch):
        import torchvision.transforms.v2.functional as TF
        if self.decode_jpeg is None:
            imgs = [self.pil(b) for b in batch]
        else:
            data = [torch.frombuffer(b, dtype=torch.uint8) for b in batch]  # 1-D uint8 views of the file bytes
            try:
                imgs = self.decode_jpeg(data, mode="RGB", device=self.device)  # list of (3, H, W) uint8
            except RuntimeError:  # a JPEG the device decoder rejects (e.g. CMYK on nvJPEG): those images by PIL
                imgs = [self.decode_one(d, b) for d, b in zip(data, batch)]
        out = []
        for img in imgs:
            i, j, h, w = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
            crop = TF.resized_crop(img.float(), i, j, h, w, [self.size, self.size],
                                   interpolation=self.rrc.interpolation, antialias=True)
            out.append(crop.flip(-1) if torch.rand(()) < 0.5 else crop)
        x = torch.stack(out).clamp_(0, 255)  # bicubic overshoots, as PIL's does before it rounds to uint8
        return (x - self.mean) / self.std

    def decode_one(self, data, raw):
        try:
            return self.decode_jpeg(data, mode="RGB", device=self.device)
        except RuntimeError:
            self.cpu_fallbacks += 1
            return self.pil(raw)

    def pil(self, raw):
        """JPEG bytes -> (3, H, W) uint8 on the device, decoded by PIL as the scripts' loader does (RGB)."""
        import io

        import numpy as np
        from PIL import Image
        with Image.open(io.BytesIO(raw)) as img:
            pixels = np.array(img.convert("RGB"))  # a writable copy: torch.from_numpy then warns about nothing
        return torch.from_numpy(pixels).permute(2, 0, 1).to(self.device)

# ------------------------------------------------------------------------------------------------------ timing


def measure(epoch_loader, consume, device, seconds, batch_size):
    """Iterate epoch_loader(0), epoch_loader(1), ... until `seconds` have passed after the first batch; returns the
    figures."""
    t_start = time.perf_counter()
    first, t0, n, batches, epoch = None, None, 0, 0, 0
    while True:
        for batch in epoch_loader(epoch):
            consume(batch)
            if first is None:
                sync(device)
                first = time.perf_counter() - t_start
                t0 = time.perf_counter()
                continue
            n += batch_size
            batches += 1
            if time.perf_counter() - t0 >= seconds:
                break
        else:
            epoch += 1
            continue
        break
    sync(device)
    dt = time.perf_counter() - t0
    return {"img_per_s": n / dt, "images": n, "batches": batches, "seconds": dt, "first_batch_s": first,
            "epochs_started": epoch + 1}


def unpack_imagenette(dst):
    if not os.path.isfile(IMAGENETTE_TAR):
        raise SystemExit(f"error: no --data given and {os.path.normpath(IMAGENETTE_TAR)} is missing; pass --data ROOT "
                         f"(ImageNet layout: ROOT/train/<class>/<image>)")
    t = time.perf_counter()
    with tarfile.open(IMAGENETTE_TAR) as tar:
        tar.extractall(dst, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(dst)
    print(f"# unpacked {os.path.normpath(IMAGENETTE_TAR)} into {dst} in {time.perf_counter() - t:.1f} s", flush=True)
    return os.path.join(dst, "imagenette")

# -------------------------------------------------------------------------------------------------------- main


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Images per second of the scripts' data loaders",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None, help="ImageNet-layout root (ROOT/<split>/<class>/<image>); default: "
                   "../shared/data/imagenette.tar unpacked into a temporary folder (deleted afterwards)")
    p.add_argument("--split", default="train")
    p.add_argument("--workers", default="0,2,4,8,16", help="comma-separated worker counts")
    p.add_argument("--pipelines", default=None, help=f"comma-separated from {','.join(PIPELINES)} (default: mae, moco "
                   "if moco.py exists, mae-decode-on-device on CUDA)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (one process)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=10.0, help="time per configuration, after its first batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args(argv)
    device = torch.device(args.device)
    report = {"provenance": provenance(device, argv), "settings": dict(vars(args)), "results": [], "skipped": []}
    print("\n".join(f"# {k}: {v}" for k, v in report["provenance"].items()), flush=True)
    tmp = None
    if args.data is None:
        tmp = tempfile.mkdtemp(prefix="bench_data_")
        args.data = unpack_imagenette(tmp)
    elif not os.path.isdir(os.path.join(args.data, args.split)):
        raise SystemExit(f"error: --data {args.data}: no '{args.split}' folder inside; expected the ImageNet layout "
                         f"ROOT/{args.split}/<class>/<image>")
    try:
        run(args, device, report)
    finally:
        for folder in filter(None, [tmp, *SCRATCH]):
            shutil.rmtree(folder, ignore_errors=True)
        SCRATCH.clear()
    report["ratios"] = ratios(report)
    write_json(report, args.json)
    print("\n" + markdown_table(report), flush=True)
    print("\n".join(f"# {k}: {v}x" for k, v in report["ratios"].items()), flush=True)
    if args.json:
        print(f"\nwrote {args.json}")
    return report


def write_json(report, path):
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)


def run(args, device, report):
    try:
        import moco
    except Exception as e:  # noqa: BLE001 (not written yet, or half-written)
        moco = None
        moco_error = f"moco.py not importable ({type(e).__name__}: {e})"
    if args.pipelines:
        pipelines = [p.strip() for p in args.pipelines.split(",") if p.strip()]
        bad = [p for p in pipelines if p not in PIPELINES]
        if bad:
            raise SystemExit(f"error: --pipelines {','.join(bad)}: unknown; choose from {','.join(PIPELINES)}")
    else:
        pipelines = ["mae", "moco", "mae-in-memory", "moco-in-memory"] + (
            ["mae-decode-on-device", "moco-step", "moco-step-in-memory"] if device.type == "cuda" else [])
    workers = [int(w) for w in args.workers.split(",")]
    for pipe in pipelines:
        if pipe == "moco" and moco is None:
            report["skipped"].append({"pipeline": pipe, "why": moco_error})
            print(f"skip {pipe}: {moco_error}", flush=True)
            continue
        for w in workers if not pipe.endswith("in-memory") else [0]:  # the in-memory path has no workers
            loader, extra = None, {}
            try:
                if pipe in ("moco-step", "moco-step-in-memory"):
                    r = moco_step(args.data, args.split, args.batch_size, args.img_size, pipe.endswith("memory"), w)
                    report["results"].append({"pipeline": pipe, "decode": "moco.py main(), ViT-T/4", "workers": w,
                                              "batch": args.batch_size, "img_size": args.img_size, **r})
                    print(f"{pipe} workers {w}: {r['img_per_s']:.1f} img/s (training steps)", flush=True)
                    continue
                if pipe.endswith("in-memory"):
                    mod, tf, batch_fn = ((mae, mae.train_transform, mae.train_transform_batch) if pipe.startswith("mae")
                                         else (moco, moco.TwoViews, moco.two_views_batch))
                    loader, consume, extra["decode_s"], n_images = in_memory_batches(
                        mod, tf, batch_fn, args.data, args.split, args.batch_size, args.img_size, device)
                    decode = (f"decoded once, augmented in batches on {device.type}"
                              + (", two views" if mod is moco else ""))
                    r = measure(loader, consume, device, args.seconds, args.batch_size)
                    report["results"].append({"pipeline": pipe, "decode": decode, "workers": 0,
                                              "batch": args.batch_size, "img_size": args.img_size,
                                              "images_in_split": n_images, **r, **extra})
                    print(f"{pipe}: {r['img_per_s']:.1f} img/s (decode once: {extra['decode_s']:.1f} s)", flush=True)
                    continue
                if pipe == "mae":
                    loader, n_images = script_loader(mae, mae.train_transform, args.data, args.split,
                                                     args.batch_size, w, args.img_size, device)
                    consume = lambda b: b[0].to(device, non_blocking=True)  # noqa: E731 (the training loop's copy)
                    decode = "PIL in the workers (CPU)"
                elif pipe == "moco":
                    loader, n_images = script_loader(moco, moco.TwoViews, args.data, args.split, args.batch_size,
                                                     w, args.img_size, device)
                    consume = lambda b: [v.to(device, non_blocking=True) for v in b[0]]  # noqa: E731
                    decode = "PIL in the workers (CPU), two views"
                else:
                    loader, n_images, n_batches = bytes_loader(args.data, args.split, args.batch_size, w, device)
                    consume = DecodeOnDevice(args.img_size, device)
                    decode = consume.decoder
                    if n_batches == 0:
                        raise ValueError(f"{n_images} images in {args.split}, fewer than one --batch-size "
                                         f"{args.batch_size}")
                r = measure(loader, consume, device, args.seconds, args.batch_size)
            except Exception as e:  # noqa: BLE001 (e.g. the scripts' StopRun for a too small folder: report, go on)
                # a StopRun (each script has its own): its one line
                why = mae.one_line(e) if type(e).__name__ == "StopRun" else f"{type(e).__name__}: {e}"
                report["skipped"].append({"pipeline": pipe, "workers": w, "why": why})
                print(f"skip {pipe} workers {w}: {why}", flush=True)
                continue
            finally:
                del loader
            row = {"pipeline": pipe, "decode": decode, "workers": w, "batch": args.batch_size,
                   "img_size": args.img_size, "images_in_split": n_images, **r}
            if isinstance(consume, DecodeOnDevice):
                row["cpu_fallback_images"] = consume.cpu_fallbacks
            report["results"].append(row)
            write_json(report, args.json)  # after every configuration: a run stopped by a time limit keeps its figures
            print(f"{pipe} workers {w}: {r['img_per_s']:.1f} img/s ({r['images']} images in {r['seconds']:.1f} s, "
                  f"first batch after {r['first_batch_s']:.2f} s)", flush=True)


def ratios(report):
    """In-memory img/s over the PIL loader's, per view kind and PIL worker count (the issue's target: >= 3x)."""
    out = {}
    for kind in ("mae", "moco", "moco-step"):
        mem = [r["img_per_s"] for r in report["results"] if r["pipeline"] == f"{kind}-in-memory"]
        for r in report["results"]:
            if mem and r["pipeline"] == kind:
                out[f"{kind}-in-memory / {kind} with {r['workers']} workers"] = round(mem[0] / r["img_per_s"], 2)
    return out


def markdown_table(report):
    lines = ["| pipeline | decode | workers | batch | px | img/s | first batch (s) | timed images |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['pipeline']} | {r['decode']} | {r['workers']} | {r['batch']} | {r['img_size']} | "
                     f"{r['img_per_s']:.1f} | {r['first_batch_s']:.2f} | {r['images']} |")
    for s in report["skipped"]:
        lines.append(f"| {s['pipeline']} | | {s.get('workers', '')} | | | skipped: {s['why']} | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
