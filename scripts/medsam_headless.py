"""Run the headless segmentation script from the source tree.

The script itself is installed with the extension: ``MedSAMSlicer/MedSAMBridgeLib/medsam_headless.py``
(its docstring and docs/slicer.md, "Headless", say how to run it). This wrapper runs that file,
in Slicer (``Slicer --no-main-window --python-script scripts/medsam_headless.py ...``) or in plain
Python with slicer-core (``python scripts/medsam_headless.py ...``), and offers its ``main``,
``run`` and ``build_parser`` to code that loads this file.
"""

import importlib.util
import os
import runpy
import sys

SCRIPT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(globals().get("__file__") or sys.argv[0])),
                                      os.pardir, "MedSAMSlicer", "MedSAMBridgeLib", "medsam_headless.py"))

if __name__ == "__main__":
    runpy.run_path(SCRIPT, run_name="__main__")
else:
    _spec = importlib.util.spec_from_file_location("medsam_headless_installed", SCRIPT)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    main, run, build_parser = _module.main, _module.run, _module.build_parser
