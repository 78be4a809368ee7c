"""Small tables of compounds for the latent trainer's user-data tests: real formulas (binary compounds of common
elements), made-up but formula-dependent targets (so a model learns something), and a few unparsable formulas."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

CATIONS = ["Li", "Na", "K", "Mg", "Ca", "Sr", "Ba", "Zn", "Cd", "Pb", "Sn", "Ge", "Bi", "Sb", "Cu", "Ag", "Ti",
           "Zr", "Fe", "Co", "Ni", "Al", "Ga", "In"]
ANIONS = ["O", "S", "Se", "Te", "Si", "As", "P", "N", "Cl", "Br", "I"]
UNPARSABLE = ["Xx2O3", "lead telluride", "Bi2Te3)("]


def _formula(a: str, na: int, b: str, nb: int) -> str:
    return f"{a}{na if na > 1 else ''}{b}{nb if nb > 1 else ''}"


def compounds_table(n: int = 180, seed: int = 0, unparsable: list[str] = UNPARSABLE) -> pd.DataFrame:
    """`n` distinct binary formulas plus the unparsable ones, with targets band_gap (eV, from the electronegativity
    difference) and bulk_modulus (GPa, positive, heavy-tailed: a log target), both with a little noise."""
    from pymatgen.core import Element

    rng = np.random.default_rng(seed)
    combos = list(itertools.product(CATIONS, [1, 2, 3], ANIONS, [1, 2, 3]))
    picked = [combos[i] for i in rng.permutation(len(combos))]
    formulas, seen = [], set()
    for a, na, b, nb in picked:
        f = _formula(a, na, b, nb)
        if f not in seen:
            seen.add(f)
            formulas.append((f, Element(a), na, Element(b), nb))
        if len(formulas) == n:
            break
    dx = np.array([abs(float(eb.X) - float(ea.X)) for _, ea, _, eb, _ in formulas])
    mass = np.array([(na * float(ea.atomic_mass) + nb * float(eb.atomic_mass)) / (na + nb)
                     for _, ea, na, eb, nb in formulas])
    band_gap = np.clip(2.2 * dx - 0.8 + rng.normal(0, 0.15, n), 0, None)
    bulk_modulus = 10 ** (2.4 - 0.006 * mass + 0.3 * dx + rng.normal(0, 0.05, n))
    table = pd.DataFrame({"formula": [f[0] for f in formulas], "band_gap": band_gap.round(3),
                          "bulk_modulus": bulk_modulus.round(2)})
    bad = pd.DataFrame({"formula": unparsable, "band_gap": [1.0] * len(unparsable),
                        "bulk_modulus": [50.0] * len(unparsable)})
    # the bad rows sit among the good ones, as in a real file
    return pd.concat([table.iloc[:10], bad, table.iloc[10:]], ignore_index=True)
