"""Throughput of the embedding and AEA assets' compute paths against what the machine allows, in one run.

- asset path: what `embeddings` runs (`embed_records` through `signals.batches.map_batches`): PNG decode, the
  model's eval preprocessing, tokenisation and both towers, in one single-threaded worker process per torch thread
  on the CPU (decode workers ahead of the device on CUDA);
- raw forward: both towers on tensors already in memory, in this process on all its torch threads, same model,
  batch size and device;
- decode: decode + preprocess + tokenise alone, on one thread;
- core-time bound: cores / (decode core-seconds + forward core-seconds) per record, the rate at which every
  core is busy with useful work (the forward's core-seconds are its wall time times its threads); the asset
  path's ratio to it says how well decoding overlaps the model;
- AEA: what `augmentation_deltas` runs for the K transforms (decode once, each transform, K image forwards)
  against K clean image forwards of the same images in memory, batch by batch through the same `map_batches`.

The measurements take turns, round after round, and each keeps its fastest round, so a change of the
machine's load during the run weighs on all of them alike; the load average is printed at both ends.

    .venv/bin/python bench/embeddings.py [--records 2000] [--batch-size 256] [--rounds 3]
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
from m4i_assets.signals.batches import intra_op_threads, map_batches
from m4i_assets.signals.embeddings import embed_records, encode_batches, tensor_batches


def fastest_rounds(fns: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """The fastest of `rounds` timed calls of each function, the functions taking turns within a round."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--arch", default="m4i-tiny-vit")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = device_for()
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    print(f"start: {load()}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        uris, captions = generate_pairs(CorpusSpec(n_records=args.records), tmp)
        bundle = clip.build_clip(args.arch)
        model = bundle.model.to(device).eval()
        images = clip.load_images(bundle, uris)
        tokens = bundle.tokenizer(captions)
        transforms = transform_registry(0)
        n, k = len(uris), len(transforms)

        def decode() -> None:
            with intra_op_threads(1):
                clip.load_images(bundle, uris)
                bundle.tokenizer(captions)

        @torch.no_grad()
        def k_clean_forwards(batch: torch.Tensor) -> torch.Tensor:
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                return torch.stack([model.encode_image(batch, normalize=True) for _ in range(k)]).float().cpu()

        def clean_image_forwards() -> None:
            for _ in map_batches(n, args.batch_size, lambda start, stop: images[start:stop], k_clean_forwards, device):
                pass

        seconds = fastest_rounds({
            "asset path": lambda: embed_records(bundle, uris, captions, args.batch_size),
            "raw forward": lambda: encode_batches(bundle, tensor_batches(images, tokens, args.batch_size)),
            "decode": decode,
            "aea": lambda: augmented_image_embeddings(bundle, uris, transforms, args.batch_size),
            "k clean image forwards": clean_image_forwards,
        }, args.rounds, device)  # fmt: skip

    rate = {name: n / s for name, s in seconds.items()}
    bound = cores / (1 / rate["decode"] + threads / rate["raw forward"])
    print(f"device={device.type} arch={args.arch} records={n} batch_size={args.batch_size} "
          f"torch_threads={threads} cores={cores} rounds={args.rounds}")  # fmt: skip
    for name in ("asset path", "raw forward", "decode"):
        print(f"{name:>17}: {rate[name]:9.1f} records/s")
    print(f"  core-time bound: {bound:9.1f} records/s")
    print(f"ratio asset/raw: {rate['asset path'] / rate['raw forward']:.3f}")
    print(f"ratio asset/core-time bound: {rate['asset path'] / bound:.3f}")
    print(f"AEA with K={k} transforms: {seconds['aea']:.2f} s, {k} clean image forwards: "
          f"{seconds['k clean image forwards']:.2f} s")  # fmt: skip
    print(f"AEA ratio to K clean forwards: {seconds['aea'] / seconds['k clean image forwards']:.3f}")
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
