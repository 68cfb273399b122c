import subprocess
import sys
from pathlib import Path

import pytest

from dppmg.cli import main
from dppmg.config import Config, load_config, to_yaml
from dppmg.errors import DppmgError
from stage2_generation.rewards import check_weights

REPO = Path(__file__).resolve().parents[1]


def test_defaults_then_yaml_then_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seed: 3\ndata:\n  name: fromyaml\n  synthetic:\n    n_users: 7\n")
    cfg = load_config(y, ["data.synthetic.n_users=9", "run_name=r1"])
    assert isinstance(cfg, Config)
    assert cfg.seed == 3  # from YAML
    assert cfg.data.name == "fromyaml"  # from YAML
    assert cfg.data.synthetic.n_users == 9  # command line wins over YAML
    assert cfg.run_name == "r1"
    assert cfg.data.synthetic.n_items == Config().data.synthetic.n_items  # default kept
    assert cfg.data.processed_dir == Path("data/processed/fromyaml")
    assert cfg.run_dir == Path("runs/r1")


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["data.nope=1"], "data.nope"),
        (["data.synthetic.n_users=abc"], "data.synthetic.n_users"),
        (["data.split=weird"], "data.split"),
        (["data.split_ratios=[0.5,0.5,0.5]"], "split_ratios"),
        (["data.source=movielens"], "data.raw_dir"),
        (["features.scorer.image_size=30"], "patch_size"),
        (["justaword"], "key=value"),
        (["stage2.grounding.typical_share=0"], "stage2.grounding.typical_share"),
        (["stage2.grounding.typical_share=1.5"], "stage2.grounding.typical_share"),
        (["stage2.rl.weights={}"], "stage2.rl.weights is empty"),
        (["stage2.rl.weights={consistency:1.0}"], "as the one key 'a:1'"),  # YAML wants a space after ':'
        (["eval.max_pairs=-1"], "eval.max_pairs"),
        (["stage1.recency_halflife=-1"], "stage1.recency_halflife"),
        (["eval.downstream_methods=[oracle]"], "eval.downstream_methods"),
        (["eval.downstream_weights=[-1]"], "eval.downstream_weights"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(DppmgError, match=needle.replace("[", r"\[")):
        load_config(None, overrides)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("data:\n  sourse: synthetic\n")
    with pytest.raises(DppmgError) as e:
        load_config(y)
    assert "bad.yaml" in str(e.value) and "data.sourse" in str(e.value)


def test_yaml_syntax_error(tmp_path):
    y = tmp_path / "broken.yaml"
    y.write_text("data: [unclosed\n")
    with pytest.raises(DppmgError, match="broken.yaml"):
        load_config(y)


def test_missing_file():
    with pytest.raises(DppmgError, match="not found"):
        load_config("does/not/exist.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    # raw_dir-based configs validate without their data: reading the files happens at prepare time.
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.name


def test_resolved_yaml_roundtrips(tmp_path):
    cfg = load_config(None, ["data.synthetic.n_users=11", "data.rating_threshold=4"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_reward_weights_given_whole_on_the_command_line_replace_the_defaults():
    cfg = load_config(None, ["stage2.rl.weights={consistency: 1.0}"])
    assert cfg.stage2.rl.weights == {"consistency": 1.0}
    # Overrides apply in order: a later whole mapping replaces what an earlier key edited.
    cfg = load_config(None, ["stage2.rl.weights.fidelity=0", "stage2.rl={weights: {consistency: 1.0}}"])
    assert cfg.stage2.rl.weights == {"consistency": 1.0}


def test_reward_weights_in_a_yaml_file_replace_the_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("stage2:\n  rl:\n    weights:\n      consistency: 1.0\n      fidelity: 2.0\n")
    assert load_config(y).stage2.rl.weights == {"consistency": 1.0, "fidelity": 2.0}
    cfg = load_config(y, ["stage2.rl.weights.fidelity=0"])  # one key edits the file's mapping
    assert cfg.stage2.rl.weights == {"consistency": 1.0, "fidelity": 0.0}


def test_one_reward_weight_edits_only_that_key():
    cfg = load_config(None, ["stage2.rl.weights.fidelity=0"])
    assert cfg.stage2.rl.weights == {**Config().stage2.rl.weights, "fidelity": 0.0}
    assert len(cfg.stage2.rl.weights) == 4


def test_reward_names_are_checked_by_stage_2_not_the_config(capsys):
    cfg = load_config(None, ["stage2.rl.weights.bogus=1"])  # the config knows no reward registry
    assert cfg.stage2.rl.weights["bogus"] == 1.0
    with pytest.raises(DppmgError, match="stage2.rl.weights: unknown reward 'bogus'; registered: "):
        check_weights(cfg.stage2.rl.weights)
    # `dppmg stage2` refuses it before any data or model is touched: exit code 2, the message, no traceback.
    assert main(["stage2", str(REPO / "configs" / "default.yaml"), "stage2.rl.weights.bogus=1", "-q"]) == 2
    err = capsys.readouterr().err
    assert "stage2.rl.weights: unknown reward 'bogus'" in err and "Traceback" not in err


def test_config_imports_no_stage_package():
    code = (
        "import sys; from dppmg.config import load_config; load_config(None, []); "
        "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('stage')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_a_string_field_takes_an_override_as_written():
    # YAML would read off as False and 007 as 7; a string field keeps the text, and null still clears one.
    assert load_config(None, ["run_name=off"]).run_name == "off"
    assert load_config(None, ["run_name=007", "data.name=yes"]).run_name == "007"
    assert load_config(None, ["data.name=yes"]).data.name == "yes"
    assert load_config(None, ["stage2.generation.image_judge=null"]).stage2.generation.image_judge is None
    assert load_config(None, ["stage1.dim=32"]).stage1.dim == 32  # other fields are parsed as before
