"""The one CSV reader of user tables (manifests, slide lists), below every package that reads one.

``preprocess`` (the cache), the datamodules and ``predict`` all read manifests through :func:`read_table`,
so a BOM, spaces around column names or blank lines behave the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# Columns whose cells are read literally: "nan" in an mpp column is a bad value to refuse, not a blank.
LITERAL_COLUMNS = ("mpp",)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a manifest CSV as strings, the one reader every verb uses (``preprocess``, ``fit``, ...).

    Column names are stripped of spaces and of a UTF-8 byte-order mark (Excel writes one), cells of
    surrounding spaces, and rows that are entirely blank are dropped. A ``line`` column holds each row's
    line number in the file (the header is line 1), for messages. Cells of :data:`LITERAL_COLUMNS` keep
    their text (``"nan"`` stays ``"nan"``); only empty ones are missing.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: If the file is empty or not a readable CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"manifest {path} does not exist: pass the CSV written by `e2e-wsi synth` or your own"
        )
    try:
        # Strings everywhere so that e.g. slide id "001" keeps its zeros; blank lines are kept so the
        # line numbers in our messages are the ones an editor shows. utf-8-sig drops a BOM.
        df = pd.read_csv(path, dtype=str, skip_blank_lines=False, keep_default_na=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"manifest {path} is empty: it needs a header line (e.g. case_id,slide_id,label) and one row per "
            "slide"
        ) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"manifest {path} is not a readable UTF-8 CSV: {' '.join(str(exc).split())}"
        ) from None
    df.columns = [str(c).replace("\ufeff", "").strip() for c in df.columns]
    literal = [i for i, c in enumerate(df.columns) if c in LITERAL_COLUMNS]
    if literal:
        raw = pd.read_csv(
            path, dtype=str, skip_blank_lines=False, keep_default_na=False, na_values=[""],
            usecols=literal, encoding="utf-8-sig",
        )  # fmt: skip
        for i, values in zip(literal, raw.T.to_numpy(), strict=True):
            df[df.columns[i]] = values
    df["line"] = np.arange(2, len(df) + 2)
    df = df[df.drop(columns="line").notna().any(axis=1)].reset_index(drop=True)
    for column in df.columns:
        if column != "line":
            df[column] = df[column].map(lambda v: v.strip() if isinstance(v, str) else v)
    return df
