"""Same spec, same records -> same checkpoint bytes, whether it trains in process or in a spawn worker, and
whatever thread count the caller's process had."""

import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from m4i_assets.data.corpus import CorpusSpec, generate
from m4i_assets.models import clip


def test_clip_checkpoint_bytes_do_not_depend_on_where_it_trained(tmp_path):
    manifest = generate(CorpusSpec(n_records=24, image_size=32, seed=3), tmp_path / "corpus")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    uris, captions = [str(manifest.parent / r["image"]) for r in rows], [r["caption"] for r in rows]
    spec = clip.ClipTrainSpec(epochs=2, batch_size=8, seed=5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the caller's own setting (Compute gives each step a share of the cores)
    try:
        sha_here = clip.train_and_save(spec, uris, captions, tmp_path / "here", {"role": "t"}, "cpu", 1)[0]
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        sha_worker = pool.submit(clip.train_and_save, spec, uris, captions, tmp_path / "worker", {"role": "t"},
                                 "cpu", 1).result()[0]  # fmt: skip
    assert sha_here == sha_worker
