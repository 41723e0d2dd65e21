import os

# The tiny models here are too small for a second thread to pay: on this 2-core
# machine under similar load the suite took 215 s on one thread against 496 s on two.
# Subprocesses (server, torchrun) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny LLaVA checkpoint on disk, loaded by tests through `from_pretrained`."""
    from vla_peft.models import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="module")
def bank_dir(tiny_llava_dir, tmp_path_factory):
    """A folder of three task bundles on the tiny LLaVA (the serve tests' bank)."""
    from serve_synth import write_bank

    return write_bank(tiny_llava_dir, tmp_path_factory.mktemp("bank"))


@pytest.fixture(scope="module")
def bank(bank_dir):
    from vla_peft.serve.server import load_bank

    return load_bank(bank_dir)
