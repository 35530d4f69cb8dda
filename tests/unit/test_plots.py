"""danlu's plots are drawn on Figures of their own: a process using danlu's Python API (a notebook, a
script with its own figures) keeps its matplotlib backend and its open figures through a run."""

import subprocess
import sys

import numpy as np
import pandas as pd


def test_a_run_leaves_the_processs_backend_and_figures_as_they_were(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    pd.DataFrame({"x": x, "label": np.where(x > 0, "up", "down")}).to_csv(tmp_path / "t.csv", index=False)
    code = (
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "import matplotlib.pyplot as plt\n"
        "mine = plt.figure()\n"
        "import danlu\n"
        f"args = ['data.train={tmp_path / 't.csv'}', 'data.target=label', 'train.epochs=2']\n"
        f"run = danlu.train(None, args, out={str(tmp_path / 'run')!r}, progress=False)\n"
        "drawn = sorted(p.name for p in run.path.joinpath('plots').iterdir())\n"
        "print(matplotlib.get_backend(), plt.fignum_exists(mine.number), plt.get_fignums(), *drawn)\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    backend, kept, *rest = ran.stdout.strip().splitlines()[-1].split(" ")
    assert (backend, kept) == ("svg", "True")
    assert " ".join(rest) == "[1] confusion_matrix.png learning_curves.png"  # no figure of danlu's left
