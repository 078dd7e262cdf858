"""PriSM inside a FedML user's own driver: args-only trainer/aggregator, the shipped
``run/fedml_native`` script under ``mpiexec -np 3``, and the FedML import boundary (warnings)."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from runtime_utils import BIN, env_for, metrics, run

from fedml_prism import PrincipalModel, PrismConfig
from fedml_prism.workloads.data import load_federated
from fedml_prism.workloads.models import create_model

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[2]
NATIVE = REPO / "run" / "fedml_native"
REQUESTS_WARNING = "RequestsDependencyWarning"
PKG_RESOURCES_WARNING = "pkg_resources is deprecated"


def native_args(tmp_path: Path, **override: Any) -> argparse.Namespace:
    """FedML's flat ``args`` of a 2-silo cross-silo job, as ``fedml.init`` would leave them."""
    values: dict[str, Any] = {
        "training_type": "cross_silo", "scenario": "horizontal", "backend": "MPI", "federated_optimizer": "FedAvg",
        "dataset": "digits", "client_num_in_total": 2, "client_num_per_round": 2, "worker_num": 2, "comm_round": 2,
        "epochs": 1, "batch_size": 16, "learning_rate": 0.05, "frequency_of_the_test": 1, "random_seed": 0,
        "output_dir": str(tmp_path / "out"), "strategy": "prism", "keep_ratio": 0.3, "kappa": 2.5, "seed": 3,
    }
    values.update(override)
    return argparse.Namespace(**values)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("cnn", in_channels=1, image_size=8, width=0.25, hidden=32, num_classes=10)


# ---------------------------------------------------------------------------------- args-only constructors
BAD_ARGS = [
    ({"keep_ratio": 1.5}, "PrismConfig.keep_ratio=1.5 is invalid: allowed a number in (0, 1]"),
    ({"strategy": "fedprox"}, "PrismConfig.strategy='fedprox' is invalid: allowed one of"),
    ({"kappa": -1.0}, "PrismConfig.kappa=-1.0 is invalid: allowed a finite number >= 0"),
    ({"comm_round": 0}, "comm_round=0 is invalid: allowed an integer >= 1"),
    ({"batch_size": "16"}, "batch_size='16' is invalid: allowed an integer >= 1"),
    ({"learning_rate": -0.1}, "learning_rate=-0.1 is invalid: allowed a number > 0"),
    ({"client_num_per_round": 3}, "client_num_per_round=3 is invalid: allowed at most client_num_in_total=2"),
    ({"client_num_per_round": 1, "worker_num": 1}, "client_num_per_round=1 is invalid: allowed client_num_in_total=2"),
    ({"worker_num": 3}, "worker_num=3 is invalid: allowed client_num_in_total=2"),
    ({"training_type": "simulation"}, "training_type='simulation' is invalid: allowed cross_silo"),
    ({"federated_optimizer": "FedProx"}, "federated_optimizer='FedProx' is invalid: allowed FedAvg"),
    # FedML's own transports other than MPI unpickle peers' messages (issue 18, class 10)
    ({"backend": "GRPC"}, "backend='GRPC' is invalid here: FedML's GRPC transport unpickles what peers send"),
    ({"backend": "MQTT_S3"}, "backend='MQTT_S3' is invalid here: FedML's MQTT_S3 transport unpickles what peers send"),
    ({"backend": "TRPC"}, "backend='TRPC' is invalid here: FedML's TRPC transport unpickles"),
    ({"backend": "MQTT_WEB3", "trust_peers": False}, "backend='MQTT_WEB3' is invalid here"),
    ({"backend": "GRPC", "trust_peers": "yes"}, "trust_peers='yes' is invalid: allowed true or false"),
]


@pytest.mark.parametrize("role", ["trainer", "aggregator"])
@pytest.mark.parametrize(("override", "message"), BAD_ARGS, ids=[next(iter(o)) for o, _ in BAD_ARGS])
def test_args_only_constructors_reject_bad_args(tmp_path, role: str, override: dict, message: str) -> None:
    from fedml_prism.runtimes.fedml_glue import PrismClientTrainer, PrismServerAggregator

    cls = PrismClientTrainer if role == "trainer" else PrismServerAggregator
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        cls(tiny_model(), native_args(tmp_path, **override))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("backend", ["MPI", "GRPC", "MQTT_S3"])
def test_pickle_transports_only_with_trust_peers(tmp_path, backend: str) -> None:
    """MPI needs nothing (its peers are your own mpiexec ranks); FedML's other transports need the
    explicit ``trust_peers: true``."""
    from fedml_prism.runtimes.fedml_glue import PrismClientTrainer, PrismServerAggregator

    args = native_args(tmp_path, backend=backend, **({} if backend == "MPI" else {"trust_peers": True}))
    assert PrismServerAggregator(tiny_model(), args).workers == 2
    assert PrismClientTrainer(tiny_model(), args).client.settings.client_num_in_total == 2


def test_unknown_prism_args_key_in_the_yaml_is_reported(tmp_path) -> None:
    """FedML flattens ``prism_args`` onto args, which would hide a typo; the yaml is checked too."""
    from fedml_prism.runtimes.fedml_glue import PrismServerAggregator

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"prism_args": {"keep_ration": 0.3}}))
    with pytest.raises(ValueError, match=re.escape("prism_args has unknown key(s) ['keep_ration']")):
        PrismServerAggregator(tiny_model(), native_args(tmp_path, yaml_config_file=str(cfg), keep_ration=0.3))


def test_args_only_constructors_read_prism_args_and_training_keys(tmp_path) -> None:
    from fedml_prism.runtimes.fedml_glue import PrismClientTrainer, PrismServerAggregator

    args = native_args(tmp_path, keep_ratio=0.4, seed=7, epochs=3, batch_size=8, comm_round=4)
    aggregator = PrismServerAggregator(tiny_model(), args)
    trainer = PrismClientTrainer(tiny_model(), args)
    for config, settings in ((aggregator.server.config, aggregator.server.settings),
                             (trainer.client.config, trainer.client.settings)):
        assert (config.strategy, config.keep_ratio, config.kappa, config.seed) == ("prism", 0.4, 2.5, 7)
        assert (settings.epochs, settings.batch_size, settings.comm_round, settings.client_num_in_total) == (3, 8, 4, 2)
    assert aggregator.server.settings.output_dir == str(tmp_path / "out")
    assert aggregator.workers == 2


def test_server_path_still_needs_workers(tmp_path) -> None:
    from fedml_prism.engine.server import PrismServer, RunSettings
    from fedml_prism.runtimes.fedml_glue import PrismServerAggregator

    model = tiny_model()
    server = PrismServer(model, PrismConfig(), RunSettings(output_dir=str(tmp_path)))
    with pytest.raises(TypeError, match="workers="):
        PrismServerAggregator(model, argparse.Namespace(), server)
    assert PrismServerAggregator(model, argparse.Namespace(), server, workers=3).workers == 3


def test_args_only_objects_inside_fedml_cross_silo_classes(tmp_path) -> None:
    """FedML's own server-side aggregator and silo trainer drive the args-only objects for two rounds, in
    process: each silo trains the PriSM client of its index on its own data, and the server evaluates on
    the test set FedML's aggregator holds."""
    from fedml_prism.runtimes.fedml_glue import PrismClientTrainer, PrismServerAggregator  # isort: split

    from fedml.cross_silo.client.fedml_trainer import FedMLTrainer  # after the glue: FedML imported quietly
    from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator

    args = native_args(tmp_path, comm_round=2, batch_size=64)
    data = load_federated("digits", 2, "iid", 1.0, seed=0)
    (train_num, _, train_global, test_global, local_num, local_train, local_test, _) = data.fedml_dataset(64)
    device = torch.device("cpu")
    aggregator = PrismServerAggregator(tiny_model(), args)
    server = FedMLAggregator(train_global, test_global, train_num, local_train, local_test, local_num, 2, device, args,
                             aggregator)
    silos = {i: FedMLTrainer(i, local_train, local_num, local_test, train_num, device, args,
                             PrismClientTrainer(tiny_model(), args)) for i in range(2)}
    outgoing = server.get_global_model_params()
    for round_idx in range(2):
        assert type(outgoing) is dict and sorted(outgoing) == [0, 1]
        for silo, trainer in silos.items():
            trainer.update_dataset(silo)
            trainer.update_model(outgoing[silo])
            upload, _ = trainer.train(round_idx)
            assert int(upload[f"c{silo}/prism::num_samples"]) == local_num[silo], "silo i trains PriSM client i"
            server.add_local_trained_result(silo, upload, local_num[silo])
        assert server.check_whether_all_receive()
        outgoing, _, _ = server.aggregate()
        server.test_on_server_for_all_clients(round_idx)
    rows = metrics(tmp_path / "out")
    assert [(r["round"], r["clients"], r["distinct_submodels"]) for r in rows] == [(1, 2, 2), (2, 2, 2)]
    assert all(r["test_acc"] == r["test_acc"] for r in rows), "the server did not evaluate on FedML's test set"
    assert aggregator.test(test_global, device, args)["test_acc"] == rows[-1]["test_acc"]
    assert all("prism::finished" in bundle for bundle in outgoing.values())


# ---------------------------------------------------------------------------------- the shipped driver
def test_fedml_native_driver_under_mpiexec(tmp_path) -> None:
    """``mpiexec -np 3 python run/fedml_native/main.py --cf run/fedml_native/fedml_config.yaml`` as shipped,
    from an empty folder: FedML's server calls the PriSM aggregator every round, and the model learns."""
    mpiexec = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
    assert mpiexec, "mpiexec missing: install the mpich wheel (pip install mpich)"
    cfg = NATIVE / "fedml_config.yaml"
    flat = {k: v for section in yaml.safe_load(cfg.read_text()).values() for k, v in section.items()}
    cmd = [mpiexec, "-np", str(flat["worker_num"] + 1), str(BIN / "python"), str(NATIVE / "main.py"), "--cf", str(cfg)]
    log = run(cmd, tmp_path, "native.log", timeout=220)

    rows = metrics(tmp_path / flat["output_dir"])
    assert [r["round"] for r in rows] == list(range(1, flat["comm_round"] + 1))
    for r in rows:
        assert r["strategy"] == flat["strategy"] and r["clients"] == r["distinct_submodels"] == flat["worker_num"]
        assert r["bytes_up"] > 0 and r["rejected"] == 0
    # FedML's own server logged what the PriSM aggregator's test() returned, round by round
    fedml_accs = [float(a) for a in re.findall(r"metric_result_in_current_round = \{'test_acc': ([0-9.]+)", log)]
    assert fedml_accs == pytest.approx([r["test_acc"] for r in rows])
    # it learned: far above chance (10 classes) and lower losses than after the first round
    assert rows[-1]["test_acc"] > 0.5
    assert rows[-1]["test_loss"] < rows[0]["test_loss"] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (tmp_path / flat["output_dir"] / "checkpoint.pt").exists()
    # offline() and the config kept FedML's cloud calls and ./logs away; the import warnings are silenced
    assert not (tmp_path / "logs").exists()
    assert (tmp_path / flat["log_file_dir"]).is_dir()
    assert REQUESTS_WARNING not in log and PKG_RESOURCES_WARNING not in log

    # the same yaml through `fedml-prism run` (sp, which equals its MPI runtime: test_runtimes.py) gives the
    # same model: the args-only objects are the ones `fedml-prism run` builds
    sections = yaml.safe_load(cfg.read_text())
    sections["common_args"]["training_type"], sections["comm_args"]["backend"] = "simulation", "sp"
    sp_cfg = tmp_path / "sp.yaml"
    sp_cfg.write_text(yaml.safe_dump(sections))
    run([str(BIN / "fedml-prism"), "run", "--cf", str(sp_cfg), "--output-dir", str(tmp_path / "sp")], tmp_path,
        "sp.log", timeout=150)
    assert [r["test_acc"] for r in metrics(tmp_path / "sp")] == pytest.approx([r["test_acc"] for r in rows], abs=1e-3)
    native, sp = _dense(tmp_path / flat["output_dir"], flat), _dense(tmp_path / "sp", flat)
    for key in native:
        assert torch.allclose(native[key], sp[key], atol=1e-5), f"fedml_native and fedml-prism run differ at {key}"


def _dense(out_dir: Path, flat: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The dense weights of a run's final checkpoint."""
    state = torch.load(out_dir / "checkpoint.pt", weights_only=True)["server"]
    pm = PrincipalModel(create_model(flat["model"], **flat["model_kwargs"]), PrismConfig.from_mapping(state["config"]))
    pm.load_state_dict(state)
    return pm.dense_state_dict()


# ---------------------------------------------------------------------------------- import warnings
def _stderrs(codes: list[str], tmp_path: Path) -> list[str]:
    """stderr of ``python -c CODE`` for each code, run side by side (each imports FedML: seconds)."""
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env_for(tmp_path), text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for code in codes]
    out = []
    for proc in procs:
        _, err = proc.communicate(timeout=150)
        assert proc.returncode == 0, err
        out.append(err)
    return out


def test_fedml_import_warnings_silenced_at_the_glue_only(tmp_path) -> None:
    bare, glued = _stderrs([
        "import fedml",
        "import warnings\nimport fedml_prism.runtimes.fedml_glue\nwarnings.warn('an unrelated warning', UserWarning)\n",
    ], tmp_path)
    assert REQUESTS_WARNING in bare and PKG_RESOURCES_WARNING in bare, "FedML no longer warns: this test is moot"
    assert REQUESTS_WARNING not in glued and PKG_RESOURCES_WARNING not in glued
    assert "UserWarning: an unrelated warning" in glued
