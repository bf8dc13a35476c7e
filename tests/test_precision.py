"""Precision chosen for the machine: `auto` resolves to bf16 only with native bf16 instructions, and the resolved
precision is what a trained model's metrics.json records."""

import json
import os
import subprocess
import sys

import pytest
import torch

import arrag.precision as precision
from arrag.precision import resolve_precision

NATIVE = {"avx512_bf16": True, "amx_bf16": True, "avx2": True}
AVX2_ONLY = {"avx512_bf16": False, "amx_bf16": False, "avx2": True}


@pytest.fixture
def cpu(monkeypatch):
    """Set what torch reports of the CPU: cpuinfo flags, the kernel level and the oneDNN cap."""

    def set_cpu(flags: dict, capability: str = "AVX512", onednn: str | None = None):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: flags)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        if onednn is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", onednn)

    return set_cpu


def test_explicit_precisions_are_kept_and_unknown_ones_refused():
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="precision 'fp16' is not one of auto, fp32, bf16"):
        resolve_precision("fp16")


@pytest.mark.parametrize(
    ("flags", "capability", "onednn", "expected"),
    [
        (NATIVE, "AVX512", None, "bf16"),  # Sapphire Rapids
        ({**NATIVE, "avx512_bf16": False}, "AVX512", None, "bf16"),  # AMX-BF16 alone is native too
        (AVX2_ONLY, "AVX2", None, "fp32"),  # AMD EPYC Zen 3
        ({**AVX2_ONLY, "avx512_f": True}, "AVX512", None, "fp32"),  # AVX512 without BF16 (Skylake-X)
        (NATIVE, "AVX2", None, "fp32"),  # ATEN_CPU_CAPABILITY=avx2
        (NATIVE, "AVX512", "AVX2", "fp32"),  # ONEDNN_MAX_CPU_ISA=AVX2
        (NATIVE, "AVX512", "avx512_core_amx", "bf16"),  # a cap above bf16 keeps it
    ],
)
def test_auto_on_the_cpu_is_bf16_only_with_native_instructions(cpu, flags, capability, onednn, expected):
    cpu(flags, capability, onednn)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32"


def test_the_avx2_emulation_resolves_auto_to_fp32_in_a_real_process():
    """`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` (the README's emulated AVX2-only CPU) gives fp32 whatever
    this CPU has."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = ("import torch, arrag.precision as p; "
            "print(torch.backends.cpu.get_cpu_capability(), p.resolve_precision('auto'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AVX2", "fp32"]


def test_autocast_follows_the_resolved_precision():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with precision.autocast("bf16"):
        assert layer(x).dtype == torch.bfloat16
    with precision.autocast("fp32"):
        assert layer(x).dtype == torch.float32


def test_training_records_the_resolved_precision_and_the_machine(tmp_path, cpu):
    from arrag.shapes.dataset import ShapesConfig, write_split
    from arrag.training.vq import VQTrainConfig, train_vq

    write_split(tmp_path / "db", "database", 8, ShapesConfig(image_size=16))
    config = VQTrainConfig(image_size=16, grid=4, codebook_size=16, channel_multiplier=(1, 1, 1), latent_channels=32,
                           steps=2, batch_size=4, precision="auto")
    cpu(AVX2_ONLY, "AVX2")
    metrics = train_vq(tmp_path / "db", tmp_path / "vq", tmp_path / "vq.pt", config)
    saved = json.loads((tmp_path / "vq" / "metrics.json").read_text())
    assert metrics["precision"] == saved["precision"] == saved["config"]["precision"] == "fp32"
    assert saved["machine"]["cpu_capability"] == "AVX2" and saved["machine"]["native_bf16"] is False
    assert saved["machine"]["cpu"] and saved["machine"]["threads"] == torch.get_num_threads()
    # the checkpoint holds the resolved precision: on a machine resolving auto to bf16 it is another config
    cpu(NATIVE, "AVX512")
    with pytest.raises(ValueError, match="another config"):
        train_vq(tmp_path / "db", tmp_path / "vq2", tmp_path / "vq.pt", config)


def test_a_bf16_backbone_keeps_its_tokenizer_exact_and_generates(tmp_path):
    from arrag.models.janus import SamplingConfig, build_tiny_backbone, generate_tokens, load_backbone

    torch.manual_seed(0)
    build_tiny_backbone(["a red circle"], image_size=16, patch_size=8, codebook_size=32, hidden_size=32,
                        num_layers=2, num_heads=2, intermediate_size=64).save_pretrained(tmp_path / "backbone")
    full = load_backbone(str(tmp_path / "backbone"))
    half = load_backbone(str(tmp_path / "backbone"), dtype=precision.DTYPES["bf16"])
    assert precision.precision_of(full.model) == "fp32" and precision.precision_of(half.model) == "bf16"
    assert half.model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    exact = full.vq.state_dict()
    assert all(torch.equal(value, exact[name]) for name, value in half.vq.state_dict().items())
    tokens = generate_tokens(half, ["a red circle"], [0], SamplingConfig(cfg_weight=2.0))
    assert tokens.shape == (1, 4) and int(tokens.max()) < 32


FP32_RUN = """
import json, sys, torch
from arrag.shapes.dataset import ShapesConfig, write_split
from arrag.training.vq import VQTrainConfig, train_vq
torch.set_num_threads(1)
root = sys.argv[1]
write_split(root + "/db", "database", 16, ShapesConfig(image_size=16))
config = VQTrainConfig(image_size=16, grid=4, codebook_size=16, channel_multiplier=(1, 1, 1), latent_channels=32,
                       steps=4, batch_size=4, precision="fp32")
train_vq(root + "/db", root + "/vq", root + "/vq.pt", config)
print(open(root + "/vq/loss.csv").read())
"""


def test_fp32_training_gives_the_same_digits_on_native_and_emulated_avx2_kernels(tmp_path):
    """`precision: fp32` on this CPU's native kernels and under the AVX2 emulation (another CPU's kernels: other
    summation orders): the same loss curve to 4 significant digits (relative 1e-4). Tolerance: fp32 sums of a few
    thousand terms differ in about the 7th digit between kernel orders and 4 steps of Adam grow that; measured on an
    Intel Xeon (Sapphire Rapids): at most 1.7e-5 relative over every column and step, a factor 6 under the bound.
    The same run in bf16 differs from fp32 by up to 7e-2 relative, so the test fails if either run is not fp32."""
    curves = []
    for name, extra in (("native", {}), ("avx2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
        out = subprocess.run([sys.executable, "-c", FP32_RUN, str(tmp_path / name)], env=env, capture_output=True,
                             text=True, check=True).stdout
        rows = [line.split(",") for line in out.strip().splitlines()]
        curves.append({column: [float(row[i]) for row in rows[1:]] for i, column in enumerate(rows[0])})
    native, emulated = curves
    assert native.keys() == emulated.keys() and len(native["step"]) == 4
    for column in native:
        assert native[column] == pytest.approx(emulated[column], rel=1e-4), column
