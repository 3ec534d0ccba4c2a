"""train.precision=auto (training/engine/precision.py): bf16 only where the device computes it natively."""
import logging

import pytest

from training.engine import precision as prec
from training.stages.plan import load_config

# Trimmed /proc/cpuinfo texts of three real kinds of machine.
INTEL_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AMD_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma bmi2\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 svebf16\n"
ARM_OLD = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n"


@pytest.mark.parametrize("cpuinfo,flags", [(INTEL_AMX, ["amx_bf16", "avx512_bf16"]), (AMD_AVX2, []),
                                           (ARM_BF16, ["bf16"]), (ARM_OLD, []), ("", [])])
def test_cpu_bf16_flags_reads_the_cpus_own_flags(cpuinfo, flags):
    assert prec.cpu_bf16_flags(cpuinfo) == flags


@pytest.mark.parametrize("cpuinfo,expected", [(INTEL_AMX, "bf16"), (ARM_BF16, "bf16"), (AMD_AVX2, "fp32"),
                                              (ARM_OLD, "fp32")])
def test_auto_is_bf16_only_on_a_cpu_with_bf16_instructions(cpuinfo, expected):
    assert prec.resolve_precision("auto", cuda=False, cpuinfo=cpuinfo) == expected
    native, why = prec.device_bf16(cuda=False, cpuinfo=cpuinfo)
    assert native == (expected == "bf16") and ("natively" in why) == native


@pytest.mark.parametrize("explicit", ["bf16", "fp16", "fp32"])
def test_an_explicit_precision_is_kept(explicit):
    assert prec.resolve_precision(explicit, cuda=False, cpuinfo=AMD_AVX2) == explicit
    assert prec.resolve_precision(explicit, cuda=False, cpuinfo=INTEL_AMX) == explicit


def test_load_config_resolves_auto_once_for_every_consumer(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {max_steps: 2}\n")
    cfg = load_config(path, [])  # the schema's default is auto
    assert cfg.train.precision == ("bf16" if prec.device_bf16()[0] else "fp32")
    assert load_config(path, ["train.precision=fp32"]).train.precision == "fp32"
    assert load_config(path, ["train.precision=bf16"]).train.precision == "bf16"


def test_pretrain_warns_when_bf16_is_asked_for_on_a_cpu_that_emulates_it(monkeypatch, caplog):
    from training import pretrain

    real = prec.device_bf16
    monkeypatch.setattr(prec, "device_bf16", lambda: real(cuda=False, cpuinfo=AMD_AVX2))
    with caplog.at_level(logging.INFO, logger="training.pretrain"):
        pretrain.log_precision("bf16", rank=0)
        pretrain.log_precision("fp32", rank=0)
        pretrain.log_precision("bf16", rank=1)  # rank 0 speaks for all
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "train.precision=bf16 although this CPU has no bf16" in warnings[0].getMessage()
    assert any(r.levelno == logging.INFO and "train.precision=fp32" in r.getMessage() for r in caplog.records)
