"""Date matching in SQL equals the FHIR definition, for every prefix and precision.

The SQL adds index bounds for narrow values (search/params.py, DateUnit); this checks, on random
dates and periods, that those bounds never change a result compared with the plain definition.
"""
from __future__ import annotations

import itertools
from datetime import UTC, datetime

import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.search_parameters import for_type
from fhir_server.search.index import index_resource
from fhir_server.search.params import PREFIXES, DateUnit
from fhir_server.search.values import date_range
from fhir_server.storage.schema import metadata, resource, search_date

NOW = int(datetime.now(UTC).timestamp() * 1_000_000)


def reference(prefix: str, plo: int, phi: int, lo: int, hi: int) -> bool:
    """The R4 definitions, written plainly (ap: within 10% of the distance from now)."""
    eq = plo <= lo and hi <= phi
    return {
        "eq": eq, "ne": not eq, "gt": hi > phi, "lt": lo < plo, "ge": hi > phi or eq, "le": lo < plo or eq,
        "sa": lo >= phi, "eb": hi <= plo,
        "ap": lo < phi + abs(NOW - plo) * 0.1 and hi > plo - abs(NOW - plo) * 0.1,
    }[prefix]


dates = st.builds(
    lambda y, m, d, h, mi, s, precision: ["%04d" % y, "%04d-%02d" % (y, m), "%04d-%02d-%02d" % (y, m, d),
                                          "%04d-%02d-%02dT%02d:%02d:%02dZ" % (y, m, d, h, mi, s)][precision],
    # a small space, so values and searches often share a year, month, day or minute
    st.integers(1992, 1994), st.integers(5, 7), st.integers(14, 16), st.integers(0, 23), st.sampled_from([0, 59]),
    st.sampled_from([0, 59]), st.integers(0, 3))


@settings(max_examples=80, deadline=None)
@given(values=st.lists(dates, min_size=1, max_size=12), periods=st.lists(st.tuples(dates, dates), max_size=4),
       search=dates)
def test_sql_date_matching_equals_the_definition(values: list[str], periods: list[tuple[str, str]],
                                                 search: str) -> None:
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    resources = [{"resourceType": "Observation", "id": f"v{i}", "status": "final", "code": {"text": "x"},
                  "effectiveDateTime": v} for i, v in enumerate(values)]
    resources += [{"resourceType": "Observation", "id": f"p{i}", "status": "final", "code": {"text": "x"},
                   "effectivePeriod": {"start": min(a, b), "end": max(a, b)}} for i, (a, b) in enumerate(periods)]
    with engine.begin() as conn:
        for pk, res in enumerate(resources, start=1):
            conn.execute(resource.insert().values(pk=pk, type="Observation", id=res["id"], version_id=1,
                                                  last_updated=0, deleted=False))
            for row in index_resource(res).get("date", ()):
                if row[0] == "date":
                    conn.execute(search_date.insert().values(resource_pk=pk, type="Observation", param="date",
                                                             lo=row[1], hi=row[2], narrow=row[3]))
        rows = conn.execute(sa.select(search_date.c.resource_pk, search_date.c.lo, search_date.c.hi)).all()
        unit = DateUnit(for_type("Observation")["date"], "Observation", None, "date")
        plo, phi = date_range(search)  # type: ignore[misc]
        for prefix in PREFIXES:
            expected = {pk for pk, lo, hi in rows if reference(prefix, plo, phi, lo, hi)}
            got = set(conn.execute(sa.select(resource.c.pk).where(unit.clause(resource, prefix + search))).scalars())
            assert got == expected, (prefix, search)
        # a range (two ANDed prefixes) is one condition on the same value
        for (p1, p2) in itertools.product(("ge", "gt", "sa"), ("le", "lt", "eb")):
            other = "1993-06-15"
            qlo, qhi = date_range(other)  # type: ignore[misc]
            expected = {pk for pk, lo, hi in rows
                        if reference(p1, plo, phi, lo, hi) and reference(p2, qlo, qhi, lo, hi)}
            got = set(conn.execute(sa.select(resource.c.pk).where(
                unit.clause_and(resource, [p1 + search, p2 + other]))).scalars())
            assert got == expected, (p1, search, p2, other)
