"""metrics.jsonl: what a resume keeps of it."""


def test_truncate_metrics_to_minus_one_drops_every_record(tmp_path):
    from training.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "config"}\n{"kind": "train", "step": 0}\n{"kind": "train", "step": 3}\n{"cut')
    truncate_metrics(path, -1)
    assert path.read_text() == ""
    path.write_text('{"kind": "train", "step": 2}\n{"kind": "train", "step": 3}\n')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"kind": "train", "step": 2}\n'
