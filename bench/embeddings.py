"""Throughput of the embedding asset's compute path vs the raw model forward (same model, batch size,
device), measured in one run. Prints records/s for each and their ratio.

The asset path decodes PNG files, applies the model's eval preprocessing in DataLoader workers,
tokenises captions and runs both towers; the raw path runs both towers on tensors already in memory.
A ratio near 1 means input handling keeps the model busy.

    .venv/bin/python bench/embeddings.py [--records 2000] [--batch-size 256] [--workers N]

Measured on 2 CPU cores (m4i-tiny-vit, batch 256): ratio 0.757 with no workers, 0.700 with two.
"""

import argparse
import tempfile
import time

import torch

from m4i_assets.data.corpus import CorpusSpec, generate_pairs
from m4i_assets.models import clip
from m4i_assets.models.device import device_for
from m4i_assets.signals.embeddings import embed_records, encode_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="default: what the asset uses")
    parser.add_argument("--arch", default="m4i-tiny-vit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.workers is None:
        from m4i_assets.defs.resources import Compute  # Dagster: only where the default is asked for

        args.workers = Compute().loader_workers

    with tempfile.TemporaryDirectory() as tmp:
        uris, captions = generate_pairs(CorpusSpec(n_records=args.records), tmp)
        bundle = clip.build_clip(args.arch)
        device = device_for()
        images = clip.load_images(bundle, uris)
        tokens = bundle.tokenizer(captions)

        def asset_path():
            embed_records(bundle, uris, captions, args.batch_size, args.workers)

        def raw_forward():
            encode_batches(bundle, images, tokens, args.batch_size, 0)

        for fn in (asset_path, raw_forward):  # warm-up
            fn()
        timings = {"asset path": [], "raw forward": []}
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            for name, fn in (("asset path", asset_path), ("raw forward", raw_forward)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timings[name].append(time.perf_counter() - start)

    rate = {name: len(uris) / min(ts) for name, ts in timings.items()}
    print(
        f"device={device.type} arch={args.arch} records={len(uris)} batch_size={args.batch_size} "
        f"workers={args.workers} torch_threads={torch.get_num_threads()}"
    )
    for name, r in rate.items():
        print(f"{name:>12}: {r:9.1f} records/s (best of {args.repeats})")
    print(f"ratio asset/raw: {rate['asset path'] / rate['raw forward']:.3f}")


if __name__ == "__main__":
    main()
