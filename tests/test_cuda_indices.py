"""Every torch.cuda call that takes a device gets an explicit index, checked on CPU.

torch refuses `torch.device("cuda")` (no index) in set_per_process_memory_fraction, which crashed
every GPU run before its first step while the CPU suite was green. Here torch.cuda is replaced
by strict fakes that refuse an un-indexed (or missing) device the way torch does, so the budget,
peak-memory, cleanup, environment and clean.sh entry points are exercised as on a GPU.
"""
import pytest
import torch

ERROR = "Expected a torch.device with a specified index or an integer, but got:{}"


class StrictCuda:
    """The torch.cuda functions this project calls, on one fake 8 GiB GPU, refusing un-indexed devices."""

    def __init__(self):
        self.calls = []
        self.fraction = None
        self.peak_reset = 0
        self.emptied = 0

    def index(self, name, device):
        if isinstance(device, int):
            idx = device
        elif isinstance(device, torch.device) and device.type == "cuda" and device.index is not None:
            idx = device.index
        else:
            raise ValueError(f"{name}: " + ERROR.format(device))
        if idx != 0:
            raise AssertionError(f"{name}: device {idx} does not exist")
        self.calls.append(name)
        return idx

    def install(self, monkeypatch):
        c = torch.cuda
        props = type("Props", (), {"total_memory": 8 * 1024 ** 3, "name": "Fake GPU", "major": 8, "minor": 0})()
        monkeypatch.setattr(c, "is_available", lambda: True)
        monkeypatch.setattr(c, "device_count", lambda: 1)
        monkeypatch.setattr(c, "current_device", lambda: 0)
        monkeypatch.setattr(c, "set_device", lambda d: self.index("set_device", d))
        monkeypatch.setattr(c, "get_device_properties", lambda d: (self.index("get_device_properties", d), props)[1])
        monkeypatch.setattr(c, "get_device_name", lambda d: (self.index("get_device_name", d), "Fake GPU")[1])

        def fraction(f, d):
            self.index("set_per_process_memory_fraction", d)
            self.fraction = f
        monkeypatch.setattr(c, "set_per_process_memory_fraction", fraction)

        def reset(d):
            self.index("reset_peak_memory_stats", d)
            self.peak_reset += 1
        monkeypatch.setattr(c, "reset_peak_memory_stats", reset)
        monkeypatch.setattr(c, "synchronize", lambda d: self.index("synchronize", d))
        monkeypatch.setattr(c, "max_memory_reserved", lambda d: (self.index("max_memory_reserved", d), 3 * 2**20)[1])
        monkeypatch.setattr(c, "max_memory_allocated", lambda d: (self.index("max_memory_allocated", d), 2**20)[1])
        monkeypatch.setattr(c, "memory_reserved", lambda d: (self.index("memory_reserved", d), 2 * 2**20)[1])
        monkeypatch.setattr(c, "memory_allocated", lambda d: (self.index("memory_allocated", d), 2**20)[1])
        monkeypatch.setattr(c, "mem_get_info", lambda d: (self.index("mem_get_info", d), (6 * 1024 ** 3, 8 * 1024 ** 3))[1])
        monkeypatch.setattr(c, "memory_stats", lambda d: (self.index("memory_stats", d), {"num_alloc_retries": 5})[1])
        monkeypatch.setattr(c, "list_gpu_processes", lambda d: (self.index("list_gpu_processes", d), "GPU:0\nno processes are running")[1])

        def empty():
            self.emptied += 1
        monkeypatch.setattr(c, "empty_cache", empty)
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)  # the real one loads cuDNN's 800 MB
        return self


@pytest.fixture
def fake_cuda(monkeypatch):
    return StrictCuda().install(monkeypatch)


def test_fakes_refuse_an_unindexed_device_like_torch(fake_cuda):
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda"))
    torch.cuda.set_per_process_memory_fraction(0.5, 0)


@pytest.mark.parametrize("name", ["auto", "cuda", "cuda:0"])
def test_device_is_resolved_once_to_an_index(fake_cuda, name):
    from src.utils.devices import resolve_device
    assert resolve_device(name) == torch.device("cuda", 0)
    assert "set_device" in fake_cuda.calls


def test_bad_cuda_index_is_a_config_error(fake_cuda):
    from src.utils.devices import resolve_device
    from src.utils.errors import ConfigError
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("device", [torch.device("cuda"), torch.device("cuda", 0), "cuda"])
def test_vram_budget_passes_an_index(fake_cuda, device):
    """The call that crashed every GPU run: an un-indexed device must still be capped."""
    from src.distillation.planner import apply_vram_budget
    info = apply_vram_budget(torch.device(device), 6.0)
    assert info["capped"] and fake_cuda.fraction == pytest.approx(6 / 8)
    assert info["device"] == "cuda:0"


def test_peak_memory_guard_uses_the_index_and_reports_peak_reserved(fake_cuda):
    from src.utils.training_guards import peak_memory_mb, reset_peak_memory_stats
    for device in (None, torch.device("cuda"), torch.device("cuda", 0)):
        assert reset_peak_memory_stats(device) is True
        assert peak_memory_mb(device) == pytest.approx(3.0)  # max_memory_reserved, not allocated
    assert fake_cuda.peak_reset == 3 and fake_cuda.emptied == 3  # cache emptied before each new window


def test_cleanup_measures_on_the_model_device(fake_cuda):
    from src.utils.training_guards import cleanup_training_state
    report = cleanup_training_state(model=torch.nn.Linear(4, 4), verbose=True, device=torch.device("cuda"))
    assert report["cuda"] and report["reserved_mb_after"] == pytest.approx(2.0)
    assert "memory_reserved" in fake_cuda.calls


def test_environment_record_names_the_training_gpu(fake_cuda):
    from src.utils.environment import gpu_info
    info = gpu_info(torch.device("cuda"))
    assert info["name"] == "Fake GPU" and info["index"] == 0


def test_clean_reports_every_gpu_with_indices(fake_cuda, capsys):
    from src.runs.clean import main
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "GPU 0 (Fake GPU)" in out and "mem_get_info" in fake_cuda.calls


def test_allocator_retries_are_read_with_the_index(fake_cuda):
    from src.utils.devices import alloc_retries
    for device in (None, torch.device("cuda"), torch.device("cuda", 0)):
        assert alloc_retries(device) == 5
    assert alloc_retries(torch.device("cpu")) == 0
