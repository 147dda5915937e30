"""Audits as first-class objects: each audit sees its own records, roles and models, also when two audits
share a home and their datasets share records."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import transformers
from conftest import ingest, materialize_audit
from dagster import DagsterInstance
from PIL import Image

from m4i_assets.defs.definitions import build_resources
from m4i_assets.settings import PROFILES, AuditSettings

REPO = Path(__file__).resolve().parents[1]


def test_two_audits_whose_datasets_share_records_keep_their_own(tmp_path):
    """The `defenses` profile's 1k corpus repeats the first 1000 records of the demo's 2.5k one: the same
    record ids in two datasets. Each audit must read its records from its own dataset (a population of the
    second audit used to come out empty)."""
    big = AuditSettings(**PROFILES["tiny"])
    small = AuditSettings(**{**PROFILES["tiny"], "audit": "small", "corpus_records": 160,
                             "corpus_name": "shapes_160", "second_domain_records": 0, "n_members": 32,
                             "n_nonmembers": 32, "n_known_nonmembers": 32})  # fmt: skip
    instance = DagsterInstance.ephemeral()
    for settings in (big, small):
        ingest(build_resources(home=tmp_path, settings=settings), instance)
    storage = build_resources(home=tmp_path, settings=small)["storage"]
    shared = storage.read("SELECT count(*) AS n FROM records a JOIN records b USING (record_id) "
                          "WHERE a.dataset = 'synthetic_shapes' AND b.dataset = 'shapes_160'")["n"][0]  # fmt: skip
    assert shared == 160  # the premise: every record of the small corpus is also in the big one
    for settings, n_population in ((small, 160 - 96), (big, 240 - 144 + 96)):
        repo = storage.repository
        population = repo.audit_records(settings.audit, ("population",), dataset=settings.main_dataset())
        everything = repo.audit_records(settings.audit, ("member", "nonmember", "known_nonmember", "population"))
        assert population.height == n_population - (96 if settings is big else 0)
        assert everything.height == everything["record_id"].n_unique() == n_population + 3 * settings.n_members
        datasets = {settings.main_dataset(), *([] if settings is small else ["synthetic_sketches"])}
        assert set(everything["dataset"]) == datasets
        corpus = str(storage.corpus_dir(settings.main_dataset()))
        main = everything.filter(everything["dataset"] == settings.main_dataset())
        assert all(uri.startswith(corpus) for uri in main["image_uri"])


WORDS = ("red green blue yellow black white orange purple pink brown grey cyan square circle triangle star "
         "cross ring dot line left right top bottom small large bright dark striped plain").split()  # fmt: skip


def write_labelled_manifest(root: Path, roles: dict[str, int], seed: int = 0) -> Path:
    """Noise images (32 px) with random six-word captions and a `split` column naming each row's role."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["image,caption,split"]
    i = 0
    for role, n in roles.items():
        for _ in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
            lines.append(f"images/{i}.png,{' '.join(rng.choice(WORDS, 6))},{role}")
            i += 1
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return root / "pairs.csv"


def hf_clip_trained_by_transformers(manifest: Path, out: Path, steps: int) -> Path:
    """A tiny transformers CLIPModel trained with its own contrastive loss (`return_loss=True`) on the manifest's
    member rows, saved with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained (steps=0: untrained)."""
    from m4i_assets.models.vocabulary import word_level_tokenizer

    rows = pl.read_csv(manifest)
    tokenizer = word_level_tokenizer(("<pad>", "<unk>", "<bos>", "<eos>", *WORDS), "<pad>", "<bos>", "<eos>", "<unk>")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 16, "vocab_size": len(tokenizer), "pad_token_id": 0,
                     "bos_token_id": 2, "eos_token_id": 3},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=64,
    )  # fmt: skip
    model = transformers.CLIPModel(config)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    members = rows.filter(pl.col("split") == "member")
    batch = processor(text=members["caption"].to_list(), padding="max_length", max_length=16, return_tensors="pt",
                      images=[Image.open(manifest.parent / p).convert("RGB") for p in members["image"]])  # fmt: skip
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, return_loss=True).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def transformers_cosine_auc(model_dir: Path, manifest: Path) -> float:
    """CSA's AUC computed with transformers alone: cosine similarities of members' and non-members' pairs."""
    from sklearn.metrics import roc_auc_score

    rows = pl.read_csv(manifest).filter(pl.col("split").is_in(["member", "nonmember"]))
    model = transformers.CLIPModel.from_pretrained(model_dir).eval()
    processor = transformers.CLIPProcessor.from_pretrained(model_dir)
    batch = processor(text=rows["caption"].to_list(), padding="max_length", max_length=16, return_tensors="pt",
                      images=[Image.open(manifest.parent / p).convert("RGB") for p in rows["image"]])  # fmt: skip
    with torch.no_grad():
        out = model(**batch)
    cs = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).numpy()
    return float(roc_auc_score(rows["split"].to_numpy() == "member", cs))


def run_cli(home: Path, *args: str) -> str:
    env = {**os.environ, "M4I_HOME": str(home), "M4I_PROFILE": "tiny"}
    out = subprocess.run([sys.executable, "-m", "m4i_assets.cli", *args], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def registry(home: Path, manifest: Path, audit_yaml: str) -> None:
    (home / "datasets.yaml").write_text(f"datasets:\n  - {{name: acme_pairs, format: manifest, path: {manifest}}}\n")
    (home / "audits.yaml").write_text(audit_yaml)


def test_unlabelled_audit_scores_candidates_and_estimates_a_membership_rate(tmp_path):
    """Candidates of unknown membership (half of them the target's training rows) and known non-members: scores
    with is_member NULL, exposure ranks, no AUC row, and an estimated membership rate with its CI."""
    from dagster import materialize

    from m4i_assets.defs.automation import audit_selection

    manifest = write_labelled_manifest(tmp_path / "data", {"member": 32, "nonmember": 32, "known_nonmember": 48})
    target = hf_clip_trained_by_transformers(manifest, tmp_path / "models" / "clip", steps=150)
    rows = pl.read_csv(manifest)  # the auditor does not know who was in: members and non-members become candidates
    rows.with_columns(split=pl.when(pl.col("split") == "known_nonmember").then(pl.lit("held_out"))
                      .otherwise(pl.lit("unknown"))).write_csv(manifest)  # fmt: skip
    registry(
        tmp_path,
        manifest,
        f"""audits:
  - name: acme-unlabelled
    family: clip
    dataset: acme_pairs
    roles: {{column: split, candidate: unknown, known_nonmember: held_out}}
    targets: [{target}]
""",
    )
    settings = AuditSettings(**{**PROFILES["tiny"], "audit": "acme-unlabelled"})
    resources = build_resources(home=tmp_path, settings=settings)
    instance = DagsterInstance.ephemeral()
    assets = ingest(resources, instance)
    assert materialize(assets, resources=resources, instance=instance, selection=["audit_plan", "target_clip"]).success
    storage = resources["storage"]
    (version,) = storage.repository.latest_versions("acme-unlabelled", "target")
    spec = settings.registered_audit(tmp_path)
    selection = audit_selection("clip", spec)
    assert "clip/attack_metrics" not in selection and "clip/blind_baseline_scores" not in selection
    assert "clip/csa_scores" in selection and "clip/membership_rate" in selection
    materialize_audit(assets, "clip", spec, version, resources, instance)
    plan = dict(storage.read("SELECT attack, status FROM audit_plan WHERE audit = 'acme-unlabelled'").rows())
    assert plan == {
        "csa": "run",
        "aea": "run",
        "clip_loss": "run",
        "rmia": "skipped",
        "wsa": "run",
        "ref_calibrated": "skipped",
        "blind_baseline": "skipped",
    }
    query = ("SELECT attack, count(*) AS n, count(is_member) AS labelled, max(exposure_rank) AS worst "
             "FROM scored_records WHERE model_version = ? GROUP BY attack ORDER BY attack")  # fmt: skip
    scores = storage.read(query, [version])
    assert scores.rows() == [("aea", 64, 0, 64), ("clip_loss", 64, 0, 64), ("csa", 64, 0, 64), ("wsa", 64, 0, 64)]
    assert storage.read("SELECT count(*) AS n FROM attack_metrics WHERE model_version = ?", [version])["n"][0] == 0
    (rate,) = storage.read("SELECT * FROM membership_rate WHERE model_version = ?", [version]).to_dicts()
    assert rate["n_candidates"] == 64 and rate["n_known_nonmembers"] == 48 and rate["alpha"] == 0.05
    assert rate["ci_low"] <= rate["estimated_rate"] <= rate["ci_high"]
    assert rate["estimated_rate"] > 0.1  # half the candidates were memorised members


def test_role_errors_name_the_audit_and_the_column(tmp_path):
    from m4i_assets.data.audits import load_audits, roles_from_data

    def audit(roles: str, extra: str = "") -> list:
        (tmp_path / "audits.yaml").write_text(
            f"audits:\n  - {{name: a1, family: clip, dataset: d, targets: [m], roles: {roles}{extra}}}\n"
        )
        return load_audits(tmp_path / "audits.yaml")

    with pytest.raises(ValueError, match="audit 'a1'.*value 'x' of column 'split' is given to two roles"):
        audit("{column: split, member: x, nonmember: [y, x]}")
    with pytest.raises(ValueError, match="audit 'a1'.*member and nonmember.*or candidate"):
        audit("{column: split, member: x}")
    with pytest.raises(ValueError, match="unlabelled audit needs roles.known_nonmember"):
        audit("{column: split, candidate: c}")
    (spec,) = audit("{column: group, member: in, nonmember: out, known_nonmember: known}", ", sample: {member: 2}")
    records = pl.DataFrame({
        "record_id": [f"r{i}" for i in range(8)], "dataset": "d", "split": None,
        "image_uri": ["a", "a", "b", "c", "d", "e", "f", "g"],
        "metadata": [json.dumps({"group": g}) for g in ["in", "in", "in", "in", "out", "out", "known", "other"]],
    })  # fmt: skip
    roles = roles_from_data(records, spec, seed=0)
    counts = dict(roles.group_by("role").len().rows())
    assert counts.pop("member") in (2, 3) and counts == {"nonmember": 2, "known_nonmember": 1}  # "other": no role
    members = roles.filter(pl.col("role") == "member")["record_id"].to_list()
    assert ("r0" in members) == ("r1" in members)  # sampled by image: the two records of image "a" stay together
    assert roles["is_member"].to_list() == [r in members for r in roles["record_id"]]
    again = roles_from_data(records, spec, seed=0)
    assert again.equals(roles)  # seeded
    groups = ["in", "out", "in", "in", "out", "out", "known", "x"]  # image "a": one record in, one out
    mixed = records.with_columns(metadata=pl.Series([json.dumps({"group": g}) for g in groups]))
    with pytest.raises(ValueError, match="audit 'a1', column 'group': 1 image.*records that share an image"):
        roles_from_data(mixed, spec, seed=0)
    with pytest.raises(ValueError, match="audit 'a1', column 'group': the known_nonmember value.*'known'.* match no"):
        roles_from_data(records.filter(pl.col("record_id") != "r6"), spec, seed=0)


def test_a_checkpoint_dropped_under_an_audit_folder_is_a_target_of_that_audit(tmp_path):
    from dagster import build_sensor_context

    from m4i_assets.defs.automation import watched_models_sensor
    from m4i_assets.defs.definitions import build_definitions
    from m4i_assets.defs.resources import Storage
    from m4i_assets.models import clip

    manifest = write_labelled_manifest(tmp_path / "data", {"member": 2, "nonmember": 2})
    registry(tmp_path, manifest, "audits:\n  - {name: acme, family: clip, dataset: acme_pairs, targets: [x], "
                                 "roles: {column: split, member: member, nonmember: nonmember}}\n")  # fmt: skip
    for folder, seed in ((tmp_path / "watched_models" / "acme" / "v2", 1), (tmp_path / "watched_models" / "plain", 2)):
        clip.save_clip(clip.build_clip("m4i-tiny-vit", seed=seed), folder, {})
    storage, settings = Storage(home=str(tmp_path)), AuditSettings(**PROFILES["tiny"])
    repository = build_definitions(home=tmp_path, settings=settings).get_repository_def()
    context = build_sensor_context(instance=DagsterInstance.ephemeral(), repository_def=repository,
                                   resources={"storage": storage, "settings": settings})  # fmt: skip
    result = watched_models_sensor(context)
    by_audit = {storage.repository.model_info(r.tags["m4i/version"])["audit"]: r for r in result.run_requests}
    assert set(by_audit) == {"acme", "tiny"}  # the plain folder keeps today's behaviour: the settings' audit
    assert by_audit["acme"].tags["m4i/version"].endswith("@acme")
    selected = {k.to_user_string() for k in by_audit["acme"].asset_graph_subset.asset_keys}
    assert "clip/ref_calibrated_scores" not in selected and {"clip/csa_scores", "clip/attack_metrics"} <= selected
    assert set(json.loads(result.cursor)) == {"acme/v2", "plain"}


def test_rematerializing_the_plan_keeps_the_skips_of_defended_versions(tmp_path):
    """`audit_plan` replaces the audit-wide rows only: the per-version skips a defended release adds
    (`plan_release_skips`) survive it, and re-planning a version replaces that version's rows only."""
    from m4i_assets.defs.assets.audits import replace_plan_rows
    from m4i_assets.defs.resources import Storage

    storage = Storage(home=str(tmp_path))
    plan = pl.DataFrame({"attack": ["csa", "wsa"], "status": ["run", "run"], "reason": [None, None],
                         "kind": ["labelled"] * 2}, schema_overrides={"reason": pl.Utf8})  # fmt: skip
    skip = pl.DataFrame({"attack": ["wsa"], "status": ["skipped"], "reason": ["needs embeddings"],
                         "model_version": ["v+round"], "kind": ["labelled"]})  # fmt: skip
    replace_plan_rows(storage, "acme", plan, [""])
    replace_plan_rows(storage, "acme", skip, ["v+round"])
    replace_plan_rows(storage, "acme", plan.head(1), [""])  # the plan re-materialized, now with one attack
    replace_plan_rows(storage, "other", plan, [""])
    rows = storage.read("SELECT attack, status, model_version FROM audit_plan WHERE audit = 'acme' ORDER BY ALL")
    assert rows.rows() == [("csa", "run", ""), ("wsa", "skipped", "v+round")]
    replace_plan_rows(storage, "acme", skip.head(0), ["v+round"])
    assert storage.read("SELECT count(*) AS n FROM audit_plan WHERE audit = 'acme'")["n"][0] == 1


def test_checkpoints_are_read_before_they_are_registered(tmp_path):
    """A registry target that is no checkpoint (a CSV), a torch file that pickles an object, or a safetensors
    file with a broken header is refused when it is staged, naming the file, and leaves nothing staged behind."""
    from m4i_assets.data.audits import AuditSpec, Checkpoint
    from m4i_assets.families import stage_checkpoint
    from m4i_assets.models import clip

    staging = tmp_path / "home"
    staging.mkdir()
    audit = AuditSpec("acme", "clip", "d", "split", {"member": ("m",), "nonmember": ("n",)}, ())
    (tmp_path / "pairs.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match=r"pairs.csv is not a checkpoint: give a weights file .*supported: clip"):
        stage_checkpoint(staging, audit, Checkpoint(str(tmp_path / "pairs.csv"), "m4i-tiny-vit"))
    torch.save({"state_dict": {"w": torch.zeros(1)}, "optimizer": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"pickled.pt is not a readable weights-only torch checkpoint: it pickles"):
        stage_checkpoint(staging, audit, Checkpoint(str(tmp_path / "pickled.pt"), "m4i-tiny-vit"))
    folder = tmp_path / "broken"
    clip.save_clip(clip.build_clip("m4i-tiny-vit"), folder, {})
    weights = folder / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # a header length no file has
    with pytest.raises(ValueError, match=r"broken/model.safetensors is not a readable safetensors checkpoint"):
        stage_checkpoint(staging, audit, Checkpoint(str(folder)))
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors checkpoint"):
        stage_checkpoint(staging, audit, Checkpoint(str(weights), "m4i-tiny-vit"))  # a staged copy, then removed
    assert list(staging.iterdir()) == []
