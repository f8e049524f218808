"""Run the headless segmentation script from the source tree.

The script itself is installed with the extension: ``MedSAMSlicer/MedSAMBridgeLib/medsam_headless.py``
(its docstring and docs/slicer.md, "Headless", say how to run it). This wrapper runs that file,
in Slicer (``Slicer --no-main-window --python-script scripts/medsam_headless.py ...``) or in plain
Python with slicer-core (``python scripts/medsam_headless.py ...``).
"""

import os
import runpy
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(globals().get("__file__") or sys.argv[0])), os.pardir,
                      "MedSAMSlicer", "MedSAMBridgeLib", "medsam_headless.py")

if __name__ == "__main__":
    runpy.run_path(os.path.abspath(SCRIPT), run_name="__main__")
