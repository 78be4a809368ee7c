"""Write examples/data/housing_synthetic.csv: 400 made-up houses, 6 features, one price target.

Run once (`python examples/data/make_csv.py`); the CSV it writes is committed beside it. Seeded: running it
again writes the same bytes. The price is a smooth nonlinear function of the features plus noise, so an MLP
beats a straight line but cannot reach R^2 = 1; `noise_feature` carries no signal at all.
"""
import csv
from pathlib import Path

import numpy as np

N_ROWS = 400
OUT = Path(__file__).resolve().parent / "housing_synthetic.csv"


def main() -> None:
    rng = np.random.default_rng(2024)
    area = rng.uniform(40, 220, N_ROWS)            # m^2
    rooms = rng.integers(1, 7, N_ROWS)
    age = rng.uniform(0, 80, N_ROWS)                # years
    distance = rng.exponential(8.0, N_ROWS)         # km to the centre
    garden = rng.integers(0, 2, N_ROWS)
    noise_feature = rng.normal(0, 1, N_ROWS)
    price = (1.8 * area + 12 * rooms - 0.02 * (age - 30) ** 2 + 60 * np.exp(-distance / 5)
             + 25 * garden * (area > 120) + 20 * np.sin(area / 25) + rng.normal(0, 15, N_ROWS))  # k EUR
    with open(OUT, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["area", "rooms", "age", "distance", "garden", "noise_feature", "price"])
        for row in zip(area, rooms, age, distance, garden, noise_feature, price):
            w.writerow([f"{row[0]:.1f}", int(row[1]), f"{row[2]:.1f}", f"{row[3]:.2f}", int(row[4]),
                        f"{row[5]:.3f}", f"{row[6]:.1f}"])
    print(f"wrote {OUT} ({N_ROWS} rows)")


if __name__ == "__main__":
    main()
