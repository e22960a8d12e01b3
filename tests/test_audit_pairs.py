"""A forwarded request's decision and completion records, folded back together for people."""

from __future__ import annotations

from proxy.audit import record
from proxy.audit.pairs import fold
from proxy.audit.query import render


def pair(path: str, status: int, size: int) -> tuple[dict[str, object], dict[str, object]]:
    decided = record("access.allow", user="alice", path=path, reasons=["grant g-1"])
    done = record(
        "access.done", decision_id=decided["id"], user="alice", path=path,
        status=status, bytes=size, duration_ms=1.5, reasons=["upstream error: x"],
    )  # fmt: skip
    return decided, done


def test_a_completion_is_folded_into_its_decision_in_either_order() -> None:
    a, a_done = pair("/a", 200, 10)
    b, b_done = pair("/b", 502, 0)
    open_decision = record("access.allow", user="bob", path="/c")
    deny = record("access.deny", user="eve", path="/d", status=403, bytes=0)
    rows = fold([a, b, open_decision, a_done, deny, b_done])
    assert [r["path"] for r in rows] == ["/a", "/b", "/c", "/d"]
    assert (rows[0]["status"], rows[0]["bytes"], rows[0]["duration_ms"]) == (200, 10, 1.5)
    assert rows[1]["reasons"] == ["grant g-1", "upstream error: x"]
    assert "status" not in rows[2]  # still being answered, or its writer crashed
    newest_first = fold([b_done, a_done, a, b])
    assert [(r["path"], r["status"]) for r in newest_first] == [("/a", 200), ("/b", 502)]
    orphan = fold([a_done])  # its decision is on another page
    assert orphan == [a_done]


def test_the_table_shows_one_row_per_request_and_exports_keep_both() -> None:
    a, a_done = pair("/a", 200, 10)
    table = render([a, a_done], "table").splitlines()
    assert len(table) == 3 and table[-1] == "1 record(s)"
    assert "access.allow" in table[1] and " 200 " in table[1]
    assert len(render([a, a_done], "jsonl").splitlines()) == 2
