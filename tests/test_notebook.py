"""notebooks/quickstart.ipynb: committed without outputs, and runs end to end in this interpreter.

The notebook runs in a fresh kernel started from `sys.executable` (a kernelspec written to a temp
folder, so no kernelspec needs to be installed and none installed elsewhere is picked up), with
notebooks/ as the working directory, as Jupyter would run it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 300
KERNEL = "pipesched-test-python"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count: clear outputs"
        assert "execution" not in cell.metadata, f"cell {i} has execution timing metadata"


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A kernel of this interpreter (ipykernel is a dev dependency), from a kernelspec of our own."""
    spec_dir = tmp_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "pipesched test kernel", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def _images(cell) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


def _execute(tmp_path: Path, shared: Path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = "import os, sys; print('KERNEL', sys.executable); print('CWD', os.getcwd())"
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the notebook asks for its own devices
    env.setdefault("PIPESCHED_SHARED", str(shared))
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S, allow_errors=False,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=env)  # raises CellExecutionError naming the cell if any cell fails
    return nb


def test_notebook_runs_end_to_end(tmp_path, instances_dir):
    """One test (not several sharing a fixture), so that pytest-xdist runs the notebook once."""
    executed = _execute(tmp_path, instances_dir.parent)
    code = [c for c in executed.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        assert cell.execution_count is not None, f"code cell {i} did not run"
        assert not [o for o in cell.outputs if o.output_type == "error"], f"code cell {i} raised"
    assert "jax_num_cpu_devices" in code[0].source  # before anything starts JAX's backend

    def cell(source: str):
        """The first code cell whose source contains `source`."""
        return next(c for c in code if source in c.source)

    # it ran in this interpreter, in notebooks/, with the two JAX CPU devices the first cell asks for
    assert f"KERNEL {sys.executable}\n" in _text(code[-1])
    assert f"CWD {NOTEBOOK.parent}\n" in _text(code[-1])
    assert "CpuDevice(id=1)" in _text(cell("jax.devices()"))

    everything = "\n".join(_text(c) for c in code)
    for solver in ("greedy", "cpsat", "chain-dp", "eplb", "local-search"):
        assert f"{solver}: objective" in everything
    assert "status optimal" in everything and "status feasible" in everything
    assert "lower bound" in everything and "gap" in everything
    assert "Traceback" not in everything
    # pipeline: CP-SAT proves the optimum of p03; remat: chain-dp proves it on a 10-layer chain
    pipeline = _text(cell("solve_pipeline(pipeline,")).splitlines()
    assert any("cpsat: objective" in line and "status optimal" in line for line in pipeline)
    remat = _text(cell("solve_remat(")).splitlines()
    assert any("chain-dp: objective" in line and "status optimal" in line for line in remat)
    assert any("eplb: objective" in line for line in _text(cell("solve_placement(")).splitlines())
    # figures: two Gantt charts and the placement heat map
    assert _images(cell("gantt(")) == 2
    assert _images(cell("hosting_matrix(")) == 1
    # the executor's gradients equal the single-device reference
    run = _text(cell("profile_instance("))
    assert "mesh {'data': 1, 'pipe': 2} on cpu" in run
    line = next(ln for ln in run.splitlines() if ln.startswith("max |gradient error|"))
    assert float(line.split(":")[1].split()[0]) < 1e-5 and "below 1e-5" in line
