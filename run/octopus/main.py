"""Octopus (FedML cross-silo deployment) entry point for a PriSM job.

Octopus starts every party as ``python main.py --cf fedml_config.yaml --rank R --role server|client
--run_id ID``; this hands those arguments to ``fedml-prism run``. Build the packages with
``bash run/octopus/build.sh``.
"""

import sys

from fedml_prism.tools.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
