"""GPU targets to compile for without the GPUs: their facts, and XLA's compile-only devices.

XLA's CUDA plugin compiles for a GPU it is told about in a `GpuTargetConfig` text proto, so a
machine with no GPU produces the same sm_80/sm_90 programs and the same memory figures that
the real machine would. A target is a GPU model and a count (`h100x8`); `compile_devices`
turns it into devices that a `jax.sharding.Mesh` accepts and `jit(...).lower(...).compile()`
compiles for, but that never run anything.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import jax
from jax.experimental import topologies

from grok.errors import GrokError

INSTALL_HINT = 'pip install -e ".[plan]"'

GPUS_PER_HOST = 8  # HGX and DGX boards, and most PCIe servers, hold eight
MAX_GPUS = 1024


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """One GPU model as CUDA reports it: what XLA needs to compile for it, and its memory."""

    name: str  # the short name targets use: "h100"
    description: str  # the device name CUDA reports, JAX's `device_kind`
    memory_bytes: int  # total memory CUDA reports (a little under the marketed size)
    memory_bandwidth: int  # bytes per second
    core_count: int  # streaming multiprocessors
    compute_capability: tuple[int, int]
    clock_ghz: float  # boost clock
    l2_cache_bytes: int
    shared_memory_per_core: int  # bytes per multiprocessor
    shared_memory_per_block_optin: int  # the most one block may ask for
    fpus_per_core: int  # fp32 lanes per multiprocessor

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9-]*", self.name) or "x" in self.name:
            raise GrokError(f"GPU name {self.name!r}: expected lower-case letters, digits "
                            f"and '-' without 'x' (the count separator)")
        for field in ("memory_bytes", "memory_bandwidth", "core_count", "l2_cache_bytes",
                      "shared_memory_per_core", "shared_memory_per_block_optin",
                      "fpus_per_core"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GrokError(f"GPU {self.name}: {field} must be a positive integer, "
                                f"got {value!r}")
        major, minor = self.compute_capability
        if major < 7 or minor < 0:
            raise GrokError(f"GPU {self.name}: compute capability {major}.{minor} is below "
                            f"7.0, the oldest XLA compiles for")
        if not self.clock_ghz > 0:
            raise GrokError(f"GPU {self.name}: clock_ghz must be positive, got "
                            f"{self.clock_ghz!r}")


# Figures: NVIDIA's datasheets for bandwidth, SMs, clocks and L2; the per-SM limits and the
# memory totals are what CUDA reports, as recorded in XLA's target specs
# (openxla/xla, xla/backends/gpu/target_config/specs/*.txtpb, taken from real devices)
# unless a comment says otherwise. Reported totals move by up to ~100 MiB between driver
# versions; where sources differ the smallest is kept, so a plan that fits here fits there.
GPUS: dict[str, GpuModel] = {gpu.name: gpu for gpu in (
    # H100 SXM5 80GB: 3.35 TB/s, 132 SMs at 1.98 GHz, 50 MiB L2 (datasheet; h100_sxm.txtpb).
    # 84929347584 B is the total in the H100 target config of jax-ml/jax#28376;
    # h100_sxm.txtpb has 84942979072 from another driver.
    GpuModel("h100", "NVIDIA H100 80GB HBM3", 84_929_347_584, 3_352_320_000_000, 132,
             (9, 0), 1.98, 52_428_800, 233_472, 232_448, 128),
    # H100 PCIe 80GB: 2.0 TB/s, 114 SMs at 1.755 GHz, 50 MiB L2 (datasheet; h100_pcie.txtpb).
    GpuModel("h100-pcie", "NVIDIA H100 PCIe", 84_942_979_072, 2_039_040_000_000, 114,
             (9, 0), 1.755, 52_428_800, 233_472, 232_448, 128),
    # H200 SXM 141GB: the H100's chip with 4.8 TB/s HBM3e (datasheet; h200.txtpb). Name,
    # total and L2 as PyTorch prints CUDA's properties ('NVIDIA H200', total_memory=143156MB,
    # L2_cache_size=60MB; MiB, rounded down). nvidia-smi shows 143771 MiB, which counts memory
    # the driver keeps; older drivers name it "NVIDIA H200 141GB HBM3e".
    GpuModel("h200", "NVIDIA H200", 143_156 * 2**20, 4_800_000_000_000, 132,
             (9, 0), 1.98, 60 * 2**20, 233_472, 232_448, 128),
    # A100 SXM4 80GB: 2.039 TB/s, 108 SMs at 1.41 GHz, 40 MiB L2 (datasheet; a100_sxm_80.txtpb).
    GpuModel("a100-80", "NVIDIA A100-SXM4-80GB", 85_100_068_864, 2_039_040_000_000, 108,
             (8, 0), 1.41, 41_943_040, 167_936, 166_912, 64),
    # A100 SXM4 40GB: 1.555 TB/s (datasheet; a100_sxm_40.txtpb, whose device string records
    # 42298834944 B, the smallest of the totals it and deviceQuery print).
    GpuModel("a100-40", "NVIDIA A100-SXM4-40GB", 42_298_834_944, 1_555_200_000_000, 108,
             (8, 0), 1.41, 41_943_040, 167_936, 166_912, 64),
)}


@dataclasses.dataclass(frozen=True)
class Target:
    """`count` GPUs of one model: up to 8 on one host, or whole hosts of 8."""

    gpu: GpuModel
    count: int

    def __post_init__(self):
        check_count(self.count, f"target '{self.gpu.name}x{self.count}'")

    def __str__(self) -> str:
        return f"{self.gpu.name}x{self.count}"


def check_count(count: int, what: str) -> None:
    """Raises GrokError unless `count` GPUs fit one host or whole hosts (see `topology`)."""
    if (not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_GPUS
            or (count > GPUS_PER_HOST and count % GPUS_PER_HOST)):
        raise GrokError(f"{what}: expected a GPU count of 1 to {GPUS_PER_HOST} on one host, "
                        f"or a multiple of {GPUS_PER_HOST} up to {MAX_GPUS} (whole hosts), "
                        f"found {count!r}")


def parse_target(text: str) -> Target:
    """`h100x8` -> Target(GPUS["h100"], 8); names are those of GPUS, case-insensitive."""
    known = ", ".join(sorted(GPUS))
    match = re.fullmatch(r"\s*([a-z0-9-]+)x(\d+)\s*", str(text).lower())
    if match is None:
        raise GrokError(f"target {text!r}: expected GPUxCOUNT such as h100x8, GPU one of "
                        f"{known}; found no GPUxCOUNT form")
    name, count = match.group(1), int(match.group(2))
    if name not in GPUS:
        raise GrokError(f"target {text!r}: expected a GPU among {known}, found {name!r}")
    return Target(GPUS[name], count)


# Limits every CUDA GPU from compute capability 7.0 on shares (CUDA programming guide,
# "Compute Capabilities" table), written once instead of per model.
_COMMON_LIMITS = {
    "threads_per_block_limit": 1024,
    "threads_per_warp": 32,
    "shared_memory_per_block": 49152,
    "threads_per_core_limit": 2048,
    "block_dim_limit_x": 2_147_483_647,
    "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535,
    "registers_per_core_limit": 65536,
    "registers_per_block_limit": 65536,
}

# The CUDA and cuDNN versions of the jax-cuda12-plugin builds this was written against.
_RUNTIME_VERSION = (12, 9)
_DNN_VERSION = (9, 8)


def target_config_text(gpu: GpuModel) -> str:
    """The `GpuTargetConfig` text proto XLA compiles `gpu`'s programs from."""
    major, minor = gpu.compute_capability
    fields = {
        **_COMMON_LIMITS,
        "shared_memory_per_core": gpu.shared_memory_per_core,
        "shared_memory_per_block_optin": gpu.shared_memory_per_block_optin,
        "core_count": gpu.core_count,
        "fpus_per_core": gpu.fpus_per_core,
        "memory_bandwidth": gpu.memory_bandwidth,
        "l2_cache_size": gpu.l2_cache_bytes,
        "clock_rate_ghz": gpu.clock_ghz,
        "device_memory_size": gpu.memory_bytes,
    }
    lines = ["gpu_device_info {"]
    lines += [f"  {key}: {value}" for key, value in fields.items()]
    lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "}",
              'platform_name: "CUDA"',
              f"runtime_version {{ major: {_RUNTIME_VERSION[0]} minor: {_RUNTIME_VERSION[1]} }}",
              f"dnn_version_info {{ major: {_DNN_VERSION[0]} minor: {_DNN_VERSION[1]} }}",
              f"device_description_str: {_quote(gpu.description)}"]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class TargetConfig(NamedTuple):
    """A target proto read from a file, with the two facts a plan reports from it."""

    text: str
    description: str
    memory_bytes: int


# Fields without which XLA's compiler fails or kills the process (a division by zero when
# threads_per_warp or block_dim_limit_x is missing), checked before it sees the file.
_REQUIRED_FIELDS = ("threads_per_warp", "block_dim_limit_x", "shared_memory_per_block_optin",
                    "core_count", "cuda_compute_capability", "device_memory_size",
                    "device_description_str")


def load_target_config(path: str | os.PathLike) -> TargetConfig:
    """Reads a `GpuTargetConfig` text proto (XLA's specs, or one written for another GPU)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GrokError(f"target config {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GrokError(f"target config {str(path)!r} cannot be read as text: {e}") from None
    body = re.sub(r"^\s*#.*$", "", text, flags=re.M)
    missing = [name for name in _REQUIRED_FIELDS if not re.search(rf"\b{name}\s*[:{{]", body)]
    if missing:
        raise GrokError(f"target config {str(path)!r}: expected a GpuTargetConfig text proto "
                        f"with {', '.join(_REQUIRED_FIELDS)}; missing {', '.join(missing)}")
    memory = re.search(r"\bdevice_memory_size\s*:\s*(\d+)\b", body)
    description = re.search(r'\bdevice_description_str\s*:\s*"((?:[^"\\]|\\.)*)"', body)
    if memory is None or description is None:
        found = [name for name, value in (("device_memory_size", memory),
                                          ("device_description_str", description))
                 if value is None]
        raise GrokError(f"target config {str(path)!r}: expected device_memory_size as an "
                        f"integer and device_description_str as a quoted string; found "
                        f"{' and '.join(found)} in another form")
    return TargetConfig(text, re.sub(r"\\(.)", r"\1", description.group(1)),
                        int(memory.group(1)))


def topology(count: int) -> str:
    """XLA's topology string, `<partitions>x<hosts per partition>x<devices per host>`: up to
    eight GPUs share one host; beyond, each host of eight is its own NVLink partition."""
    if count <= GPUS_PER_HOST:
        return f"1x1x{count}"
    return f"{count // GPUS_PER_HOST}x1x{GPUS_PER_HOST}"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def _missing_compiler() -> list[str]:
    """The pip packages GPU compilation needs that are not installed."""
    missing = []
    if not (_installed("jax_plugins.xla_cuda12") or _installed("jax_plugins.xla_cuda13")):
        missing.append("jax-cuda12-plugin (XLA's CUDA compiler)")
    if not _installed("nvidia.cuda_nvcc") and shutil.which("ptxas") is None:
        missing.append("nvidia-cuda-nvcc-cu12 (ptxas)")
    return missing


def compile_devices(target_text: str, count: int) -> list[jax.Device]:
    """`count` compile-only GPUs described by `target_text`, to build a mesh over.

    The CUDA plugin only starts next to a real GPU unless JAX's platforms are chosen
    explicitly, so when they are not, this process's JAX is set to run on CPU (its own
    devices; the GPUs here only compile). JAX's persistent compilation cache cannot load
    programs for such devices: leave it off in the process that plans.
    """
    check_count(count, "compile devices")
    if missing := _missing_compiler():
        raise GrokError(f"GPU targets need the CUDA compiler plugin: {INSTALL_HINT} "
                        f"(missing: {'; '.join(missing)})")
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    return list(_topology_devices(target_text, topology(count)))


@functools.cache
def _topology_devices(target_text: str, name: str) -> tuple[jax.Device, ...]:
    try:
        described = topologies.get_topology_desc(platform="cuda", target_config=target_text,
                                                 topology=name)
    except NotImplementedError:
        raise GrokError("GPU targets need the CUDA plugin, which did not start: JAX's "
                        "backends started with no GPU and JAX_PLATFORMS unset; set "
                        "JAX_PLATFORMS=cpu before the first JAX call, or plan in a process "
                        "of its own") from None
    except jax.errors.JaxRuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GrokError(f"XLA rejected the GPU target config: {first}") from None
    return tuple(described.devices)
