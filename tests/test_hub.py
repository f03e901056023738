"""Hub ids, offline, through a real Hugging Face cache: the embedded model published under a
hub id in the layout huggingface_hub writes, resolved by huggingface_hub itself (lab/models.py).
The whole loop on such an id runs in tests/test_e2e.py (here) and tests/test_docker.py (containers)."""

import json

import pytest
from conftest import run_lab
from hub_cache import publish

from lab import models
from lab.errors import LabError


def test_huggingface_hub_sees_the_published_model(hub_model):
    from huggingface_hub import scan_cache_dir

    (repo,) = scan_cache_dir(hub_model["hf_home"] / "hub").repos
    assert repo.repo_id == hub_model["id"] and repo.repo_type == "model"
    (rev,) = repo.revisions
    assert rev.commit_hash == hub_model["commit"] and rev.refs == {"main"}
    assert {f.file_name for f in rev.files} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_a_hub_id_resolves_offline_to_its_snapshot_at_the_revision(hub_model, embedded_model, tmp_path):
    # a second revision (a tag) with one more file: `model.revision` picks it, a commit pins either;
    # that one as an older huggingface_hub cached it (no tree listing)
    commit2 = publish(embedded_model, hub_model["hf_home"], hub_model["id"], revision="v2",
                      extra_files={"NOTE.md": b"second revision\n"}, tree_cache=False)
    snapshots = hub_model["snapshot"].parent
    for revision, commit in ((None, hub_model["commit"]), ("v2", commit2), (hub_model["commit"], hub_model["commit"]),
                             (commit2, commit2)):
        args = ["resolve", "--model", hub_model["id"], *(["--revision", revision] if revision else []),
                "--out", str(tmp_path / "out.json")]
        r = run_lab(*args, env=hub_model["env"], timeout=120)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "out.json").read_text())["model"] == str(snapshots / commit)
    assert models.snapshot_commit(snapshots / commit2) == commit2 and models.snapshot_commit(tmp_path) is None


@pytest.mark.parametrize("model, revision, says", [
    ("nobody/missing-model", None, "'nobody/missing-model' is not in the Hugging Face cache"),
    ("lab-test/pebble-tiny", "no-such-branch", "at revision 'no-such-branch' is not in the Hugging Face cache"),
])
def test_a_hub_id_missing_offline_is_one_line_naming_it(hub_model, model, revision, says):
    r = run_lab("resolve", "--model", model, *(["--revision", revision] if revision else []),
                env=hub_model["env"], timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert says in line and "HF_HUB_OFFLINE" in line and "hf download" in line


def test_training_a_missing_hub_model_stops_in_one_line(hub_model, runs_dir):
    r = run_lab("train", "--hw", "cpu", "--runtime", "local", "--set", "model.path=nobody/missing-model",
                env={**hub_model["env"], "LAB_RUNS": str(runs_dir)}, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("lab train: error: model 'nobody/missing-model'")


def test_local_paths_and_bad_ids(tmp_path, embedded_model):
    assert models.resolve(str(embedded_model)) == str(embedded_model.resolve())
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(LabError, match="is a file"):
        models.resolve(str(tmp_path / "file.bin"))
    with pytest.raises(LabError, match="neither a local directory nor a hub id"):
        models.resolve("not a/valid//hub id")
