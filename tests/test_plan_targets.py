"""GPU targets, their XLA target protos, facts read from optimized HLO, and one deviceless
compile for eight H100s (skipped where XLA's CUDA compiler plugin is not installed)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from grok.errors import GrokError
from grok.plan import hlo
from grok.plan.targets import (
    GPUS,
    INSTALL_HINT,
    Target,
    compile_devices,
    load_target_config,
    parse_target,
    target_config_text,
    topology,
)

# --- targets -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, name, count", [
    ("h100x8", "h100", 8), ("h200x4", "h200", 4), ("a100-80x8", "a100-80", 8),
    ("a100-40x1", "a100-40", 1), ("H100-PCIEx2", "h100-pcie", 2), ("h100x64", "h100", 64),
])
def test_parse_target(text, name, count):
    target = parse_target(text)
    assert target == Target(GPUS[name], count)
    assert str(target) == f"{name}x{count}"


@pytest.mark.parametrize("text, found", [
    ("h900x8", "found 'h900'"),
    ("h100", "found no GPUxCOUNT form"),
    ("8xh100", "found no GPUxCOUNT form"),
    ("h100x0", "found 0"),
    ("h100x12", "found 12"),  # more than one host of eight, but not whole hosts
    ("h100x2048", "found 2048"),
])
def test_parse_target_rejects(text, found):
    with pytest.raises(GrokError) as caught:
        parse_target(text)
    message = str(caught.value)
    assert "\n" not in message and repr(text) in message and found in message
    assert "expected" in message


def test_unknown_gpu_lists_the_known_ones():
    with pytest.raises(GrokError, match="a100-40, a100-80, h100, h100-pcie, h200"):
        parse_target("b200x8")


def test_gpu_table_holds_reported_memory():
    """CUDA reports a little less than the marketed size (in GiB), never more."""
    marketed_gib = {"h100": 80, "h100-pcie": 80, "h200": 141, "a100-80": 80, "a100-40": 40}
    assert set(GPUS) == set(marketed_gib)
    for name, gpu in GPUS.items():
        assert gpu.name == name and gpu.description.startswith("NVIDIA ")
        assert 0.97 < gpu.memory_bytes / (marketed_gib[name] * 2**30) < 1
    assert GPUS["h100"].memory_bytes == 84_929_347_584
    assert GPUS["h200"].memory_bandwidth == 4_800_000_000_000


def test_gpu_model_is_validated():
    h100 = GPUS["h100"]
    with pytest.raises(GrokError, match="memory_bytes must be a positive integer"):
        dataclasses.replace(h100, memory_bytes=0)
    with pytest.raises(GrokError, match="without 'x'"):
        dataclasses.replace(h100, name="hx")
    with pytest.raises(GrokError, match=r"below 7\.0"):
        dataclasses.replace(h100, compute_capability=(6, 0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        h100.core_count = 1


def test_target_config_text_describes_the_gpu():
    text = target_config_text(GPUS["h100"])
    assert "device_memory_size: 84929347584" in text
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert "core_count: 132" in text and "memory_bandwidth: 3352320000000" in text
    assert text.rstrip().endswith('device_description_str: "NVIDIA H100 80GB HBM3"')
    assert "major: 8 minor: 0" in target_config_text(GPUS["a100-40"])


def test_load_target_config(tmp_path):
    path = tmp_path / "h200.txtpb"
    path.write_text("# a comment\n" + target_config_text(GPUS["h200"]))
    text, description, memory = load_target_config(path)
    assert (description, memory) == ("NVIDIA H200", GPUS["h200"].memory_bytes)
    assert text.startswith("# a comment")


def test_load_target_config_errors(tmp_path):
    with pytest.raises(GrokError, match="does not exist"):
        load_target_config(tmp_path / "missing.txtpb")
    text = target_config_text(GPUS["h100"])
    path = tmp_path / "partial.txtpb"
    # XLA divides by threads_per_warp: a file without it would kill the process.
    path.write_text(text.replace("  threads_per_warp: 32", "  # threads_per_warp: 32"))
    with pytest.raises(GrokError, match=r"missing threads_per_warp$"):
        load_target_config(path)
    path.write_text(text.replace("device_memory_size: 84929347584", "device_memory_size: x"))
    with pytest.raises(GrokError, match="found device_memory_size in another form"):
        load_target_config(path)


def test_topology_puts_eight_gpus_on_a_host():
    assert [topology(n) for n in (1, 2, 8, 16, 64)] == [
        "1x1x1", "1x1x2", "1x1x8", "2x1x8", "8x1x8"]


def test_compile_devices_checks_the_count_first():
    with pytest.raises(GrokError, match="found 12"):
        compile_devices(target_config_text(GPUS["h100"]), 12)


# --- HLO facts on hand-written programs -------------------------------------------------------

# int8 weight converted inside a Triton GEMM fusion, output gathered: nothing materialized.
FUSED = """\
HloModule jit_f, is_scheduled=true, entry_computation_layout={(bf16[16,4096]{1,0}, s8[4096,1024]{1,0})->bf16[16,8192]{1,0}}

%gemm_fusion_dot.1_computation (parameter_0: bf16[16,4096], parameter_1: s8[4096,1024]) -> bf16[16,1024] {
  %parameter_1 = s8[4096,1024]{1,0} parameter(1)
  %convert.3 = bf16[4096,1024]{1,0} convert(%parameter_1), metadata={op_name="jit(f)/convert_element_type"}
  %parameter_0 = bf16[16,4096]{1,0} parameter(0)
  ROOT %dot.3 = bf16[16,1024]{1,0} dot(%parameter_0, %convert.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.0_spmd (param: bf16[16,4096], param.1: s8[4096,1024]) -> bf16[16,8192] {
  %param = bf16[16,4096]{1,0} parameter(0), sharding={replicated}
  %param.1 = s8[4096,1024]{1,0} parameter(1), sharding={devices=[1,8]<=[8]}
  %gemm_fusion_dot.1 = bf16[16,1024]{1,0} fusion(%param, %param.1), kind=kCustom, calls=%gemm_fusion_dot.1_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %all-gather-start = (bf16[16,1024]{1,0}, bf16[16,8192]{1,0}) all-gather-start(%gemm_fusion_dot.1), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={1}
  ROOT %all-gather-done = bf16[16,8192]{1,0} all-gather-done(%all-gather-start)
}
"""  # noqa: E501

# The weight dequantized by a loop fusion (and once more by a bare convert) for cuBLAS.
CUBLAS = """\
HloModule jit_g, is_scheduled=true

%fused_convert (param_0: s8[4096,1024]) -> bf16[4096,1024] {
  %param_0 = s8[4096,1024]{1,0} parameter(0)
  ROOT %convert.1 = bf16[4096,1024]{1,0} convert(%param_0)
}

ENTRY %main (p0: bf16[16,4096], p1: s8[4096,1024]) -> bf16[16,1024] {
  %p0 = bf16[16,4096]{1,0} parameter(0)
  %p1 = s8[4096,1024]{1,0} parameter(1)
  %loop_convert_fusion = bf16[4096,1024]{1,0} fusion(%p1), kind=kLoop, calls=%fused_convert
  %custom-call.1 = (bf16[16,1024]{1,0}, s8[4194304]{0}) custom-call(%p0, %loop_convert_fusion), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1}}
  %convert.2 = f32[1024,4096]{1,0} convert(%p1)
  ROOT %get-tuple-element.1 = bf16[16,1024]{1,0} get-tuple-element(%custom-call.1), index=0
}
"""  # noqa: E501

# A scan over 4 stacked layers: each step copies its layer's int8 slice (a memcpy fusion),
# then reduce-scatters and all-reduces; one all-to-all runs in an async wrapper.
SCAN = """\
HloModule jit_scan, is_scheduled=true

%fused_dynamic_slice (param_0.37: s8[4,4096,1024], param_1.36: s32[]) -> s8[1,4096,1024] {
  %param_0.37 = s8[4,4096,1024]{2,1,0} parameter(0)
  %param_1.36 = s32[] parameter(1)
  %constant_13 = s32[] constant(0)
  %dynamic-slice.5 = s8[1,4096,1024]{2,1,0} dynamic-slice(%param_0.37, %param_1.36, %constant_13, %constant_13), dynamic_slice_sizes={1,4096,1024}
  ROOT %copy.11 = s8[1,4096,1024]{2,1,0} copy(%dynamic-slice.5)
}

%add.clone (x.3: f32[], y.1: f32[]) -> f32[] {
  %x.3 = f32[] parameter(0)
  %y.1 = f32[] parameter(1)
  ROOT %add.4 = f32[] add(%x.3, %y.1)
}

%wrapped_all_to_all (p: bf16[16,1024]) -> bf16[16,1024] {
  %p = bf16[16,1024]{1,0} parameter(0)
  ROOT %all-to-all.1 = bf16[16,1024]{1,0} all-to-all(%p), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
}

%region_0.1_spmd (param: (s32[], bf16[16,1024], s8[4,4096,1024])) -> (s32[], bf16[16,1024], s8[4,4096,1024]) {
  %param = (s32[], bf16[16,1024]{1,0}, /*index=2*/s8[4,4096,1024]{2,1,0}) parameter(0)
  %get-tuple-element.40 = s32[] get-tuple-element(%param), index=0
  %get-tuple-element.41 = bf16[16,1024]{1,0} get-tuple-element(%param), index=1
  %get-tuple-element.48 = s8[4,4096,1024]{2,1,0} get-tuple-element(%param), index=2
  %loop_dynamic_slice_fusion = s8[1,4096,1024]{2,1,0} fusion(%get-tuple-element.48, %get-tuple-element.40), kind=kCustom, calls=%fused_dynamic_slice, backend_config={"fusion_backend_config":{"kind":"__custom_fusion","custom_fusion_config":{"name":"dynamic_slice_fusion"}}}
  %reduce-scatter-start = ((f32[16,8192]{1,0}), f32[16,1024]{1,0}) reduce-scatter-start(%get-tuple-element.41), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={1}, to_apply=%add.clone
  %reduce-scatter-done = f32[16,1024]{1,0} reduce-scatter-done(%reduce-scatter-start)
  %all-reduce-start = f32[16,1024]{1,0} all-reduce-start(%reduce-scatter-done), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add.clone
  %all-reduce-done = f32[16,1024]{1,0} all-reduce-done(%all-reduce-start)
  %async-start = ((bf16[16,1024]{1,0}), bf16[16,1024]{1,0}, s32[]) async-start(%get-tuple-element.41), calls=%wrapped_all_to_all
  %async-done = bf16[16,1024]{1,0} async-done(%async-start), calls=%wrapped_all_to_all
  ROOT %tuple.8 = (s32[], bf16[16,1024]{1,0}, s8[4,4096,1024]{2,1,0}) tuple(%get-tuple-element.40, %async-done, %get-tuple-element.48)
}

%region_1.2_spmd (param.1: (s32[], bf16[16,1024], s8[4,4096,1024])) -> pred[] {
  %param.1 = (s32[], bf16[16,1024]{1,0}, s8[4,4096,1024]{2,1,0}) parameter(0)
  %get-tuple-element.30 = s32[] get-tuple-element(%param.1), index=0
  %constant.2 = s32[] constant(4)
  ROOT %compare.1 = pred[] compare(%get-tuple-element.30, %constant.2), direction=LT
}

ENTRY %main.3_spmd (param.2: bf16[16,1024], param.3: s8[4,4096,1024]) -> bf16[16,1024] {
  %param.2 = bf16[16,1024]{1,0} parameter(0), sharding={replicated}
  %param.3 = s8[4,4096,1024]{2,1,0} parameter(1), sharding={devices=[1,1,8]<=[8]}
  %constant_26 = s32[] constant(0)
  %tuple.6 = (s32[], bf16[16,1024]{1,0}, s8[4,4096,1024]{2,1,0}) tuple(%constant_26, %param.2, %param.3)
  %while.3 = (s32[], bf16[16,1024]{1,0}, s8[4,4096,1024]{2,1,0}) while(%tuple.6), condition=%region_1.2_spmd, body=%region_0.1_spmd
  %all-gather-start = (bf16[16,1024]{1,0}, bf16[16,8192]{1,0}) all-gather-start(%param.2), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={1}
  %all-gather-done = bf16[16,8192]{1,0} all-gather-done(%all-gather-start)
  ROOT %get-tuple-element.33 = bf16[16,1024]{1,0} get-tuple-element(%while.3), index=1
}
"""  # noqa: E501

NONE = dict.fromkeys(hlo.COLLECTIVES, 0)


def test_collectives_count_async_pairs_once():
    assert hlo.collectives(FUSED) == {**NONE, "all-gather": 1}
    assert hlo.collectives(CUBLAS) == NONE


def test_collectives_per_layer_of_a_scan():
    assert hlo.loop_bodies(SCAN) == ["region_0.1_spmd"]
    assert hlo.loop_bodies(FUSED) == []
    per_layer = {**NONE, "all-reduce": 1, "reduce-scatter": 1, "all-to-all": 1}
    assert hlo.collectives(SCAN, "region_0.1_spmd") == per_layer
    assert hlo.collectives(SCAN) == {**per_layer, "all-gather": 1}
    assert hlo.collectives_by_computation(SCAN) == {
        "region_0.1_spmd": per_layer, "main.3_spmd": {**NONE, "all-gather": 1}}
    with pytest.raises(ValueError, match="no computation 'nope'"):
        hlo.collectives(SCAN, "nope")


def test_parse_reads_tuple_types_and_callees():
    body = hlo.parse(SCAN)["region_0.1_spmd"]
    param = body.instructions[0]
    assert param.opcode == "parameter"
    assert param.arrays == (("s32", ()), ("bf16", (16, 1024)), ("s8", (4, 4096, 1024)))
    fusion = next(i for i in body.instructions if i.name == "loop_dynamic_slice_fusion")
    assert (fusion.kind, fusion.called("calls")) == ("kCustom", ["fused_dynamic_slice"])
    assert hlo.parse(SCAN)["main.3_spmd"].entry


def test_materialized_weights():
    assert hlo.materialized_weights(FUSED, [(4096, 1024)]) == []
    assert hlo.materialized_weights(CUBLAS, [(4096, 1024)]) == [
        "main: %loop_convert_fusion = bf16[4096,1024] fusion kLoop",
        "main: %convert.2 = f32[1024,4096] convert",  # transposed, still the weight
    ]
    assert hlo.materialized_weights(CUBLAS, [(4096, 512)]) == []
    copied = ["region_0.1_spmd: %loop_dynamic_slice_fusion = s8[1,4096,1024] fusion kCustom"]
    assert hlo.materialized_weights(SCAN, [(4, 4096, 1024)]) == copied
    assert hlo.materialized_weights(SCAN, [(4096, 1024)]) == copied


# --- a deviceless compile -------------------------------------------------------------------


def _h100s(count: int) -> list:
    try:
        return compile_devices(target_config_text(GPUS["h100"]), count)
    except GrokError as e:
        if INSTALL_HINT in str(e):  # no CUDA compiler plugin here
            pytest.skip(str(e))
        raise


def _int8_matmul(scale_first: bool):
    def matmul(x, w, scale):
        if scale_first:  # dequantize, then multiply: the scale stops the convert's fusion
            return jnp.dot(x, w.astype(jnp.bfloat16) * scale)
        product = jnp.dot(x, w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return (product * scale.astype(jnp.float32)).astype(jnp.bfloat16)
    return matmul


def test_deviceless_compile_for_eight_h100s():
    """A matmul with its int8 weight split over `model` compiles to sm_90 code on eight
    compile-only H100s; the tests' own CPU devices stay the default."""
    devices = _h100s(8)
    assert len(devices) == 8 and {d.device_kind for d in devices} == {"NVIDIA H100 80GB HBM3"}
    assert _h100s(8) == devices  # cached per (target, count)
    mesh = Mesh(np.array(devices).reshape(1, 8), ("data", "model"))
    batch, d_in, d_out = 32, 1024, 4096
    args = (jax.ShapeDtypeStruct((batch, d_in), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
            jax.ShapeDtypeStruct((d_in, d_out), jnp.int8,
                                 sharding=NamedSharding(mesh, P(None, "model"))),
            jax.ShapeDtypeStruct((1, d_out), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(None, "model"))))
    shard = (d_in, d_out // 8)

    compiled = jax.jit(_int8_matmul(False), out_shardings=NamedSharding(mesh, P())).lower(
        *args).compile()
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes == batch * d_in * 2 + d_in * d_out // 8 + d_out // 8 * 2
    assert memory.output_size_in_bytes == batch * d_out * 2
    assert memory.temp_size_in_bytes < d_in * d_out // 8 * 2  # less than a bf16 weight shard
    text = compiled.as_text()
    assert hlo.materialized_weights(text, [shard]) == []
    assert hlo.collectives(text)["all-gather"] >= 1  # the replicated output gathers its columns

    scaled_first = jax.jit(_int8_matmul(True), out_shardings=NamedSharding(mesh, P())).lower(
        *args).compile().as_text()
    assert any("bf16[1024,512]" in m for m in hlo.materialized_weights(scaled_first, [shard]))
    assert jax.devices()[0].platform == "cpu"
