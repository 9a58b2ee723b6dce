"""The accepted range of a slide's MPP (micrometres per level-0 pixel), checked wherever an MPP enters.

An MPP comes from a manifest's ``mpp`` column, ``--mpp``, or the slide file's metadata. Values outside
``MPP_MIN .. MPP_MAX`` are refused with one message wherever they come from: below 0.01 um/px (beyond
any optical scanner: 1000x) a typo such as ``1e-6`` would ask for patches larger than the slide and then
report "no tissue", ``1e-300`` overflowed into a division by zero; above 100 um/px (0.1x) nothing is a
slide. ``nan`` and ``inf`` are refused too, instead of silently falling back to the file's metadata.
"""

from __future__ import annotations

import math

MPP_MIN = 0.01  # um/px: 1000x
MPP_MAX = 100.0  # um/px: 0.1x


def mpp_problem(value: object) -> str | None:
    """Why ``value`` is not a usable MPP (one message for every bad value), or ``None`` if it is."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number) and MPP_MIN <= number <= MPP_MAX:
        return None
    return (
        f"mpp {value!r} is not a number of micrometres per pixel in {MPP_MIN:g}..{MPP_MAX:g} "
        "(0.25 is 40x, 0.5 is 20x)"
    )


def check_mpp(value: object, where: str) -> float:
    """``value`` as a float, or :class:`~e2e_wsi.errors.UserError` naming ``where`` (a row, an option).

    Raises:
        UserError: If the value is not a finite number in ``MPP_MIN .. MPP_MAX``.
    """
    from e2e_wsi.errors import UserError

    if (why := mpp_problem(value)) is not None:
        raise UserError(f"{where}: {why}; fix the value, or leave it out to use the slide file's metadata")
    return float(value)  # type: ignore[arg-type]
