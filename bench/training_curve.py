"""Plot a `ctxtree train` run's log: training answer loss and the held-out evaluation
(searched and teacher-routed) against step.

    python -m bench.training_curve runs/m4/log.jsonl --plot docs/training-curve.png [--title TEXT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not a JSON line ({e})")
    return rows


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_oracle_loss" in r]
    if not train or not evals:
        raise SystemExit("the log has no training rows or no evaluations yet")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], color="0.6", lw=1, label="train (fresh facts)")
    for mode, color in (("oracle", "tab:blue"), ("search", "tab:orange")):
        steps = [r["step"] for r in evals]
        left.plot(steps, [r[f"eval_{mode}_loss"] for r in evals], "o-", color=color, label=f"held-out, {mode} routing")
        right.plot(steps, [r[f"eval_{mode}_token_acc"] for r in evals], "o-", color=color, label=f"{mode} token acc")
        right.plot(steps, [r[f"eval_{mode}_exact"] for r in evals], "s--", color=color, label=f"{mode} exact match")
    prose = [r for r in evals if "eval_prose_kl" in r]
    if prose:  # distilled prose questions: KL(teacher || decoder), and the base model's without the text
        steps = [r["step"] for r in prose]
        left.plot(steps, [r["eval_prose_kl"] for r in prose], "^-", color="tab:green", label="held-out prose, KL to teacher")
        left.plot(steps, [r["eval_prose_kl_base"] for r in prose], ":", color="tab:green",
                  label="  the base model without the text")
    left.set(xlabel="step", ylabel="answer loss / KL (nats/token)", title=title)
    right.set(xlabel="step", ylabel="fraction", ylim=(0, 1), title="held-out answers, teacher-forced")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path, nargs="+", help="one run's log, or the logs of consecutive stages")
    ap.add_argument("--plot", type=Path, required=True)
    ap.add_argument("--title", default="answer loss")
    args = ap.parse_args(argv)
    rows, offset = [], 0
    for path in args.log:  # stages one after the other: each stage's steps continue the last's
        stage = read_log(path)
        rows += [{**r, "step": r["step"] + offset} for r in stage if "step" in r]
        offset = max((r["step"] for r in rows), default=offset)
    plot(rows, args.plot, args.title)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
