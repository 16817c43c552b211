"""bench/training_curve.py: a run's log becomes a PNG; a damaged log is a clear error."""

from __future__ import annotations

import json

import pytest

from bench.training_curve import main


def test_plots_a_log_and_refuses_a_damaged_one(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"step": 0, "eval_search_loss": 4.0, "eval_search_token_acc": 0.0, "eval_search_exact": 0.0,
             "eval_oracle_loss": 4.0, "eval_oracle_token_acc": 0.0, "eval_oracle_exact": 0.0}]
    rows += [{"step": s, "loss": 3.0 - s / 100} for s in (10, 20, 30)]
    rows += [{**rows[0], "step": 30, "eval_oracle_loss": 2.5, "eval_oracle_token_acc": 0.4}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "curve.png"
    assert main([str(log), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # two stages one after the other, the second with distilled prose evaluations
    second = tmp_path / "log2.jsonl"
    second.write_text("\n".join(json.dumps({**r, "eval_prose_kl": 2.0, "eval_prose_kl_base": 1.0} if "eval_oracle_loss" in r
                                          else r) for r in rows) + "\n")
    assert main([str(log), str(second), "--plot", str(out)]) == 0
    log.write_text(log.read_text() + '{"step": 40, "loss"\n')
    with pytest.raises(SystemExit, match="log.jsonl:6: not a JSON line"):
        main([str(log), "--plot", str(out)])
