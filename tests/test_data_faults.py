"""Faults in demonstration files: non-finite values are named where they are read, and the
temporary file of a killed writer is removed by the next write."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from data_synth import write_synthetic

from vla_peft.data import DataConfig, DemoDataset, DemoFileError


@pytest.mark.parametrize("key, value", [("actions", np.nan), ("obs/ee_pos", np.inf)])
def test_nan_or_inf_in_a_demo_is_named_when_the_file_is_read(tmp_path, key, value):
    path = tmp_path / "demos.hdf5"
    write_synthetic(path, lengths=(5, 9, 3))
    with h5py.File(path, "r+") as f:
        f[f"data/demo_1/{key}"][4, 0] = value
    with pytest.raises(DemoFileError, match=rf"demos\.hdf5: demo_1 key '{key}' holds NaN or inf \(first at row 4\)"):
        DemoDataset(DataConfig(paths=[str(path)], cameras=["agentview"]))


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_writers_partial_file_is_removed_by_the_next_write(tmp_path, capsys):
    out = tmp_path / "demos.hdf5"
    stale = tmp_path / f".demos.hdf5.partial-{dead_pid()}"
    stale.write_bytes(b"half an HDF5 file")
    live = tmp_path / f".demos.hdf5.partial-{os.getppid()}"  # a writer still running: left alone
    live.write_bytes(b"being written")
    other = tmp_path / f".other.hdf5.partial-{dead_pid()}"  # another file's: not ours to touch
    other.write_bytes(b"x")
    write_synthetic(out, lengths=(3,))
    assert not stale.exists() and live.exists() and other.exists()
    assert f"removed {stale}, left by a killed write" in capsys.readouterr().err
    from vla_peft.data.hdf5 import remove_stale_partials

    assert remove_stale_partials(out) == []
