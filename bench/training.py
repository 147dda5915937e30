"""Training speed of the platform's models on this machine's device (CUDA with AMP when present, else
the CPU): the demo's target CLIP recipe, both captioner architectures and the M^4I feature extractor,
each on the same generated members. Prints seconds per epoch and the final loss of each.

    .venv/bin/python bench/training.py [--records 500] [--epochs 5]

Needs only the science packages (torch, open_clip, transformers, scikit-learn), not Dagster or DuckDB,
so it also runs on a GPU machine with a bare PyTorch image plus open_clip.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from m4i_assets.attacks.m4i import MfeSpec, train_mfe
from m4i_assets.data.corpus import CorpusSpec, generate_pairs
from m4i_assets.models import captioner, clip
from m4i_assets.models.device import device_for


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    device = device_for()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device={device} ({name}) torch={torch.__version__} threads={torch.get_num_threads()} "
          f"records={args.records} epochs={args.epochs}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        uris, captions = generate_pairs(CorpusSpec(n_records=args.records), tmp)
        # The demo's recipes (the specs' defaults are the default profile's settings).
        clip_spec = clip.ClipTrainSpec(epochs=args.epochs)
        bundle = clip.build_clip(clip_spec.arch, seed=clip_spec.seed)
        seconds, history = timed(lambda: clip.train_clip(bundle, uris, captions, clip_spec))
        print(f"clip {clip_spec.arch:<14} {seconds / args.epochs:7.2f} s/epoch  final loss {history[-1]:.3f}")
        trained = {}
        for arch in captioner.ARCHS:
            spec = captioner.CaptionerSpec(arch=arch, max_len=50, epochs=args.epochs)
            bundle = captioner.build_captioner(captioner.Vocabulary.build(captions), spec)
            seconds, history = timed(lambda b=bundle: captioner.train_captioner(b, uris, captions))
            trained[arch] = bundle
            print(f"captioner {arch:<9} {seconds / args.epochs:7.2f} s/epoch  final loss {history[-1]:.3f}")
        mfe_spec = MfeSpec(epochs=args.epochs)
        seconds, _ = timed(lambda: train_mfe(uris, captions, mfe_spec))
        print(f"mfe                  {seconds / args.epochs:7.2f} s/epoch")
        for arch, bundle in trained.items():
            seconds, _ = timed(lambda b=bundle: captioner.generate_captions(b, uris, 256))
            print(f"greedy captions {arch:<9} {len(uris) / seconds:7.1f} records/s")


if __name__ == "__main__":
    main()
