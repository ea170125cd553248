from pathlib import Path

import pytest
import yaml

from apex_cli.config import (
    Recipe,
    builtin_recipes,
    dump_recipe,
    find_recipe,
    load_recipe,
    parse_yaml,
    validate_recipe,
)
from apex_cli.errors import RecipeError

RECIPES = Path(__file__).parents[3] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_in_the_repository_validates(path):
    recipe = load_recipe(str(path))
    assert recipe.name == path.stem  # the name field matches the file name


def test_builtin_recipes_are_the_repository_recipes():
    assert set(builtin_recipes()) == {p.stem for p in RECIPES.glob("*.yaml")}


def test_found_by_name_and_by_path():
    assert find_recipe("toy2d-apex")[0] == "built-in recipe toy2d-apex"
    assert find_recipe("toy2d-apex.yaml")[0] == "built-in recipe toy2d-apex"
    assert find_recipe(str(RECIPES / "toy2d-apex.yaml"))[0] == str(RECIPES / "toy2d-apex.yaml")


def test_missing_recipe_suggests_a_close_name():
    with pytest.raises(RecipeError, match=r"recipe 'toy2d-apx' not found.*Did you mean 'toy2d-apex'"):
        find_recipe("toy2d-apx")


def test_overrides_are_typed_and_validated():
    recipe = load_recipe(
        "toy2d-apex",
        [
            "train.lr=1e-4",
            "method.roles.adv=0",
            "method.dist_match_coef=0",
            "sampler.gap=[0.001, 0.5]",
            "model.init=null",
        ],
    )
    assert recipe.train.lr == 1e-4
    assert recipe.method.roles.adv == 0
    assert recipe.sampler.gap == (0.001, 0.5)
    assert recipe.model.init is None


def test_all_errors_are_reported_at_once_with_dotted_paths():
    with pytest.raises(RecipeError) as info:
        load_recipe("toy2d-apex", ["train.lr=-1", "train.lrr=3", "method.shift=flip", "sampler.nfe=zero"])
    message = str(info.value)
    assert "\n" not in message
    assert "train.lr: Input should be greater than 0 (got -1)" in message
    assert "train.lrr: unknown key; did you mean 'lr'?" in message
    assert "method.shift: Input should be 'negate', 'affine', 'negative_time' or 'negate+negative_time'" in message
    assert "sampler.nfe: Input should be a valid integer" in message


def test_unknown_section_lists_the_valid_keys():
    with pytest.raises(RecipeError, match="trian: unknown key; did you mean 'train'"):
        load_recipe("toy2d-apex", ["trian.lr=1"])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["method.enhanced_ratio=1.0"], "enhanced_ratio must be < 1 with reference 'ema'"),
        (["train.batch_size=3"], "train.batch_size (3) is smaller than the 4 active method.roles"),
        (["method.roles.adv=0"], "dist_match_coef > 0 needs roles.adv > 0"),
        (["method.roles={e2e: 0, mul: 0, any: 0, adv: 0}"], "at least one role fraction must be > 0"),
        (["data.layout=grid"], "layout 'grid' needs a square num_modes"),
        (["data.weights=[1, 2]"], "weights has 2 entries but num_modes is 8"),
        (["sampler.gap=[0.5, 0.6]"], "gap [g0, g1] needs 0 <= g0 < 1 - g1 <= 1"),
        (["sampler.nfe=0"], "sampler.nfe: Input should be greater than or equal to 1"),
        (["sampler.style=euler"], "sampler.style: Input should be 'few', 'any' or 'mul'"),
        (["method.time_dist=[1, 1, 2]"], "time_dist [a, b, s] needs"),
        (["train.lr"], "override 'train.lr' is not of the form key.sub=value"),
        (["model.name=foo"], "model.name: unknown name 'foo'; expected one of 'toy2d-mlp', 'shapes-unet'"),
        (["model.hiden_dim=3"], "model.hiden_dim: unknown key; did you mean 'hidden_dim'?"),
        (["data={name: shapes}"], "model 'toy2d-mlp' trains on data 'toy2d', not 'shapes'"),
    ],
)
def test_invalid_values_name_the_problem(overrides, fragment):
    with pytest.raises(RecipeError) as info:
        load_recipe("toy2d-apex", overrides)
    assert fragment in str(info.value)


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match=r"bad.yaml is not valid YAML at line \d+"):
        load_recipe(str(bad))


def test_dumped_recipe_reloads_identically(tmp_path):
    recipe = load_recipe("toy2d-apex-grid", ["train.steps=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(str(path)) == recipe


def test_recipes_are_frozen():
    recipe = load_recipe("toy2d-apex")
    with pytest.raises(Exception, match="frozen"):
        recipe.train.lr = 1.0  # type: ignore[misc]


def test_schema_rejects_a_newer_schema_version():
    raw = parse_yaml("x", builtin_recipes()["toy2d-apex"])
    raw["schema_version"] = 2
    with pytest.raises(Exception, match="schema_version"):
        Recipe.model_validate(raw)


def test_builtin_recipe_text_is_valid_yaml_with_a_run_command():
    for name, text in builtin_recipes().items():
        assert f"apex distill --recipe {name}" in text
        assert yaml.safe_load(text)["description"]


def _diffusers(**sections):
    raw = {
        "name": "t",
        "model": {"name": "tiny-qwen-image"},
        "data": {"name": "prompts", "path": "p.txt", "image_size": 32},
        "train": {"steps": 1, "batch_size": 8, "lr": 1e-4},
        "output": {"dir": "x", "evaluate": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"hardware": {"strategy": "fsdp"}}, "hardware.strategy: fsdp shards over processes"),
        ({"hardware": {"cpu_offload": True}}, "hardware.cpu_offload: offloads FSDP shards; set hardware.strategy"),
        ({"hardware": {"nodes": 2}}, "hardware.rdzv_endpoint: nodes > 1 needs the host:port"),
        ({"hardware": {"processes": 3}}, "train.batch_size (8) must be a multiple of the 3 processes"),
        ({"hardware": {"processes": 4}}, "train.batch_size (2 per process (8 over 4 processes)) is smaller"),
        ({"data": {"image_size": 36}}, "data.image_size: tiny-qwen-image needs a multiple of 8 pixels"),
        ({"data": {"name": "manifest", "path": "pairs.csv"}}, "data.path: a manifest is a .jsonl or .parquet file"),
        ({"data": {"path": "p.csv"}}, "data.path: prompts come from a .txt, .jsonl or .parquet file"),
        ({"model": {"name": "toy2d-mlp"}}, "data.name: model 'toy2d-mlp' trains on data 'toy2d', not 'prompts'"),
        ({"hardware": {"strategy": "warp"}}, "hardware.strategy: Input should be 'ddp' or 'fsdp'"),
    ],
)
def test_layout_and_data_errors_name_the_field_on_one_line(sections, fragment):
    with pytest.raises(RecipeError) as err:
        validate_recipe(_diffusers(**sections), "r.yaml", [])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_an_fsdp_layout_validates_and_counts_its_processes():
    recipe = validate_recipe(_diffusers(hardware={"processes": 2, "strategy": "fsdp"}), "r.yaml", [])
    assert recipe.hardware.world_size == 2
    with pytest.raises(RecipeError, match=r"hardware\.strategy: fsdp shards the blocks of a diffusers transformer"):
        load_recipe("shapes-apex-cpu", ["hardware.processes=2", "hardware.strategy=fsdp"])


BENCHMARK_BASELINES = ("shapes-consistency-cpu", "shapes-twinflow-cpu", "shapes-dmd2-cpu")
METHOD_FIELDS = {"roles", "time_dist", "consistency_ratio", "estimate_order", "delta", "enhanced_ratio", "loss",
                 "dist_match_coef", "adversarial_weighting", "shift", "fake_score"}  # fmt: skip


@pytest.mark.parametrize("name", BENCHMARK_BASELINES)
def test_benchmark_baselines_train_exactly_as_the_apex_recipe(name):
    """bench/quality.py compares methods: everything but the method's own fields must be shapes-apex-cpu's."""
    apex = load_recipe(str(RECIPES / "shapes-apex-cpu.yaml")).model_dump()
    baseline = load_recipe(str(RECIPES / f"{name}.yaml")).model_dump()
    for section in ("model", "data", "sampler", "train", "hardware"):
        assert baseline[section] == apex[section], section
    shared = set(apex["method"]) - METHOD_FIELDS
    assert {k: baseline["method"][k] for k in shared} == {k: apex["method"][k] for k in shared}


def test_teacher_velocity_lifts_the_guidance_bound_and_needs_a_teacher():
    recipe = load_recipe("shapes-apex-cpu", ["method.target_velocity=teacher", "method.enhanced_ratio=2.0"])
    assert recipe.method.reference == "ema"  # a fixed teacher's guidance does not compound, so lambda = 2 is fine
    with pytest.raises(RecipeError, match=r"method\.target_velocity: teacher distils"):
        load_recipe("shapes-teacher-cpu", ["method.target_velocity=teacher"])


def test_regression_pairs_need_a_teacher_and_e2e_rows_and_not_the_dmd2_critic():
    recipe = load_recipe("shapes-apex-cpu", ["method.regression_pairs=64", "method.regression_guidance=2"])
    assert (recipe.method.regression_pairs, recipe.method.regression_nfe) == (64, 50)
    with pytest.raises(RecipeError, match=r"method\.regression_pairs: the pairs come from the teacher's sampler"):
        load_recipe("shapes-apex-cpu", ["method.regression_pairs=64", "model.init=null"])
    with pytest.raises(RecipeError, match=r"set roles\.e2e > 0"):
        load_recipe("shapes-apex-cpu", ["method.regression_pairs=64", "method.roles.e2e=0", "method.dist_match_coef=0"])
    with pytest.raises(RecipeError, match=r"DMD2 baseline \(fake_score\) trains without pairs"):
        load_recipe("shapes-dmd2-cpu", ["method.regression_pairs=64"])
