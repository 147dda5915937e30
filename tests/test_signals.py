import multiprocessing
import os
import time

import numpy as np
import pytest
import torch

from m4i_assets.data.corpus import CorpusSpec, generate
from m4i_assets.data.images import open_rgb
from m4i_assets.data.manifest import read_manifest
from m4i_assets.models import clip
from m4i_assets.models.checkpoints import model_version_for, safetensors_tensor_count, sha256_file
from m4i_assets.models.clip import split_normalisation
from m4i_assets.signals import batches
from m4i_assets.signals.augmentations import augmented_image_embeddings, transform_registry
from m4i_assets.signals.batches import intra_op_threads, map_batches
from m4i_assets.signals.embeddings import embed_records, encode_batches, tensor_batches


@pytest.fixture(scope="module")
def tiny():
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp())
    recs = read_manifest(generate(CorpusSpec(n_records=12, image_size=32), tmp), "t").records
    return clip.build_clip("m4i-tiny-vit", seed=0), recs["image_uri"].to_list(), recs["caption"].to_list()


def test_embeddings_are_unit_norm_and_batch_independent(tiny):
    bundle, uris, captions = tiny
    img, txt = embed_records(bundle, uris, captions, batch_size=5)
    img2, txt2 = embed_records(bundle, uris, captions, batch_size=12)
    assert img.shape == txt.shape == (12, clip.embed_dim("m4i-tiny-vit"))
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(img, img2, atol=1e-5)
    np.testing.assert_allclose(txt, txt2, atol=1e-5)


def test_batches_run_in_worker_processes_in_order_and_their_errors_surface(monkeypatch):
    """One worker per torch thread, batches back in order; one thread, or a process that may not fork (a Celery
    pool's), runs them here; a worker's exception reaches the caller, its workers stopped (not left to the garbage
    collector); the global generator is left alone."""

    def prepare(start, stop):
        if start == 40:
            raise ValueError("record 40 cannot be decoded")
        return torch.arange(start, stop), os.getpid()

    def run(n, threads):
        with intra_op_threads(threads):
            return list(map_batches(n, 10, prepare, lambda item: item, "cpu"))

    state = torch.get_rng_state()
    out = run(35, 3)
    assert torch.equal(torch.cat([ids for ids, _ in out]), torch.arange(35))
    assert os.getpid() not in {pid for _, pid in out} and len({pid for _, pid in out}) > 1
    assert torch.equal(torch.get_rng_state(), state)
    assert {pid for _, pid in run(35, 1)} == {os.getpid()}
    monkeypatch.setattr(batches, "may_fork", lambda: False)
    assert {pid for _, pid in run(35, 3)} == {os.getpid()}
    monkeypatch.undo()
    children = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="record 40 cannot be decoded"):
        run(50, 2)
    assert set(multiprocessing.active_children()) <= children  # the failed run's workers are gone already
    assert list(map_batches(0, 10, prepare, lambda item: item, "cpu")) == []


def test_a_worker_held_up_on_one_batch_leaves_the_rest_to_the_others():
    """Batches go to the worker that is free, not in turn: while one worker is held up on batch 0, the other does
    every other batch, and the results still come back in order."""

    def prepare(start, stop):
        time.sleep(1.0 if start == 0 else 0.01)
        return start, os.getpid()

    with intra_op_threads(2):
        out = list(map_batches(60, 10, prepare, lambda item: item, "cpu"))
    assert [start for start, _ in out] == list(range(0, 60, 10))
    slow = out[0][1]
    assert [pid for _, pid in out].count(slow) == 1 and len({pid for _, pid in out}) == 2


def test_streamed_embeddings_equal_the_in_memory_path_bit_for_bit(tiny, monkeypatch):
    """Worker processes (one per torch thread) or none (one thread; a process that may not fork) change nothing:
    the same bits as encoding images and tokens prepared in memory on one thread, batch for batch (so the same
    attack figures)."""
    bundle, uris, captions = tiny
    images, tokens = clip.load_images(bundle, uris), bundle.tokenizer(captions)
    for batch_size in (5, 12):
        with intra_op_threads(1):
            reference = encode_batches(bundle, tensor_batches(images, tokens, batch_size), device="cpu")
        runs = []
        for threads in (1, 3):
            with intra_op_threads(threads):
                runs.append(embed_records(bundle, uris, captions, batch_size, device="cpu"))
        with monkeypatch.context() as patch:
            patch.setattr(batches, "may_fork", lambda: False)
            runs.append(embed_records(bundle, uris, captions, batch_size, device="cpu"))
        for img, txt in runs:
            assert np.array_equal(img, reference[0]) and np.array_equal(txt, reference[1])
    with pytest.raises(ValueError, match="12 images but 11 captions"):
        embed_records(bundle, uris, captions[:-1])
    empty = embed_records(bundle, [], [])
    assert empty[0].shape == empty[1].shape == (0, bundle.embed_dim)


def test_augmented_embeddings_equal_the_transforms_of_images_in_memory(tiny):
    bundle, uris, _ = tiny
    to_tensor, normalise = split_normalisation(bundle.preprocess)
    x = torch.stack([to_tensor(open_rgb(u)) for u in uris])
    transforms = transform_registry(0)
    with intra_op_threads(3):
        out = augmented_image_embeddings(bundle, uris, transforms, batch_size=5, device="cpu")
    with torch.no_grad(), intra_op_threads(1):
        for name, transform in transforms.items():
            reference = torch.cat([bundle.model.encode_image(normalise(transform(x[s : s + 5]).clamp(0, 1)),
                                                             normalize=True) for s in range(0, len(x), 5)])  # fmt: skip
            assert np.array_equal(out[name], reference.numpy()), name


def test_at_least_eight_transform_families_change_the_image_deterministically(tiny):
    bundle, uris, _ = tiny
    to_tensor, _ = split_normalisation(bundle.preprocess)
    from PIL import Image

    x = torch.stack([to_tensor(Image.open(u).convert("RGB")) for u in uris[:4]])
    registry = transform_registry(seed=0)
    assert len(registry) >= 8
    for name, transform in registry.items():
        y = transform(x)
        assert y.shape == x.shape and y.dtype == torch.float32, name
        assert not torch.allclose(y, x), name
        assert torch.equal(transform_registry(seed=0)[name](x), y), name  # same parameters every call


def test_augmented_embeddings_cover_every_transform(tiny):
    bundle, uris, captions = tiny
    out = augmented_image_embeddings(bundle, uris, transform_registry(0), batch_size=5)
    clean, _ = embed_records(bundle, uris, captions)
    assert set(out) == set(transform_registry(0))
    for emb in out.values():
        assert emb.shape == clean.shape and np.isfinite(emb).all()
    assert not np.allclose(out["horizontal_flip"], clean, atol=1e-4)


def test_checkpoint_round_trip_and_clear_errors(tiny, tmp_path):
    bundle, _, _ = tiny
    path, sha = clip.save_clip(bundle, tmp_path / "m", {"role": "test"})
    assert sha == sha256_file(path) and model_version_for("clip", sha) == f"clip-{sha[:12]}"
    assert safetensors_tensor_count(path) == len(bundle.model.state_dict())
    loaded = clip.load_clip(path, "m4i-tiny-vit", device="cpu")
    for (k, v), (_, w) in zip(bundle.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(v.cpu(), w), k
    with pytest.raises(FileNotFoundError, match="not found"):
        clip.load_clip(tmp_path / "missing.safetensors", "m4i-tiny-vit")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors"):
        clip.load_clip(tmp_path / "bad.safetensors", "m4i-tiny-vit")
    with pytest.raises(ValueError, match="bad.safetensors"):
        safetensors_tensor_count(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="does not match architecture"):
        clip.load_clip(path, "m4i-tiny-rn")
