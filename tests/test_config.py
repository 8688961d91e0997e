"""Config loading, overrides and validation errors."""

from pathlib import Path

import pytest

from selfsup.config import Config, ConfigError, dump_config, load_config
from selfsup.engine.build import validate_components

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.lr=0.5", "method.temperature=0.3", "eval.knn_k=[5,10]"])
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)
    assert cfg.optim.lr == 0.5
    assert cfg.method == {"name": "simclr", "temperature": 0.3}
    assert cfg.eval.knn_k == [5, 10]


def test_unknown_engine_key_names_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"train\.epoch.*did you mean 'epochs'"):
        load_config(None, ["train.epoch=3"])


def test_unknown_section() -> None:
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        load_config(None, ["trian.epochs=3"])


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer"):
        load_config(None, ["train.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"train\.precision.*not one of"):
        load_config(None, ["train.precision=fp8"])


def test_component_options_checked_against_signature() -> None:
    cfg = load_config(None, ["method.temprature=0.2"])
    with pytest.raises(ConfigError, match=r"method\.temprature.*did you mean 'temperature'"):
        validate_components(cfg)
    cfg = load_config(None, ["method.temperature=hot"])
    with pytest.raises(ConfigError, match=r"method\.temperature: expected a number"):
        validate_components(cfg)
    cfg = load_config(None, ["method.name=simclrr"])
    with pytest.raises(ConfigError, match="did you mean 'simclr'"):
        validate_components(cfg)
    cfg = load_config(None, ["backbone.in_channels=3"])
    with pytest.raises(ConfigError, match="set by the engine"):
        validate_components(cfg)


def test_dump_roundtrip(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.ema_momentum=[0.99,1.0]", "backbone.width=16"])
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert again.train.ema_momentum == (0.99, 1.0)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")))
def test_shipped_configs_validate(path: str) -> None:
    validate_components(load_config(REPO / path))


def test_switching_component_drops_other_defaults() -> None:
    cfg = Config()
    assert cfg.options("method") == {}
    cfg = load_config(None, ["method.name=byol"])
    assert cfg.method == {"name": "byol"}


def test_numbers_follow_yaml_1_2_in_overrides_and_files(tmp_path: Path) -> None:
    """``1e-3`` is a float (YAML 1.1, PyYAML's default, would read it as a string)."""
    cfg = load_config(None, ["optim.lr=1e-3", "optim.betas=[0.9, 9.5E-1]"])
    assert cfg.optim.lr == 0.001 and cfg.optim.betas == (0.9, 0.95)
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 2e-4, weight_decay: 5e-2}\nrun: {name: 1e3x}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 0.0002 and cfg.optim.weight_decay == 0.05 and cfg.run.name == "1e3x"
