"""Recipes: every shipped YAML validates on every backend; mistakes are one clear error."""

from pathlib import Path

import pytest

from lab.errors import LabError
from lab.recipe import RECIPES_DIR, load_recipe, parse_overrides

SHIPPED = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_the_three_required_recipes_ship():
    assert {"identity-lora", "identity-full", "roleplay-lora"} <= set(SHIPPED)


@pytest.mark.parametrize("hw", ["cpu", "cuda", "rocm"])
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates_on_every_backend(name, hw):
    recipe = load_recipe(name, hw=hw)  # also checks every train key against TRL's SFTConfig
    assert recipe.backend == hw
    for ds in recipe.datasets:
        assert recipe.resolve_path(ds.path).is_file(), ds.path
    assert recipe.resolve_path(recipe.probe.questions).is_file()


def test_recipes_name_no_machine():
    for path in RECIPES_DIR.glob("*.yaml"):
        text = path.read_text()
        assert "/home/" not in text and "/root/" not in text and "localhost" not in text, path


def test_overlay_applies_only_to_its_backend():
    cpu, cuda = load_recipe("identity-lora", hw="cpu"), load_recipe("identity-lora", hw="cuda")
    assert cpu.model.dtype == "float32" and cuda.model.dtype == "auto"  # the device decides (test_capability)
    assert cuda.model.path == "Qwen/Qwen3-0.6B" and cpu.model.path == "smollm2"
    assert "bf16" not in cuda.train and "bf16" not in cpu.train and cuda.train["learning_rate"] == 1e-4


def test_a_model_overlay_applies_to_its_model_and_the_command_line_still_wins():
    real, tiny = load_recipe("identity-lora", hw="cpu"), load_recipe("identity-lora", ["model.path=embedded"], hw="cpu")
    assert real.train["num_train_epochs"] != tiny.train["num_train_epochs"] == 12
    assert tiny.probe.thresholds.after_hit_rate_min == 0.95 > real.probe.thresholds.after_hit_rate_min
    mine = load_recipe("identity-lora", ["model.path=embedded", "train.num_train_epochs=2"], hw="cpu")
    assert mine.train["num_train_epochs"] == 2 and mine.probe.thresholds.after_hit_rate_min == 0.95
    # a saved run keeps what it resolved to: the overlay is not applied twice
    assert mine.models and mine.model_dump()["train"]["num_train_epochs"] == 2


def test_cli_overrides_win_and_are_typed():
    r = load_recipe("identity-lora", ["identity.name=Orion", "identity.author=Zhou Lab", "train.learning_rate=1e-4",
                                      "lora.r=8", "datasets.0.repeat=2"], hw="cpu")
    assert (r.identity.name, r.identity.author) == ("Orion", "Zhou Lab")
    assert r.train["learning_rate"] == 1e-4 and isinstance(r.train["learning_rate"], float)
    assert r.lora.r == 8 and r.datasets[0].repeat == 2


def test_unknown_keys_list_close_matches():
    with pytest.raises(LabError, match=r"unknown key 'identity.nmae' \(did you mean name"):
        load_recipe("identity-lora", ["identity.nmae=X"], hw="cpu")
    with pytest.raises(LabError, match=r"train.learning_rat' .*did you mean learning_rate"):
        load_recipe("identity-lora", ["train.learning_rat=0.1"], hw="cpu")
    with pytest.raises(LabError, match=r"unknown key 'methd'.*did you mean method"):
        load_recipe("identity-lora", ["methd=full"], hw="cpu")


def test_all_problems_reported_at_once():
    with pytest.raises(LabError) as e:
        load_recipe("identity-lora", ["methd=full", "lora.r=0", "train.epochs=3"], hw="cpu")
    msg = str(e.value)
    assert "methd" in msg and "lora.r" in msg and "train.epochs" in msg and "\n" not in msg


def test_lab_owned_train_keys_are_refused():
    with pytest.raises(LabError, match="output_dir is set by the lab"):
        load_recipe("identity-lora", ["train.output_dir=/tmp/x"], hw="cpu")


@pytest.mark.parametrize("bad, message", [
    (["nokey"], "not key.sub=value"),
    (["datasets.7.path=x"], "not an index"),
    (["method=dora"], "method"),
])
def test_bad_overrides(bad, message):
    with pytest.raises(LabError, match=message):
        load_recipe("identity-lora", bad, hw="cpu")


def test_unknown_recipe_and_backend():
    with pytest.raises(LabError, match="shipped recipes: .*identity-lora"):
        load_recipe("nope")
    with pytest.raises(LabError, match="HW='tpu'"):
        load_recipe("identity-lora", hw="tpu")


def test_bad_yaml_names_the_line(tmp_path: Path):
    f = tmp_path / "r.yaml"
    f.write_text("name: x\ndatasets: [\n  - : :\n")
    with pytest.raises(LabError, match=r"r.yaml:\d+: not valid YAML"):
        load_recipe(str(f))


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["a.b=3", "c=true", "d=[1, 2]", "e='Zhou Lab'"]) == [
        (["a", "b"], 3), (["c"], True), (["d"], [1, 2]), (["e"], "Zhou Lab")]


def test_sha256_changes_with_content():
    a, b = load_recipe("identity-lora", hw="cpu"), load_recipe("identity-lora", ["identity.name=Orion"], hw="cpu")
    assert a.sha256() != b.sha256() and a.sha256() == load_recipe("identity-lora", hw="cpu").sha256()


def test_guarded_train_keys_pass_only_when_the_recipe_allows_them(tmp_path):
    from lab.errors import LabError
    from lab.recipe import RECIPES_DIR, load_recipe

    text = (RECIPES_DIR / "identity-lora.yaml").read_text().replace("path: data/", f"path: {RECIPES_DIR}/data/")
    path = tmp_path / "r.yaml"
    path.write_text(text + "allow: [trust_remote_code, push_to_hub]\n")
    r = load_recipe(str(path), ["train.trust_remote_code=true", "train.push_to_hub=true",
                                "train.hub_model_id=me/x"], hw="cpu")
    assert r.train["trust_remote_code"] is True and r.allow == ["trust_remote_code", "push_to_hub"]
    with pytest.raises(LabError, match="report_to sends metrics to an outside service"):
        load_recipe(str(path), ["train.report_to=wandb"], hw="cpu")
    with pytest.raises(LabError, match="hub_token is a credential"):  # never allowed: it would be copied
        load_recipe(str(path), ["train.hub_token=hf_x"], hw="cpu")
    assert load_recipe(str(path), ["train.report_to=none"], hw="cpu").train["report_to"] == "none"


def test_token_strings_of_the_model_are_not_credentials():
    from lab.recipe import load_recipe

    r = load_recipe("identity-lora", ["train.eos_token=<|im_end|>", "train.pad_token=<|endoftext|>",
                                      "train.report_to=tensorboard", "train.hub_strategy=end"], hw="cpu")
    assert r.train["eos_token"] == "<|im_end|>" and r.train["report_to"] == "tensorboard"


def test_a_runs_saved_recipe_with_set_on_top_and_for_another_backend(tmp_path: Path):
    """What `make serve`/`make probe` read for a run: its recipe.yaml; SET over it; on another
    backend, the same content (the run's model, thresholds); paths still relative to the recipe."""
    from lab.recipe import load_saved

    saved = load_recipe("identity-lora", ["identity.name=Orion"], hw="cpu", check_train=False)
    (tmp_path / "recipe.yaml").write_text(saved.to_yaml(), encoding="utf-8")
    assert load_saved(tmp_path).sha256() == saved.sha256()
    assert load_saved(tmp_path, [], hw="cpu").sha256() == saved.sha256()

    on_top = load_saved(tmp_path, ["identity.author=Zhou Lab", "chat_template_kwargs.enable_thinking=true"], hw="cpu")
    assert (on_top.identity.name, on_top.identity.author) == ("Orion", "Zhou Lab")
    assert on_top.chat_template_kwargs == {"enable_thinking": True}
    assert on_top.resolve_path(on_top.probe.questions) == saved.resolve_path(saved.probe.questions)

    gpu = load_saved(tmp_path, hw="cuda")  # not the cuda overlay's Qwen/Qwen3-0.6B: the run trained its own model
    assert gpu.backend == "cuda" and gpu.model_dump(exclude={"backend"}) == saved.model_dump(exclude={"backend"})

    with pytest.raises(LabError, match=r"recipe.yaml with SET: unknown key 'identity.nmae' \(did you mean name\?\)"):
        load_saved(tmp_path, ["identity.nmae=X"])
    with pytest.raises(LabError, match="serve.api_key is a credential"):
        load_saved(tmp_path, ["serve.api_key=abc"])


def test_zero_epochs_are_fine_when_max_steps_counts_instead():
    r = load_recipe("identity-lora", ["train.num_train_epochs=0", "train.max_steps=10"], hw="cpu")
    assert r.train["num_train_epochs"] == 0 and r.train["max_steps"] == 10
    with pytest.raises(LabError, match=r"train.num_train_epochs=-1 trains nothing"):  # negative: never
        load_recipe("identity-lora", ["train.num_train_epochs=-1", "train.max_steps=10"], hw="cpu")


def test_an_empty_identity_in_the_recipe_file_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ndatasets: [{path: d.json}]\nidentity: {name: '', author: ' '}\n")
    with pytest.raises(LabError) as e:
        load_recipe(str(path), hw="cpu")
    assert str(e.value) == ("r.yaml: identity.name is empty; give the name the model answers with, e.g. "
                            "identity.name=Orion; identity.author is empty; give who the model says made it, "
                            "e.g. identity.author='Zhou Lab'")
