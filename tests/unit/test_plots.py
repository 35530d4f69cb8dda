"""danlu's plots are drawn on Figures of their own: a process using danlu's Python API (a notebook, a
script with its own figures) keeps its matplotlib backend and its open figures through a run."""

from tests.conftest import train_in_a_fresh_interpreter


def test_a_run_leaves_the_processs_backend_and_figures_as_they_were(tmp_path):
    before = "import matplotlib\nmatplotlib.use('svg')\nimport matplotlib.pyplot as plt\nmine = plt.figure()"
    after = (
        "drawn = sorted(p.name for p in run.path.joinpath('plots').iterdir())\n"
        "print(matplotlib.get_backend(), plt.fignum_exists(mine.number), plt.get_fignums(), *drawn)"
    )
    line = train_in_a_fresh_interpreter(tmp_path, before, after)
    # the backend the process chose, its figure open, no figure of danlu's left in pyplot
    assert line == "svg True [1] confusion_matrix.png learning_curves.png"
