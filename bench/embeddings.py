"""Throughput of the embedding and AEA assets' compute paths against what the machine allows, in one run.

- asset path: what `embeddings` runs: PNG decode, the model's eval preprocessing (in DataLoader workers when
  the Compute resource gives some), tokenisation and both towers;
- raw forward: both towers on tensors already in memory, same model, batch size, device and threads;
- decode: decode + preprocess + tokenise alone, in one process on one thread;
- core-time bound: cores / (decode core-seconds + forward core-seconds) per record, the rate at which every
  core is busy with useful work (the forward's core-seconds are its wall time times its threads); the asset
  path's ratio to it says how well decoding overlaps the model;
- AEA: what `augmentation_deltas` runs for the K transforms (decode once, each transform, K image forwards)
  against K clean image forwards of the same images in memory.

    .venv/bin/python bench/embeddings.py [--records 2000] [--batch-size 256] [--workers N]
"""

import argparse
import os
import tempfile
import time

import torch

from m4i_assets.data.corpus import CorpusSpec, generate_pairs
from m4i_assets.models import clip
from m4i_assets.models.device import device_for
from m4i_assets.signals.augmentations import augmented_image_embeddings, transform_registry
from m4i_assets.signals.embeddings import embed_records, encode_batches


def best_of(fn, repeats: int, device: torch.device) -> float:
    """The fastest of `repeats` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="default: what the asset uses")
    parser.add_argument("--arch", default="m4i-tiny-vit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.workers is None:
        from m4i_assets.defs.resources import Compute  # Dagster: only where the default is asked for

        args.workers = Compute().loader_workers
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp:
        uris, captions = generate_pairs(CorpusSpec(n_records=args.records), tmp)
        bundle = clip.build_clip(args.arch)
        device = device_for()
        model = bundle.model.to(device).eval()
        images = clip.load_images(bundle, uris)
        tokens = bundle.tokenizer(captions)
        transforms = transform_registry(0)
        n, k = len(uris), len(transforms)

        def decode() -> None:
            torch.set_num_threads(1)
            try:
                clip.load_images(bundle, uris)
                bundle.tokenizer(captions)
            finally:
                torch.set_num_threads(threads)

        @torch.no_grad()
        def clean_image_forwards() -> None:
            for start in range(0, n, args.batch_size):
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    model.encode_image(images[start : start + args.batch_size].to(device), normalize=True)

        seconds = {
            "asset path": best_of(lambda: embed_records(bundle, uris, captions, args.batch_size, args.workers),
                                  args.repeats, device),
            "raw forward": best_of(lambda: encode_batches(bundle, images, tokens, args.batch_size, 0),
                                   args.repeats, device),
            "decode": best_of(decode, args.repeats, device),
            "aea": best_of(lambda: augmented_image_embeddings(bundle, uris, transforms, args.batch_size, args.workers),
                           1, device),
            "clean image forward": best_of(clean_image_forwards, args.repeats, device),
        }  # fmt: skip

    rate = {name: n / s for name, s in seconds.items()}
    bound = cores / (1 / rate["decode"] + threads / rate["raw forward"])
    print(f"device={device.type} arch={args.arch} records={n} batch_size={args.batch_size} workers={args.workers} "
          f"torch_threads={threads} cores={cores}")  # fmt: skip
    for name in ("asset path", "raw forward", "decode"):
        print(f"{name:>12}: {rate[name]:9.1f} records/s")
    print(f"core-time bound: {bound:9.1f} records/s")
    print(f"ratio asset/raw: {rate['asset path'] / rate['raw forward']:.3f}")
    print(f"ratio asset/core-time bound: {rate['asset path'] / bound:.3f}")
    print(f"AEA with K={k} transforms: {seconds['aea']:.2f} s, {k} clean image forwards: "
          f"{k * seconds['clean image forward']:.2f} s")  # fmt: skip
    print(f"AEA ratio to K clean forwards: {seconds['aea'] / (k * seconds['clean image forward']):.3f}")


if __name__ == "__main__":
    main()
