"""Config layering (defaults < saved < YAML < --set), type coercion and one-line validation errors."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from mz_pipelines.runtime.config import (
    config_from_dict,
    config_keys,
    config_to_dict,
    dump_config,
    resolve_config,
    save_config,
)
from mz_pipelines.runtime.errors import UserError
from mz_pipelines.runtime.schema import RunConfig, TrainConfig


@dataclass
class Opt:
    lr_max: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    steps: int = 100
    kind: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Model:
    width: int = 16
    sizes: list[int] = field(default_factory=lambda: [8, 16])
    dropout: float | None = None
    bidirectional: bool = False
    name: str = "tiny"
    extras: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.width % 2:
            raise ValueError(f"model.width must be even, got {self.width}")


@dataclass
class Cfg:
    model: Model = field(default_factory=Model)
    train: Opt = field(default_factory=Opt)
    seed: int = 0


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_then_yaml_then_set(tmp_path: Path) -> None:
    assert resolve_config(Cfg) == Cfg()
    y = write(tmp_path, "model:\n  width: 32\n  name: big\ntrain:\n  steps: 7\n")
    cfg = resolve_config(Cfg, yaml_path=y)
    assert (cfg.model.width, cfg.model.name, cfg.train.steps, cfg.train.lr_max) == (32, "big", 7, 1e-3)
    cfg = resolve_config(Cfg, yaml_path=y, overrides=["model.width=64", "train.lr_max=3e-4"])
    assert (cfg.model.width, cfg.model.name, cfg.train.steps, cfg.train.lr_max) == (64, "big", 7, 3e-4)


def test_base_sits_between_defaults_and_yaml(tmp_path: Path) -> None:
    y = write(tmp_path, "seed: 5\n")
    cfg = resolve_config(Cfg, base={"seed": 1, "model": {"width": 4}}, yaml_path=y, overrides=["train.steps=3"])
    assert (cfg.seed, cfg.model.width, cfg.train.steps) == (5, 4, 3)


def test_later_set_wins_and_defaults_are_not_shared() -> None:
    a = resolve_config(Cfg, overrides=["model.sizes=1,2,3", "model.sizes=[4, 5]"])
    assert a.model.sizes == [4, 5]
    b = resolve_config(Cfg)
    assert b.model.sizes == [8, 16]


@pytest.mark.parametrize(
    "item, attr, expected",
    [
        ("train.steps=12", ("train", "steps"), 12),
        ("train.lr_max=1e-3", ("train", "lr_max"), 1e-3),
        ("train.lr_max=2", ("train", "lr_max"), 2.0),
        ("model.bidirectional=true", ("model", "bidirectional"), True),
        ("model.bidirectional=Off", ("model", "bidirectional"), False),
        ("model.name=3", ("model", "name"), "3"),
        ("model.sizes=3,5,7", ("model", "sizes"), [3, 5, 7]),
        ("model.sizes=[3, 5]", ("model", "sizes"), [3, 5]),
        ("model.sizes=", ("model", "sizes"), []),
        ("train.betas=0.8,0.99", ("train", "betas"), (0.8, 0.99)),
        ("model.dropout=0.1", ("model", "dropout"), 0.1),
        ("model.dropout=none", ("model", "dropout"), None),
        ("train.kind=sgd", ("train", "kind"), "sgd"),
        ("model.extras={a: 1}", ("model", "extras"), {"a": 1}),
        ("model={width: 6, name: x}", ("model", "width"), 6),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_set_values_are_coerced_by_field_type(item: str, attr: tuple[str, str], expected: object) -> None:
    cfg = resolve_config(Cfg, overrides=[item])
    value = getattr(getattr(cfg, attr[0]), attr[1])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.lr=0.1", "--set: unknown config key 'train.lr' (did you mean 'train.lr_max'?)"),
        ("lr_max=0.1", "--set: unknown config key 'lr_max' (did you mean 'train.lr_max'?)"),
        ("trian.steps=3", "--set: unknown config key 'trian.steps' (did you mean 'train.steps'?)"),
        ("zzz=1", "--set: unknown config key 'zzz'"),
        ("train.steps=abc", "--set: config key 'train.steps' expects int, got 'abc'"),
        ("train.steps=1.5", "--set: config key 'train.steps' expects int, got '1.5'"),
        ("model.bidirectional=maybe", "--set: config key 'model.bidirectional' expects bool (true/false), got 'maybe'"),
        ("train.kind=adam", "--set: config key 'train.kind' expects one of ['adamw', 'sgd'], got 'adam' (did you mean 'adamw'?)"),
        ("train.betas=0.9", "--set: config key 'train.betas' expects 2 items"),
        ("model.sizes=1,x", "--set: config key 'model.sizes' expects int, got 'x'"),
        ("train.steps", "--set expects KEY=VALUE, got 'train.steps'"),
        ("seed.x=1", "--set: config key 'seed' is a value, not a section"),
        ("model=3", "--set: config key 'model' is a section; set one of its fields"),
        ("model.width=3", "invalid config: model.width must be even, got 3"),
    ],
    ids=lambda v: v if "=" in v or "." in v else None,
)
def test_bad_set_items_are_one_line_user_errors(item: str, message: str) -> None:
    with pytest.raises(UserError) as e:
        resolve_config(Cfg, overrides=[item])
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: 0.1\n", "unknown config key 'train.lr' (did you mean 'train.lr_max'?)"),
        ("model:\n  width: wide\n", "config key 'model.width' expects int, got 'wide'"),
        ("model:\n  bidirectional: 1\n", "config key 'model.bidirectional' expects bool (true/false), got 1"),
        ("model:\n  name: 7\n", "config key 'model.name' expects str, got 7 (int); quote it in YAML"),
        ("model: 5\n", "config key 'model' is a section; give a mapping of its fields, got 5"),
        ("- 1\n- 2\n", "expected a mapping of config keys at the top level, got list"),
        ("model: {width: [1\n", "invalid YAML at line 2, column 1"),
    ],
    ids=["unknown-key", "bad-int", "int-for-bool", "int-for-str", "section-scalar", "top-level-list", "syntax"],
)
def test_yaml_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    y = write(tmp_path, text, "bad.yaml")
    with pytest.raises(UserError) as e:
        resolve_config(Cfg, yaml_path=y)
    assert f"config file '{y}'" in str(e.value) and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^config file not found: .*nope\.yaml$"):
        resolve_config(Cfg, yaml_path=tmp_path / "nope.yaml")


def test_yaml_float_without_dot_and_empty_file(tmp_path: Path) -> None:
    # PyYAML reads `1e-3` as a string; a float field still takes it.
    assert resolve_config(Cfg, yaml_path=write(tmp_path, "train: {lr_max: 1e-3}\n")).train.lr_max == 1e-3
    assert resolve_config(Cfg, yaml_path=write(tmp_path, "", "empty.yaml")) == Cfg()


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = resolve_config(Cfg, overrides=["model.sizes=[5, 7]", "train.betas=0.5,0.6", "model.dropout=0.25", "model.extras={k: 3}"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert resolve_config(Cfg, yaml_path=path) == cfg
    assert config_from_dict(Cfg, yaml.safe_load(path.read_text())) == cfg
    plain = config_to_dict(cfg)
    assert plain["train"]["betas"] == [0.5, 0.6] and isinstance(plain["model"], dict)
    assert yaml.safe_load(dump_config(cfg)) == plain


def test_config_from_dict_is_strict() -> None:
    with pytest.raises(UserError, match=r"^checkpoint: unknown config key 'model.widht' \(did you mean 'model.width'\?\)$"):
        config_from_dict(Cfg, {"model": {"widht": 3}}, source="checkpoint")


def test_config_keys_lists_sections_and_leaves() -> None:
    keys = config_keys(Cfg)
    assert keys[:2] == ["model", "model.width"] and "train.lr_max" in keys and keys[-1] == "seed"


@pytest.mark.parametrize(
    "item, message",
    [
        ("steps=0", "train.steps must be > 0, got 0"),
        ("warmup_steps=20", "train.warmup_steps must be < train.steps, got 20 >= 10"),
        ("min_lr=1.0", "train.min_lr must be <= train.lr"),
        ("grad_clip=-1", "train.grad_clip must be >= 0, got -1.0"),
        ("device=gpu", "expects one of ['auto', 'cpu', 'cuda'], got 'gpu'"),
    ],
    ids=["steps", "warmup", "min-lr", "clip", "device"],
)
def test_shared_train_section_validates(item: str, message: str) -> None:
    @dataclass
    class C:
        train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=10))
        run: RunConfig = field(default_factory=RunConfig)

    with pytest.raises(UserError) as e:
        resolve_config(C, overrides=[f"train.{item}"])
    assert message in str(e.value), str(e.value)


def test_run_name_must_be_a_plain_folder_name() -> None:
    with pytest.raises(UserError, match="run.name must be a plain folder name, got '../x'"):
        resolve_config(RunConfig, overrides=["name=../x"])
