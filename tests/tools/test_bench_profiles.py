"""Bench profiles as YAML files (config/bench/NAME.yaml): every shipped one loads, ``--profile PATH`` runs
an edited copy the same way as the named profile, and a bad file is refused with one line naming the
field, the value and what is allowed, exit code 2, before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedml_prism.tools.bench import PROFILE_DIR, PROFILES, load_profile_file, plan_runs, resolve_profile
from fedml_prism.tools.cli import main

SHIPPED = ("smoke", "cpu", "fidelity", "fidelity_long", "fidelity_methods", "fidelity_methods_cnn", "paper")
SMOKE = PROFILE_DIR / "smoke.yaml"


def _copy(tmp_path: Path, name: str = "my_smoke.yaml", **changes: Any) -> Path:
    """The smoke profile copied to ``tmp_path`` with top-level ``changes`` (None: the key removed)."""
    data = yaml.safe_load(SMOKE.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _plan(profile: dict[str, Any], out: Path) -> list[tuple[dict, Any, dict, str]]:
    return [(key, job.prism, job.flat, job.settings.output_dir) for key, job in plan_runs(profile, str(out), {})]


def test_every_shipped_profile_is_a_commented_yaml_file() -> None:
    assert sorted(PROFILES) == sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))
    assert set(SHIPPED) <= set(PROFILES)
    for name in SHIPPED:
        path = PROFILE_DIR / f"{name}.yaml"
        assert path.read_text().startswith(f'# fedml-prism bench profile "{name}": '), name
        assert load_profile_file(path) == PROFILES[name]


def test_a_copied_profile_file_plans_the_same_runs(tmp_path: Path) -> None:
    copy = tmp_path / "copy.yaml"
    shutil.copy(SMOKE, copy)
    label, profile = resolve_profile(str(copy))
    assert label == "copy"
    assert _plan(dict(profile), tmp_path) == _plan(PROFILES["smoke"], tmp_path)
    # the fidelity profile (variants, partitions, matched keeps) too
    shutil.copy(PROFILE_DIR / "fidelity.yaml", copy)
    assert _plan(load_profile_file(copy), tmp_path) == _plan(PROFILES["fidelity"], tmp_path)


def test_cli_runs_a_profile_file_like_the_named_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    path = _copy(tmp_path)
    common = ["--strategies", "prism,full", "--keep-ratios", "0.5", "--rounds", "1"]
    assert main(["bench", "--profile", "smoke", "--out", str(tmp_path / "named"), *common]) == 0
    assert main(["bench", "--profile", str(path), *common]) == 0  # default out: outputs/bench_<file name>
    capsys.readouterr()
    named = json.loads((tmp_path / "named" / "results.json").read_text())
    copied = json.loads((tmp_path / "outputs" / "bench_my_smoke" / "results.json").read_text())
    assert (named["profile"], copied["profile"]) == ("smoke", "my_smoke")

    def strip(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in ("wall_s", "elapsed_s")} for r in runs]

    assert strip(copied["runs"]) == strip(named["runs"]) and len(named["runs"]) == 2


BAD = [
    ({"seed": [0]}, "key 'seed' is invalid: allowed strategies, keep_ratios, partitions, seeds, sections, match"),
    ({"seeds": None}, "key 'seeds' is missing: required strategies, keep_ratios, partitions, seeds, sections"),
    ({"keep_ratios": [0.2, "half"]}, "keep_ratios[1]='half' is invalid: allowed numbers in (0, 1]"),
    ({"keep_ratios": [1.5]}, "keep_ratios[0]=1.5 is invalid: allowed numbers in (0, 1]"),
    ({"seeds": 0}, "seeds=0 is invalid: allowed a non-empty list of integers"),
    ({"seeds": [True]}, "seeds[0]=True is invalid: allowed integers"),
    ({"partitions": ["dirichlet"]}, "partitions[0]='dirichlet' is invalid: allowed iid or dirichletALPHA"),
    ({"strategies": ["prism", "bogus"]}, "strategies[1]='bogus' is invalid: allowed prism, uniform, orthdrop"),
    ({"match": "flops"}, "match='flops' is invalid: allowed params, none"),
    ({"memory": "yes"}, "memory='yes' is invalid: allowed true or false"),
    ({"sections": {"train_args": {"learing_rate": 0.1}}},
     "sections.train_args.learing_rate is not a key FedML 0.9.6 or fedml_prism reads; did you mean learning_rate?"),
    ({"sections": {"train_args": 3}}, "sections.train_args=3 is invalid: allowed a mapping of key: value"),
    ({"sections": {"prism_args": {"kapa": 2.5}}}, "sections.prism_args: prism_args has unknown key(s) ['kapa']"),
    ({"variants": {"x": {"prism_args": {"strategy": "prism"}, "keep": [0.2]}}},
     "key 'variants.x.keep' is invalid: allowed prism_args, sections, keep_ratios, partitions"),
    ({"variants": {"x": {"prism_args": {"strategy": "bogus"}}}}, "variants.x.prism_args"),
    ({"variants": {"x": {"prism_args": {"strategy": "prism"}, "partitions": ["iid", "noniid"]}}},
     "variants.x.partitions[1]='noniid' is invalid"),
    ({"learning_rates": [0.05, 0]}, "learning_rates[1]=0 is invalid: allowed positive numbers"),
    ({"learning_rates": [0.05, "0.1"]}, "learning_rates[1]='0.1' is invalid: allowed positive numbers"),
    ({"learning_rates": [0.05, 0.05]}, "learning_rates=[0.05, 0.05] is invalid: allowed distinct positive numbers"),
    ({"learning_rates": 0.05}, "learning_rates=0.05 is invalid: allowed a non-empty list of positive numbers"),
    ({"learning_rates": [0.05], "sweep_seeds": [3]}, "sweep_seeds[0]=3 is invalid: allowed seeds of the profile ([0])"),
    ({"sweep_seeds": [0]}, "sweep_seeds is invalid without learning_rates"),
    ({"variants": {"x": {"prism_args": {"strategy": "prism"}, "seeds": [0.5]}}},
     "variants.x.seeds[0]=0.5 is invalid: allowed integers"),
    ({"variants": {"x": {"prism_args": {"strategy": "prism"}, "learning_rates": [-1]}}},
     "variants.x.learning_rates[0]=-1 is invalid: allowed positive numbers"),
]


@pytest.mark.parametrize(("changes", "message"), BAD, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD)])
def test_a_bad_profile_file_is_refused_before_any_work(
    changes: dict[str, Any], message: str, tmp_path: Path, capsys
) -> None:
    path = _copy(tmp_path, "bad.yaml", **changes)
    out = tmp_path / "out"
    assert main(["bench", "--profile", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"fedml-prism bench: error: {path}: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("profile", "message"),
    [("smok", "--profile 'smok' is invalid: allowed cpu, fidelity, "),
     ("nope.yaml", "--profile 'nope.yaml' is invalid: no such file")],
)
def test_an_unknown_profile_name_or_missing_file_is_refused(profile: str, message: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["bench", "--profile", profile, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedml-prism bench: error: ") and message in err[-1], err
    assert not out.exists()


def test_a_file_that_is_not_a_profile_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- full\n- prism\n")
    with pytest.raises(ValueError, match="list.yaml: the file must be a mapping of key: value"):
        load_profile_file(path)
    path.write_text("strategies: [full\n")
    with pytest.raises(ValueError, match=r"list.yaml: not valid YAML: .*line 1") as err:
        load_profile_file(path)
    assert "\n" not in str(err.value)
