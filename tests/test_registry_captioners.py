"""A labelled audit of users' own captioners through `m4i audit` and the Dagster daemon: Hugging Face captioners
trained outside the project with their library's own loss on the member rows of a CSV, saved as the library
saves them, registered from their directories (no `arch:`), and scored by every attack the audit allows."""

import json
from pathlib import Path

import duckdb
import polars as pl
import torch
import transformers
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_audits import WORDS, registry, run_cli, write_labelled_manifest
from test_hf_captioners import library_losses, trained_by_transformers

from m4i_assets.models.vocabulary import word_level_tokenizer

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def vision_encoder_decoder(manifest: Path, out: Path, steps: int) -> Path:
    """A tiny ViT + GPT-2 VisionEncoderDecoderModel trained with its own loss (`labels=`) on the member rows,
    saved with save_pretrained of model, tokenizer and image processor (steps=0: untrained)."""
    tokenizer = word_level_tokenizer((*SPECIALS, *WORDS), *SPECIALS[:3], SPECIALS[3])
    torch.manual_seed(0)
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    encoder = transformers.ViTConfig(image_size=32, patch_size=8, **small)
    decoder = transformers.GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=16,
        n_embd=64,
        n_layer=2,
        n_head=2,
        add_cross_attention=True,
        is_decoder=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    model = transformers.VisionEncoderDecoderModel(config=config)
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=1, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_length=12
    )
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    members = pl.read_csv(manifest).filter(pl.col("split") == "member")
    pixels = processor([Image.open(manifest.parent / p).convert("RGB") for p in members["image"]], return_tensors="pt")[
        "pixel_values"
    ]
    labels = caption_labels(tokenizer, members["caption"].to_list())
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(pixel_values=pixels, labels=labels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def caption_labels(tokenizer, captions: list[str]) -> torch.Tensor:
    """The captions' token ids, padding as -100 (ignored by the loss)."""
    batch = tokenizer(captions, padding=True, return_tensors="pt")
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def transformers_loss_auc(model_dir: Path, manifest: Path) -> float:
    """The caption-loss AUC computed with transformers alone: each member's and non-member's own loss."""
    rows = pl.read_csv(manifest).filter(pl.col("split").is_in(["member", "nonmember"]))
    model = transformers.VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    losses = []
    with torch.no_grad():
        for path, caption in rows.select("image", "caption").iter_rows():
            pixels = processor([Image.open(manifest.parent / path).convert("RGB")], return_tensors="pt")
            labels = caption_labels(tokenizer, [caption])
            losses.append(float(model(pixel_values=pixels["pixel_values"], labels=labels).loss))
    return float(roc_auc_score(rows["split"].to_numpy() == "member", [-x for x in losses]))


def test_labelled_audit_of_users_captioners_completes_through_the_daemon(tmp_path, monkeypatch):
    """`m4i audit NAME` of a VisionEncoderDecoder, a BLIP and a GIT trained outside the project (and an untrained
    twin as the null control), from their directories with no `arch:`: the audit completes through the daemon and
    runs every captioner attack; `m4i_loss` (white box) has the AUC transformers gives, above chance for the
    trained models and at chance for the twin; each target has shadows of its own architecture, built from its
    config, so MB and FB report the unrestricted scenario."""
    monkeypatch.setenv("M4I_SETTINGS", json.dumps({"shadow_archs": ["cnn-lstm"]}))
    roles = {"member": 32, "nonmember": 32, "known_nonmember": 32, "population": 64}
    manifest = write_labelled_manifest(tmp_path / "data", roles)
    models = tmp_path / "models"
    targets = {
        "ved": vision_encoder_decoder(manifest, models / "ved", steps=120),
        **{kind: trained_by_transformers(kind, manifest, models / kind, steps=60) for kind in ("blip", "git")},
    }
    twin = vision_encoder_decoder(manifest, models / "ved-base", steps=0)
    paths = "".join(f"\n      - path: {path}" for path in targets.values())
    registry(
        tmp_path,
        manifest,
        f"""audits:
  - name: acme-captioners
    family: captioner
    dataset: acme_pairs
    roles: {{column: split, member: member, nonmember: nonmember, known_nonmember: known_nonmember,
             population: population}}
    targets:{paths}
    null_control: {twin}
""",
    )
    stdout = run_cli(tmp_path, "audit", "acme-captioners")
    assert "skipped" not in stdout.split("Plan (audit_plan):")[1]
    conn = duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True)
    try:
        rows = conn.execute(
            "SELECT train_config, model_version, arch FROM models WHERE audit = 'acme-captioners' "
            "AND role IN ('target', 'null_control')"
        ).fetchall()
        version_of = {Path(json.loads(config)["source"]).name: version for config, version, _ in rows}
        shadow_archs = {
            a
            for (a,) in conn.execute(
                "SELECT arch FROM models WHERE audit = 'acme-captioners' AND role = 'shadow'"
            ).fetchall()
        }
        metrics = {
            (version, attack): (auc, low, high)
            for version, attack, auc, low, high in conn.execute(
                "SELECT model_version, attack, auc, auc_ci_low, auc_ci_high FROM attack_metrics "
                "WHERE audit = 'acme-captioners'"
            ).fetchall()
        }
        scenarios = set(
            conn.execute(
                "SELECT DISTINCT model_version, attack, scenario FROM m4i_scenarios WHERE audit = 'acme-captioners'"
            ).fetchall()
        )
    finally:
        conn.close()
    assert shadow_archs == {"cnn-lstm", "hf-vision-encoder-decoder", "hf-blip", "hf-git"}
    assert {attack for _, attack in metrics} == {"m4i_mb", "m4i_fb", "m4i_loss", "m4i_loss_ref", "blind_baseline"}
    twin_version = version_of["ved-base"]
    assert metrics[twin_version, "m4i_loss"][1] <= 0.5 <= metrics[twin_version, "m4i_loss"][2]
    # the trained models' AUCs saturate at 1: the untrained twin's is where equality with transformers tells
    assert abs(metrics[twin_version, "m4i_loss"][0] - transformers_loss_auc(twin, manifest)) < 0.01
    rows = pl.read_csv(manifest).filter(pl.col("split").is_in(["member", "nonmember"]))
    for name, folder in targets.items():
        version = version_of[name]
        auc, low, _ = metrics[version, "m4i_loss"]
        assert low > 0.6, name
        if name == "ved":
            library = transformers_loss_auc(folder, manifest)
        else:
            losses = library_losses(
                name, folder, [str(manifest.parent / p) for p in rows["image"]], rows["caption"].to_list()
            )
            library = roc_auc_score(rows["split"].to_numpy() == "member", -losses)
        assert abs(auc - library) < 0.01, name
        assert {(version, "m4i_mb", "unrestricted"), (version, "m4i_fb", "unrestricted")} <= scenarios, name
