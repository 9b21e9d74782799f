"""The hardware targets, defined once: what distinguishes a B70 workstation from a
Lunar Lake laptop for building, installing and checking the stack."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType


class MemoryModel(str, Enum):
    DISCRETE = "discrete"  # own VRAM per card
    UNIFIED = "unified"  # iGPU sharing system memory with the CPU


@dataclass(frozen=True)
class Platform:
    name: str
    product: str
    gpu_codename: str  # what torch.xpu / sycl-ls report, e.g. "BMG-G31", "LNL"
    ip_version: str  # Intel GPU IP version found in device-code ELF notes
    device_name_patterns: tuple[str, ...]  # substrings of torch.xpu.get_device_name()
    memory_model: MemoryModel
    memory_gb_per_device: int
    device_count: int
    tensor_parallel: int
    build_max_jobs: int  # default compile jobs; capped by free memory at build time
    distro: str  # fresh-host distribution the install script targets
    environment: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "product": self.product,
            "gpu_codename": self.gpu_codename,
            "ip_version": self.ip_version,
            "memory_model": self.memory_model.value,
            "memory_gb_per_device": self.memory_gb_per_device,
            "device_count": self.device_count,
            "tensor_parallel": self.tensor_parallel,
            "build_max_jobs": self.build_max_jobs,
            "distro": self.distro,
            "environment": dict(self.environment),
        }


B70 = Platform(
    name="b70",
    product="Intel Arc Pro B70 (Battlemage)",
    gpu_codename="BMG-G31",
    ip_version="20.2.0",
    device_name_patterns=("Arc(TM) Pro B70", "Arc Pro B70", "BMG-G31", "0xe223"),
    memory_model=MemoryModel.DISCRETE,
    memory_gb_per_device=32,
    device_count=4,
    tensor_parallel=4,
    build_max_jobs=16,
    distro="ubuntu-24.04",
    environment=MappingProxyType({}),
    notes="4 discrete cards, tensor parallel 4",
)

LUNAR_LAKE = Platform(
    name="lunar-lake",
    product="Intel Core Ultra (Lunar Lake), Arc 140V Xe2 iGPU",
    gpu_codename="LNL",
    ip_version="20.4.0",
    device_name_patterns=("Arc(TM) 140V", "Arc 140V", "LNL", "Lunar Lake", "0x64a0"),
    memory_model=MemoryModel.UNIFIED,
    memory_gb_per_device=32,
    device_count=1,
    tensor_parallel=1,
    build_max_jobs=4,
    distro="fedora",
    # A single iGPU has no peer to talk to over Level Zero; oneCCL must use TCP.
    environment=MappingProxyType(
        {
            "CCL_ZE_ENABLE": "0",
            "CCL_ATL_TRANSPORT": "ofi",
            "FI_PROVIDER": "tcp",
            "VLLM_XPU_UNIFIED_MEMORY": "1",
        }
    ),
    notes="32 GB shared with the CPU; the device free-memory query under-reports",
)

PLATFORMS: Mapping[str, Platform] = MappingProxyType({p.name: p for p in (B70, LUNAR_LAKE)})

# Intel GPU IP versions as they appear in device-code ELF notes of kernel wheels.
KNOWN_IP_VERSIONS: Mapping[str, str] = MappingProxyType(
    {
        "20.1.0": "BMG-G21",
        "20.2.0": "BMG-G31",
        "20.4.0": "LNL",
        "12.60.7": "PVC",
    }
)


def get_platform(name: str) -> Platform:
    try:
        return PLATFORMS[name]
    except KeyError:
        raise KeyError(name) from None
