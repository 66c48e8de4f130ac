#!/usr/bin/env python3
"""Convert scikit-learn 1.1.3's raw dataset files (sklearn/datasets/data/ of its wheel) into kiln's clean CSVs.

Run from the repository root: python3 data/scripts/convert.py DIR
Output: data/iris.csv, data/boston.csv, data/digits.csv (header row, one example per line).
"""
import csv, gzip, sys, pathlib

if len(sys.argv) != 2:
    sys.exit("usage: python3 data/scripts/convert.py DIR  (DIR: sklearn/datasets/data of scikit-learn 1.1.3)")
src = pathlib.Path(sys.argv[1])
out = pathlib.Path("data")

names = ["setosa", "versicolor", "virginica"]
with open(src / "iris.csv") as f:
    rows = list(csv.reader(f))[1:]
with open(out / "iris.csv", "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["sepal_length", "sepal_width", "petal_length", "petal_width", "species"])
    for r in rows:
        w.writerow(r[:4] + [names[int(r[4])]])

with open(src / "boston_house_prices.csv") as f:
    rows = list(csv.reader(f))
with open(out / "boston.csv", "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(rows[1])
    for r in rows[2:]:
        w.writerow(r)

with gzip.open(src / "digits.csv.gz", "rt") as f:
    rows = list(csv.reader(f))
with open(out / "digits.csv", "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow([f"p{i}" for i in range(64)] + ["label"])
    for r in rows:
        w.writerow([str(int(float(v))) for v in r])
