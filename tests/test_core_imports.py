"""The engine never imports FedML."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_without_fedml() -> None:
    code = (
        "import sys, fedml_prism, fedml_prism.cli, fedml_prism.costs, fedml_prism.train, fedml_prism.models\n"
        "from fedml_prism import PrismConfig, PrincipalModel\n"
        "from fedml_prism.models import resnet_tiny\n"
        "pm = PrincipalModel(resnet_tiny(), PrismConfig())\n"
        "pm.aggregate([(pm.sample_submodel(0, 0), 1)])\n"
        "assert 'fedml' not in sys.modules, 'fedml was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
