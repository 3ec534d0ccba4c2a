"""Unpadded batches end to end: NSP refuses unpacked rows; the throughput tool counts real tokens."""
import pytest


def test_nsp_refuses_unpacked_rows(tmp_path):
    from tests.helpers.data import make_docs, quiet_prepare, write_lines
    from tests.helpers.tiny_run import tiny_config
    from training.errors import UserError
    from training.run_setup import load_data

    corpus = write_lines(tmp_path / "c.txt", make_docs(80, seed=4))
    quiet_prepare([corpus], tmp_path / "out", seq_len=24, tokenizer="train:300", heldout_fraction=0.1, pack=False)
    cfg = tiny_config(tmp_path / "run", tmp_path / "out", ["model.nsp=true", "model.vocab_size=300",
                                                           "model.max_position=24"])
    with pytest.raises(UserError, match="model.nsp needs packed rows.*--no-pack"):
        load_data(cfg)


@pytest.mark.slow
def test_throughput_counts_real_tokens_of_padded_rows(tmp_path):
    """prepare --no-pack, then the throughput tool with ours, ours_padded and HF: real tokens/s beside tokens/s,
    MFU on real tokens, the unpadded/padded ratio."""
    import json
    import subprocess
    import sys

    from tests.helpers.bench import REPO, bench_config, bench_env
    from tests.helpers.data import make_docs, quiet_prepare, write_lines

    corpus = write_lines(tmp_path / "c.txt", make_docs(200, seed=5))
    quiet_prepare([corpus], tmp_path / "data", seq_len=64, tokenizer="train:512", heldout_fraction=0.05, pack=False)
    cfg = bench_config(tmp_path, "tp", tmp_path / "data")
    out = tmp_path / "tp"
    proc = subprocess.run([sys.executable, "-m", "training.bench", "throughput", "--config", str(cfg), "--out",
                           str(out), "--steps", "2", "--warmup", "1", "--repeats", "2", "--models", "ours",
                           "ours_padded", "hf"], cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "throughput.json").read_text())
    assert 0 < res["padding"] < 1 and res["real_tokens_per_step"] < res["tokens_per_step"]
    for m in res["models"].values():
        assert m["real_tokens_per_s"] == pytest.approx(m["tokens_per_s"] * (1 - res["padding"]))
    assert {"ratio_ours_over_ours_padded", "ratio_ours_padded_over_hf", "ratio_ours_over_hf"} <= set(res)
    assert "real tok/s" in proc.stdout and "ours/ours_padded" in proc.stdout
