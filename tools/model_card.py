"""The general model's figures in weights/README.md (between the model-card markers), made from the
reports that tools/report_general_model.sh writes into docs/accuracy/general/. --write replaces the
block; without it the block is printed; tests/test_weights_file.py checks that the README's block is
what this makes from the committed reports.

    python3 tools/model_card.py --write
"""
import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "docs" / "accuracy" / "general"
README = ROOT / "weights" / "README.md"
BEGIN, END = "<!-- model-card:begin -->", "<!-- model-card:end -->"
SNR_SETS = ["snr2", "snr3", "snr5", "snr8", "snr12", "snr20"]
DENSITY_SETS = ["density_sparse", "density_medium", "density_crowded"]


def _summaries(path: Path) -> dict:
    with open(path, newline="") as f:
        return {(r["method"], r["scope"]): r for r in csv.DictReader(f)}


def _cell(rows, method, scope, metric, scale=100.0, digits=1):
    row = rows.get((method, scope))
    if row is None or row[f"{metric}_mean"] in ("", "nan"):
        return "-"
    return f"{float(row[f'{metric}_mean']) * scale:.{digits}f}"


def _table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def card(reports: Path = REPORTS) -> str:
    realistic = _summaries(reports / "realistic" / "evaluation.csv")
    no_spots = _summaries(reports / "realistic" / "evaluation_no_spots.csv")
    methods = list(dict.fromkeys(m for m, _ in realistic))
    lines = ["Realistic test family (`deepspot evaluate --realistic`, 20 images per set, 256x256, seeds and real",
             "background pixels disjoint from training), F1 % at 3 px, each model with its own detection defaults:", ""]
    lines += _table(["method"] + [s.replace("snr", "SNR ") for s in SNR_SETS] + [s.split("_")[1] for s in DENSITY_SETS],
                    [[m] + [_cell(realistic, m, s, "f1") for s in SNR_SETS + DENSITY_SETS] for m in methods])
    lines += ["", "Images without spots, false detections per image (mean):", ""]
    lines += _table(["method", "noise only", "backgrounds only"],
                    [[m, _cell(no_spots, m, "noise_only", "fp", 1, 2), _cell(no_spots, m, "backgrounds_only", "fp", 1, 2)]
                     for m in methods])
    paper = _summaries(reports / "paper" / "evaluation.csv")
    real = {p.name[len("real_"):]: _summaries(p / "evaluation.csv") for p in sorted(reports.glob("real_*"))}
    lines += ["", "No regression (F1 %): the paper's regenerated test sets, the authors' 50 images, the real "
              "expert-annotated image (whole):", ""]
    rows = []
    for m in dict.fromkeys(m for m, _ in paper):
        rows.append([m] + [_cell(paper, m, s, "f1") for s in ("DS_fixed (all)", "DS_var (all)", "authors_sim")])
    lines += _table(["method", "DS_fixed", "DS_var", "authors' 50"], rows)
    lines += [""] + _table(["weights", "method", "insta 293T real image"],
                           [[w, m, _cell(r, m, "insta_293T", "f1")] for w, r in real.items() for m in dict.fromkeys(m for m, _ in r)])
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help=f"replace the block in {README}")
    args = parser.parse_args()
    block = card()
    if not args.write:
        print(block)
        return 0
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    README.write_text(head + BEGIN + "\n" + block + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote the model card's figures into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
