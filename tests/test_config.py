from pathlib import Path

import pytest

from dppmg.config import Config, load_config, to_yaml
from dppmg.errors import DppmgError

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
