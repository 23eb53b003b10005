"""The synthetic zoo (packager.testing.zoo) that the tests, the README and `make demo` build on."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

# A fresh interpreter (torch warns once per process), every warning shown: build the quantized zoo model as
# build_zoo does (only that recipe, to keep it short) and synthesize a quantized checkpoint for a member.
BUILD = """
import sys, warnings
from pathlib import Path
warnings.simplefilter("always")
from packager.testing import zoo
recipes = zoo._recipes
zoo._recipes = lambda: {k: v for k, v in recipes().items() if "quantized" in k}
zoo.build_zoo(Path(sys.argv[1]) / "zoo")
zoo.synthesize_checkpoint(zoo.ZooShuffleNetV2_QuantizedWeights.IMAGENET10_FBGEMM_V1, Path(sys.argv[1]) / "synth")
print("built")
"""


def test_building_quantized_models_prints_no_torch_warning(tmp_path):
    """`make demo` on a fresh clone starts by building the zoo: no torch UserWarning about quantized tensors."""
    proc = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "built", proc.stderr
    assert "quantized tensor creation functions" not in proc.stderr, proc.stderr
    assert "UserWarning" not in proc.stderr, proc.stderr
