import pytest
import torch

torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny LLaVA checkpoint on disk, loaded by tests through `from_pretrained`."""
    from vla_peft.models import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)
