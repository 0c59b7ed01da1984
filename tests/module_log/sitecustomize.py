"""Imported at start-up by every Python process whose PYTHONPATH holds this folder (tests/test_dvc.py
sets it for `dvc repro`): a `transdnn` process appends its arguments and the transdnn modules it
loaded to $TRANSDNN_MODULE_LOG when it exits."""

import atexit
import json
import os
import sys


def _record() -> None:
    modules = sorted(m.removeprefix("transdnn.") for m in sys.modules if m.startswith("transdnn."))
    with open(os.environ["TRANSDNN_MODULE_LOG"], "a") as log:
        log.write(json.dumps({"argv": sys.argv[1:], "modules": modules}) + "\n")


if os.environ.get("TRANSDNN_MODULE_LOG") and os.path.basename(sys.argv[0] if sys.argv else "") == "transdnn":
    atexit.register(_record)
