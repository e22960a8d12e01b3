"""Generate the demo replay app's rrweb recordings (deterministic).

Writes ``recordings/demo-1.json`` .. ``demo-3.json`` (rrweb v2 event arrays) and
``recordings/index.json`` (PostHog-like metadata) next to this file::

    python deploy/demo/make_recordings.py          # rewrite the files
    python deploy/demo/make_recordings.py --check  # exit 1 if they are stale

Each recording is a small scripted scenario: a Meta event (type 4), a FullSnapshot (type 2)
of a hand-built page, then IncrementalSnapshot events (type 3): mouse moves, clicks, scrolls,
text typed into form fields and a few DOM mutations. The people, e-mail addresses, phone
numbers and street addresses are made up, but they are exactly the kind of personal data that
jitgate keeps behind a grant. Every element is absolutely positioned from the numbers in this
file, so the mouse lands on the fields it types into.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Json = dict[str, Any]

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "recordings"
PROJECT_ID = 1

# rrweb enums (rrweb v2, @rrweb/types).
EVENT_FULL_SNAPSHOT = 2
EVENT_INCREMENTAL_SNAPSHOT = 3
EVENT_META = 4
SOURCE_MUTATION = 0
SOURCE_MOUSE_MOVE = 1
SOURCE_MOUSE_INTERACTION = 2
SOURCE_SCROLL = 3
SOURCE_INPUT = 5
MOUSE_UP = 0
MOUSE_DOWN = 1
CLICK = 2
FOCUS = 5
BLUR = 6
POINTER_MOUSE = 0
NODE_DOCUMENT = 0
NODE_DOCUMENT_TYPE = 1
NODE_ELEMENT = 2
NODE_TEXT = 3

HEADER_HEIGHT = 64
FIELD_HEIGHT = 66  # label 20 + gap 6 + control 40
CONTROL_OFFSET = 26
CONTROL_HEIGHT = 40

# --------------------------------------------------------------------------- DOM


@dataclass
class Text:
    text: str
    key: str | None = None
    is_style: bool = False


@dataclass
class El:
    tag: str
    attrs: dict[str, str | bool] = field(default_factory=dict)
    children: list[El | Text] = field(default_factory=list)
    key: str | None = None


Child = El | Text | str


def h(
    tag: str, attrs: dict[str, str | bool] | None = None, *kids: Child, key: str | None = None
) -> El:
    """Build an element; plain strings become text nodes."""
    children: list[El | Text] = [Text(k) if isinstance(k, str) else k for k in kids]
    return El(tag, dict(attrs or {}), children, key)


def box(x: int, y: int, w: int, hgt: int | None = None) -> str:
    style = f"left:{x}px;top:{y}px;width:{w}px"
    return style if hgt is None else f"{style};height:{hgt}px"


def serialize(title: str, css: str, body: El) -> tuple[Json, dict[str, int]]:
    """Serialize a page the way rrweb-snapshot does: pre-order ids, document is id 1."""
    ids: dict[str, int] = {}
    counter = 0

    def next_id() -> int:
        nonlocal counter
        counter += 1
        return counter

    def ser(node: El | Text) -> Json:
        nid = next_id()
        if node.key is not None:
            ids[node.key] = nid
        if isinstance(node, Text):
            out: Json = {"type": NODE_TEXT, "textContent": node.text, "id": nid}
            if node.is_style:
                out["isStyle"] = True
            return out
        return {
            "type": NODE_ELEMENT,
            "tagName": node.tag,
            "attributes": node.attrs,
            "childNodes": [ser(c) for c in node.children],
            "id": nid,
        }

    html = h(
        "html",
        {"lang": "en"},
        h(
            "head",
            None,
            h("meta", {"charset": "utf-8"}),
            h("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
            h("title", None, title),
            h("style", None, Text(css, is_style=True)),
        ),
        body,
    )
    doc_id = next_id()
    doctype: Json = {
        "type": NODE_DOCUMENT_TYPE,
        "name": "html",
        "publicId": "",
        "systemId": "",
        "id": next_id(),
    }
    root: Json = {
        "type": NODE_DOCUMENT,
        "childNodes": [doctype, ser(html)],
        "compatMode": "CSS1Compat",
        "id": doc_id,
    }
    ids["document"] = doc_id
    return root, ids


# --------------------------------------------------------------------------- page layout


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float


@dataclass
class Page:
    """Absolute layout bookkeeping: every form control's rectangle in page coordinates."""

    main_left: int
    rects: dict[str, Rect] = field(default_factory=dict)

    def card(
        self, key: str, x: int, y: int, w: int, hgt: int, title: str | None, *kids: Child
    ) -> El:
        self.rects[key] = Rect(self.main_left + x, HEADER_HEIGHT + y, w, hgt)
        head: list[Child] = [h("h2", None, title)] if title else []
        return h("section", {"class": "card", "style": box(x, y, w, hgt)}, *head, *kids, key=key)

    def control(self, card: str, key: str, x: int, y: int, w: int, hgt: int) -> None:
        c = self.rects[card]
        self.rects[key] = Rect(c.x + x, c.y + y, w, hgt)

    def field(
        self,
        card: str,
        key: str,
        label: str,
        x: int,
        y: int,
        w: int,
        *,
        kind: str = "text",
        value: str = "",
        placeholder: str = "",
        autocomplete: str = "",
        options: list[tuple[str, str]] | None = None,
    ) -> El:
        """A labelled input (or select) at (x, y) inside ``card``."""
        self.control(card, key, x, y + CONTROL_OFFSET, w, CONTROL_HEIGHT)
        attrs: dict[str, str | bool] = {"id": key, "name": key.replace("-", "_")}
        if autocomplete:
            attrs["autocomplete"] = autocomplete
        if options is not None:
            if value:
                attrs["value"] = value
            opts = [
                h("option", {"value": v, **({"selected": True} if v == value else {})}, text)
                for v, text in options
            ]
            ctl = h("select", attrs, *opts, key=key + "-ctl")
        else:
            attrs["type"] = kind
            if placeholder:
                attrs["placeholder"] = placeholder
            if value:
                attrs["value"] = value
            ctl = h("input", attrs, key=key + "-ctl")
        return h(
            "div",
            {"class": "field", "style": box(x, y, w, FIELD_HEIGHT)},
            h("label", {"for": key}, label),
            ctl,
        )

    def button(
        self,
        card: str | None,
        key: str,
        label: str,
        x: int,
        y: int,
        w: int,
        hgt: int,
        cls: str = "btn",
    ) -> El:
        if card is None:
            self.rects[key] = Rect(self.main_left + x, HEADER_HEIGHT + y, w, hgt)
        else:
            self.control(card, key, x, y, w, hgt)
        return h(
            "button",
            {"type": "button", "class": cls, "style": box(x, y, w, hgt)},
            Text(label, key=key + "-text"),
            key=key + "-ctl",
        )


BASE_CSS = """
*{box-sizing:border-box}
html,body{margin:0;padding:0}
body{font-family:"DejaVu Sans",-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  font-size:14px;color:#1f2430;background:#f4f5f7}
.topbar{height:64px;background:#ffffff;border-bottom:1px solid #e3e5ea;position:relative}
.brand{position:absolute;left:32px;top:20px;font-size:19px;font-weight:700;letter-spacing:.2px}
.brand span{color:#2f7d5b}
.nav{position:absolute;left:260px;top:23px;color:#596072}
.nav a{color:#596072;text-decoration:none;margin-right:22px}
.cart{position:absolute;right:32px;top:18px;padding:6px 14px;border:1px solid #d5d8df;
  border-radius:16px;color:#1f2430}
main{position:relative}
h1{position:absolute;margin:0;font-size:26px;font-weight:600}
.crumbs{position:absolute;color:#7a8194;font-size:13px}
.card{position:absolute;background:#fff;border:1px solid #e3e5ea;border-radius:10px}
.card h2{position:absolute;left:24px;top:18px;margin:0;font-size:16px;font-weight:600}
.field{position:absolute}
.field label{display:block;height:20px;line-height:20px;font-size:13px;color:#4a5061}
.field input,.field select{position:absolute;top:26px;left:0;width:100%;height:40px;
  padding:0 12px;border:1px solid #cfd3dc;border-radius:6px;font:inherit;background:#fff;
  color:#1f2430}
.field input::placeholder{color:#a3a9b7}
.btn{position:absolute;border:0;border-radius:8px;background:#2f7d5b;color:#fff;font:inherit;
  font-size:15px;font-weight:600}
.btn.busy{background:#6c9d86}
.btn.done{background:#1f5c42}
.btn.ghost{background:#fff;color:#1f2430;border:1px solid #cfd3dc;font-weight:500}
.btn.ghost.selected{border:2px solid #2f7d5b;color:#2f7d5b}
.notice{position:absolute;border-radius:8px;padding:17px 18px;background:#e6f4ec;
  color:#1f5c42;border:1px solid #b6dcc6;opacity:0}
.notice.show{opacity:1}
.row{display:flex;justify-content:space-between;padding:7px 0;color:#3b4150}
.row.total{border-top:1px solid #e3e5ea;margin-top:8px;padding-top:14px;font-weight:700;
  color:#1f2430}
.muted{color:#7a8194;font-size:13px}
.lines{position:absolute;left:24px;right:24px;top:54px}
"""


def topbar(brand: str, accent: str, nav: list[str], cart: Child) -> El:
    return h(
        "header",
        {"class": "topbar"},
        h("div", {"class": "brand"}, brand, h("span", None, accent)),
        h("nav", {"class": "nav"}, *[h("a", {"href": "#"}, n) for n in nav]),
        h("div", {"class": "cart"}, cart),
    )


# --------------------------------------------------------------------------- event timeline


@dataclass
class Timeline:
    """Turns scripted user actions into timestamped rrweb events."""

    start_ms: int
    ids: dict[str, int]
    rects: dict[str, Rect]
    rng: random.Random
    mouse: tuple[float, float]
    t: int = 0
    scroll_y: int = 0
    focused: str | None = None
    events: list[Json] = field(default_factory=list)
    pending: list[tuple[int, int, int, int]] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {"clicks": 0, "keys": 0, "moves": 0, "interactions": 0}
    )

    # -- low level
    def emit(self, etype: int, data: Json, t: int | None = None) -> None:
        at = self.t if t is None else t
        self.events.append({"type": etype, "data": data, "timestamp": self.start_ms + at})

    def incremental(self, source: int, **data: Any) -> None:
        self.flush_moves()
        self.emit(EVENT_INCREMENTAL_SNAPSHOT, {"source": source, **data})

    def flush_moves(self) -> None:
        if not self.pending:
            return
        last_t = self.pending[-1][0]
        positions = [
            {"x": x, "y": y, "id": nid, "timeOffset": pt - last_t} for pt, x, y, nid in self.pending
        ]
        self.pending = []
        self.counts["moves"] += 1
        self.emit(
            EVENT_INCREMENTAL_SNAPSHOT,
            {"source": SOURCE_MOUSE_MOVE, "positions": positions},
            last_t,
        )

    def node(self, key: str) -> int:
        return self.ids.get(key + "-ctl", self.ids.get(key, self.ids["body"]))

    def client(self, x: float, y: float) -> tuple[int, int]:
        return round(x), round(y - self.scroll_y)

    # -- actions
    def wait(self, ms: int) -> None:
        self.flush_moves()
        self.t += ms

    def point_in(self, key: str) -> tuple[float, float]:
        r = self.rects[key]
        x = r.x + min(r.w * 0.5, 30 + self.rng.random() * r.w * 0.35)
        y = r.y + r.h * (0.4 + self.rng.random() * 0.25)
        return x, y

    def move_to(self, key: str, duration: int = 900) -> None:
        self.move_to_point(self.point_in(key), duration, target=self.node(key))

    def move_to_point(
        self, dest: tuple[float, float], duration: int = 900, target: int | None = None
    ) -> None:
        (x0, y0), (x1, y1) = self.mouse, dest
        # A gently curved path: quadratic Bezier with a sideways control point.
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        bend = (self.rng.random() - 0.5) * 0.35
        cx, cy = mx - (y1 - y0) * bend, my + (x1 - x0) * bend
        steps = max(2, duration // 50)
        body = self.ids["body"]
        for i in range(1, steps + 1):
            s = i / steps
            e = 0.5 - math.cos(math.pi * s) / 2  # ease in-out
            px = (1 - e) ** 2 * x0 + 2 * (1 - e) * e * cx + e**2 * x1
            py = (1 - e) ** 2 * y0 + 2 * (1 - e) * e * cy + e**2 * y1
            self.t += 50
            if self.pending and self.t - self.pending[0][0] >= 500:
                self.flush_moves()
            nid = target if (target is not None and s > 0.85) else body
            cxp, cyp = self.client(px, py)
            self.pending.append((self.t, cxp, cyp, nid))
        self.mouse = dest
        self.t += 60 + self.rng.randrange(120)

    def _interaction(self, kind: int, key: str, with_pos: bool = True) -> None:
        data: Json = {"type": kind, "id": self.node(key)}
        if with_pos:
            x, y = self.client(*self.mouse)
            data.update({"x": x, "y": y, "pointerType": POINTER_MOUSE})
        self.counts["interactions"] += 1
        self.incremental(SOURCE_MOUSE_INTERACTION, **data)

    def focus(self, key: str) -> None:
        if self.focused is not None and self.focused != key:
            self._interaction(BLUR, self.focused, with_pos=False)
        if self.focused != key:
            self._interaction(FOCUS, key, with_pos=False)
        self.focused = key

    def click(self, key: str, focusable: bool = True) -> None:
        self._interaction(MOUSE_DOWN, key)
        if focusable:
            self.focus(key)
        elif self.focused is not None:
            self._interaction(BLUR, self.focused, with_pos=False)
            self.focused = None
        self.t += 70 + self.rng.randrange(60)
        self._interaction(MOUSE_UP, key)
        self._interaction(CLICK, key)
        self.counts["clicks"] += 1
        self.t += 150 + self.rng.randrange(200)

    def tab_to(self, key: str) -> None:
        self.t += 250 + self.rng.randrange(250)
        self.focus(key)
        self.t += 120 + self.rng.randrange(150)

    def input_event(self, key: str, text: str, checked: bool = False) -> None:
        self.counts["keys"] += 1
        self.incremental(
            SOURCE_INPUT, text=text, isChecked=checked, userTriggered=True, id=self.node(key)
        )

    def type(self, key: str, text: str, *, start: str = "", masked: bool = False) -> None:
        """Type ``text`` after ``start`` one key at a time, with one corrected typo."""
        current = start
        typo_at = self.rng.randrange(3, len(text)) if len(text) > 8 and not masked else -1
        for i, ch in enumerate(text):
            if i == typo_at and ch.isalpha():
                self.t += 90 + self.rng.randrange(110)
                self.input_event(key, current + ("x" if ch != "x" else "z"))
                self.t += 260 + self.rng.randrange(200)
                self.input_event(key, current)  # backspace
            pause = 65 + self.rng.randrange(95)
            if ch in " @.":
                pause += 90 + self.rng.randrange(150)
            self.t += pause
            current += ch
            self.input_event(key, "*" * len(current) if masked else current)
        self.t += 200 + self.rng.randrange(300)

    def clear(self, key: str) -> None:
        """Select-all + delete in a pre-filled field."""
        self.t += 300 + self.rng.randrange(200)
        self.input_event(key, "")

    def choose(self, key: str, value: str) -> None:
        """Pick an option in a native <select> (the open dropdown is not recorded)."""
        self.t += 700 + self.rng.randrange(500)
        self.input_event(key, value)
        self.t += 300

    def check(self, key: str) -> None:
        self.click(key)
        self.input_event(key, "on", checked=True)

    def scroll_to(self, y: int, duration: int = 700) -> None:
        y0 = self.scroll_y
        steps = max(1, duration // 100)
        for i in range(1, steps + 1):
            e = 0.5 - math.cos(math.pi * i / steps) / 2
            self.t += 100
            self.scroll_y = round(y0 + (y - y0) * e)
            self.incremental(SOURCE_SCROLL, id=self.ids["document"], x=0, y=self.scroll_y)
        self.t += 250

    def mutate(
        self,
        texts: dict[str, str] | None = None,
        attributes: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.incremental(
            SOURCE_MUTATION,
            texts=[{"id": self.ids[k], "value": v} for k, v in (texts or {}).items()],
            attributes=[
                {"id": self.node(k), "attributes": a} for k, a in (attributes or {}).items()
            ],
            removes=[],
            adds=[],
        )


# --------------------------------------------------------------------------- scenarios


@dataclass
class Person:
    name: str
    email: str
    phone: str
    city: str
    country: str
    distinct_id: str


@dataclass
class Scenario:
    rec_id: str
    summary: str
    href: str
    width: int
    height: int
    start: datetime
    person: Person
    title: str
    css: str
    body: El
    rects: dict[str, Rect]
    script: Callable[[Timeline], None]
    mouse: tuple[float, float]
    seed: int


COUNTRIES = [
    ("", "Select a country"),
    ("GB", "United Kingdom"),
    ("IE", "Ireland"),
    ("SE", "Sweden"),
    ("US", "United States"),
]


def checkout_scenario() -> Scenario:
    """demo-1: a guest checkout — contact, shipping address, (masked) card, place order."""
    vw, vh = 1280, 800
    page = Page(main_left=(vw - 1040) // 2)
    contact = page.card("contact", 0, 88, 620, 150, "Contact")
    contact.children.append(
        page.field(
            "contact",
            "email",
            "Email",
            24,
            60,
            572,
            kind="email",
            placeholder="you@example.com",
            autocomplete="email",
        )
    )
    ship = page.card("shipping", 0, 262, 620, 550, "Shipping address")
    ship.children += [
        page.field("shipping", "full-name", "Full name", 24, 60, 572, autocomplete="name"),
        page.field(
            "shipping",
            "address1",
            "Address",
            24,
            140,
            572,
            placeholder="Street and house number",
            autocomplete="address-line1",
        ),
        page.field(
            "shipping",
            "address2",
            "Apartment, suite, etc. (optional)",
            24,
            220,
            572,
            autocomplete="address-line2",
        ),
        page.field("shipping", "city", "City", 24, 300, 278, autocomplete="address-level2"),
        page.field("shipping", "postcode", "Postcode", 318, 300, 278, autocomplete="postal-code"),
        page.field("shipping", "country", "Country", 24, 380, 572, options=COUNTRIES),
        page.field(
            "shipping",
            "phone",
            "Phone (for delivery updates)",
            24,
            460,
            572,
            kind="tel",
            autocomplete="tel",
        ),
    ]
    pay = page.card("payment", 0, 836, 620, 230, "Payment")
    pay.children += [
        page.field(
            "payment",
            "card-number",
            "Card number",
            24,
            60,
            572,
            placeholder="1234 1234 1234 1234",
            autocomplete="cc-number",
        ),
        page.field("payment", "card-expiry", "Expiry (MM/YY)", 24, 140, 278, autocomplete="cc-exp"),
        page.field("payment", "card-cvc", "Security code", 318, 140, 278, autocomplete="cc-csc"),
    ]
    summary = page.card(
        "summary",
        660,
        88,
        380,
        292,
        "Order summary",
        h(
            "div",
            {"class": "lines"},
            h(
                "div",
                {"class": "row"},
                h("span", None, "Merino crew sweater, M"),
                h("span", None, "£89.00"),
            ),
            h("div", {"class": "muted"}, "Charcoal · qty 1"),
            h(
                "div",
                {"class": "row"},
                h("span", None, "Trail socks (3-pack)"),
                h("span", None, "£24.00"),
            ),
            h("div", {"class": "muted"}, "Moss · qty 1"),
            h("div", {"class": "row"}, h("span", None, "Shipping"), h("span", None, "£4.95")),
            h("div", {"class": "row total"}, h("span", None, "Total"), h("span", None, "£117.95")),
        ),
    )
    place = page.button(None, "place-order", "Place order · £117.95", 0, 1090, 620, 52)
    notice = h(
        "div",
        {"class": "notice", "style": box(0, 1162, 620, 56)},
        Text(" ", key="notice-text"),
        key="notice",
    )
    main = h(
        "main",
        {"style": f"margin-left:{page.main_left}px;width:1040px;height:1262px"},
        h("h1", {"style": "left:0;top:28px"}, "Checkout"),
        h(
            "div",
            {"class": "crumbs", "style": "left:160px;top:40px"},
            "Cart  \u203a  Details  \u203a  Payment",
        ),
        contact,
        ship,
        pay,
        summary,
        place,
        notice,
    )
    body = h(
        "body",
        None,
        topbar("Acme ", "Outfitters", ["Shop", "Journal", "Help"], "Cart (2)"),
        main,
        key="body",
    )
    person = Person(
        "Eleanor Vance",
        "eleanor.vance@example.com",
        "+44 7700 900123",
        "Bristol",
        "GB",
        "u_7f3a9c1e-eleanor",
    )

    def script(tl: Timeline) -> None:
        tl.wait(900)
        tl.move_to("email", 1100)
        tl.click("email")
        tl.type("email", person.email)
        tl.move_to("full-name", 800)
        tl.click("full-name")
        tl.type("full-name", person.name)
        tl.tab_to("address1")
        tl.type("address1", "17 Hawthorn Lane")
        tl.tab_to("address2")
        tl.type("address2", "Flat 3")
        tl.tab_to("city")
        tl.type("city", "Bristol")
        tl.tab_to("postcode")
        tl.type("postcode", "BS1 4DJ")
        tl.scroll_to(300, 800)
        tl.move_to("country", 900)
        tl.click("country")
        tl.choose("country", "GB")
        tl.move_to("phone", 700)
        tl.click("phone")
        tl.type("phone", person.phone)
        tl.scroll_to(526, 700)
        tl.move_to("card-number", 900)
        tl.click("card-number")
        tl.type("card-number", "4242424242424242", masked=True)
        tl.tab_to("card-expiry")
        tl.type("card-expiry", "09/27", masked=True)
        tl.tab_to("card-cvc")
        tl.type("card-cvc", "123", masked=True)
        tl.move_to("place-order", 1000)
        tl.wait(400)
        tl.click("place-order", focusable=False)
        tl.mutate(
            texts={"place-order-text": "Placing order…"},
            attributes={"place-order": {"class": "btn busy"}},
        )
        tl.wait(1600)
        tl.mutate(
            texts={
                "place-order-text": "Order placed ✓",
                "notice-text": "Thanks, Eleanor! Order AC-10482 is confirmed — "
                "a receipt is on its way to eleanor.vance@example.com.",
            },
            attributes={"place-order": {"class": "btn done"}, "notice": {"class": "notice show"}},
        )
        tl.wait(1200)
        tl.move_to_point((880, 980), 900)
        tl.wait(1500)

    return Scenario(
        rec_id="demo-1",
        summary="Guest checkout: contact, shipping address and payment",
        href="https://shop.acme-outfitters.example/checkout",
        width=vw,
        height=vh,
        start=datetime(2024, 5, 14, 9, 12, 3, 412000, tzinfo=UTC),
        person=person,
        title="Checkout · Acme Outfitters",
        css=BASE_CSS,
        body=body,
        rects=page.rects,
        script=script,
        mouse=(930.0, 560.0),
        seed=1,
    )


def settings_scenario() -> Scenario:
    """demo-2: a signed-in customer updates e-mail, phone and default shipping address."""
    vw, vh = 1366, 768
    page = Page(main_left=(vw - 1040) // 2)
    side = page.card(
        "sidebar",
        0,
        88,
        230,
        236,
        "Account",
        h(
            "div",
            {"class": "lines menu"},
            *[
                h("div", {"class": "row" + (" active" if n == "Profile & address" else "")}, n)
                for n in ["Orders", "Profile & address", "Payment methods", "Security", "Sign out"]
            ],
        ),
    )
    profile = page.card("profile", 262, 88, 778, 230, "Profile")
    profile.children += [
        page.field(
            "profile", "name", "Full name", 24, 60, 350, value="Marcus Okafor", autocomplete="name"
        ),
        page.field(
            "profile",
            "email",
            "Email",
            404,
            60,
            350,
            kind="email",
            value="m.okafor@example.org",
            autocomplete="email",
        ),
        page.field(
            "profile",
            "phone",
            "Mobile phone",
            24,
            140,
            350,
            kind="tel",
            placeholder="+1 555 000 0000",
            autocomplete="tel",
        ),
        page.field("profile", "birthday", "Date of birth", 404, 140, 350, value="1986-03-21"),
    ]
    addr = page.card("address", 262, 342, 778, 310, "Default shipping address")
    addr.children += [
        page.field(
            "address",
            "street",
            "Street address",
            24,
            60,
            730,
            value="88 Alder Court",
            autocomplete="address-line1",
        ),
        page.field(
            "address", "unit", "Apartment / unit", 24, 140, 350, autocomplete="address-line2"
        ),
        page.field(
            "address", "city", "City", 404, 140, 350, value="Seattle", autocomplete="address-level2"
        ),
        page.field(
            "address", "state", "State", 24, 220, 160, value="WA", autocomplete="address-level1"
        ),
        page.field(
            "address", "zip", "ZIP code", 214, 220, 160, value="98101", autocomplete="postal-code"
        ),
        page.field("address", "country", "Country", 404, 220, 350, value="US", options=COUNTRIES),
    ]
    save = page.button(None, "save", "Save changes", 840, 676, 200, 48)
    cancel = page.button(None, "cancel", "Cancel", 624, 676, 200, 48, cls="btn ghost")
    toast = h(
        "div",
        {"class": "notice", "style": box(262, 676, 340, 48) + ";padding:13px 16px"},
        Text(" ", key="toast-text"),
        key="toast",
    )
    main = h(
        "main",
        {"style": f"margin-left:{page.main_left}px;width:1040px;height:820px"},
        h("h1", {"style": "left:0;top:28px"}, "Your account"),
        h("div", {"class": "crumbs", "style": "left:200px;top:40px"}, "Signed in as Marcus Okafor"),
        side,
        profile,
        addr,
        toast,
        cancel,
        save,
    )
    css = (
        BASE_CSS
        + ".menu .row{padding:8px 10px;border-radius:6px}"
        + ".menu .row.active{background:#eef5f1;color:#1f5c42;font-weight:600}"
    )
    body = h(
        "body",
        None,
        topbar("Acme ", "Outfitters", ["Shop", "Journal", "Help"], "Cart (0)"),
        main,
        key="body",
    )
    person = Person(
        "Marcus Okafor",
        "marcus.okafor@example.org",
        "+1 503 555 0142",
        "Portland",
        "US",
        "u_2b81d4f0-marcus",
    )

    def script(tl: Timeline) -> None:
        tl.wait(1200)
        tl.move_to("email", 1000)
        tl.click("email")
        tl.clear("email")
        tl.type("email", person.email)
        tl.move_to("phone", 900)
        tl.click("phone")
        tl.type("phone", person.phone)
        tl.wait(600)
        tl.scroll_to(80, 500)
        tl.move_to("street", 900)
        tl.click("street")
        tl.clear("street")
        tl.type("street", "2210 Juniper Street")
        tl.tab_to("unit")
        tl.type("unit", "Apt 5B")
        tl.tab_to("city")
        tl.clear("city")
        tl.type("city", "Portland")
        tl.tab_to("state")
        tl.clear("state")
        tl.type("state", "OR")
        tl.tab_to("zip")
        tl.clear("zip")
        tl.type("zip", "97205")
        tl.move_to("save", 900)
        tl.click("save", focusable=False)
        tl.mutate(texts={"save-text": "Saving…"}, attributes={"save": {"class": "btn busy"}})
        tl.wait(900)
        tl.mutate(
            texts={"save-text": "Saved ✓", "toast-text": "Your profile and address were updated."},
            attributes={"save": {"class": "btn done"}, "toast": {"class": "notice show"}},
        )
        tl.wait(1000)
        tl.move_to_point((700, 420), 800)
        tl.wait(1200)

    return Scenario(
        rec_id="demo-2",
        summary="Account settings: new e-mail, phone and shipping address",
        href="https://shop.acme-outfitters.example/account/profile",
        width=vw,
        height=vh,
        start=datetime(2024, 5, 14, 13, 47, 55, 86000, tzinfo=UTC),
        person=person,
        title="Your account · Acme Outfitters",
        css=css,
        body=body,
        rects=page.rects,
        script=script,
        mouse=(1100.0, 300.0),
        seed=2,
    )


def product_scenario() -> Scenario:
    """demo-3: product page — pick a size, add to cart, then express checkout details."""
    vw, vh = 1280, 720
    page = Page(main_left=(vw - 1040) // 2)
    photo = h(
        "div",
        {
            "class": "photo",
            "style": box(0, 88, 560, 420),
        },
        h("div", {"class": "shoe"}),
    )
    info = page.card("info", 600, 88, 440, 420, None)
    info.children += [
        h("div", {"class": "pname"}, "Trail Runner 2"),
        h("div", {"class": "pcolor muted"}, "Moss green · waterproof"),
        h("div", {"class": "price"}, "€129.00"),
        h("div", {"class": "sizes-label muted"}, "EU size"),
    ]
    for i, size in enumerate(["40", "41", "42", "43", "44"]):
        info.children.append(
            page.button("info", f"size-{size}", size, 24 + i * 80, 186, 68, 44, cls="btn ghost")
        )
    info.children.append(page.button("info", "add-to-cart", "Add to cart", 24, 262, 392, 52))
    info.children.append(
        h(
            "div",
            {"class": "muted", "style": "position:absolute;left:24px;top:336px;right:24px"},
            "Free delivery over €100 · 60-day returns",
        )
    )
    about = h(
        "section",
        {"class": "card text", "style": box(0, 540, 1040, 250)},
        h("h2", None, "About this shoe"),
        h(
            "p",
            None,
            "A light, grippy trail shoe with a recycled mesh upper and a waterproof membrane. "
            "The rock plate and 6 mm lugs keep you steady on wet roots and loose gravel, "
            "and the wide toe box stays comfortable on long days out.",
        ),
        h("p", None, "Weight 290 g (EU 42) · Drop 6 mm · Vegan materials"),
    )
    express = page.card("express", 0, 822, 1040, 330, "Express checkout")
    express.children += [
        page.field(
            "express",
            "email",
            "Email for your receipt",
            24,
            60,
            480,
            kind="email",
            autocomplete="email",
        ),
        page.field("express", "name", "Full name", 536, 60, 480, autocomplete="name"),
        page.field(
            "express", "street", "Street address", 24, 140, 480, autocomplete="street-address"
        ),
        page.field("express", "postcode", "Postcode", 536, 140, 150, autocomplete="postal-code"),
        page.field("express", "city", "City", 716, 140, 300, autocomplete="address-level2"),
        h(
            "label",
            {"class": "check", "style": "left:24px;top:230px"},
            h("input", {"type": "checkbox", "id": "updates", "name": "updates"}, key="updates-ctl"),
            " Text me delivery updates",
        ),
        page.field(
            "express", "mobile", "Mobile number", 536, 214, 480, kind="tel", autocomplete="tel"
        ),
    ]
    page.control("express", "updates", 24, 231, 18, 18)
    express.children.append(
        page.button("express", "continue", "Continue to payment", 24, 262, 480, 48)
    )
    main = h(
        "main",
        {"style": f"margin-left:{page.main_left}px;width:1040px;height:1400px"},
        h(
            "div",
            {"class": "crumbs", "style": "left:0;top:40px"},
            "Shop  \u203a  Running  \u203a  Trail shoes",
        ),
        photo,
        info,
        about,
        express,
    )
    css = (
        BASE_CSS
        + """
.photo{position:absolute;border-radius:10px;background:linear-gradient(135deg,#dfe9e2,#b9d3c3)}
.shoe{position:absolute;left:110px;top:150px;width:340px;height:120px;
  border-radius:60px 90px 24px 24px;  background:#4f7d5f;box-shadow:0 26px 0 -8px #2d3a33}
.pname{position:absolute;left:24px;top:24px;font-size:24px;font-weight:700}
.pcolor{position:absolute;left:24px;top:62px}
.price{position:absolute;left:24px;top:96px;font-size:20px;font-weight:600}
.sizes-label{position:absolute;left:24px;top:160px}
.card.text p{margin:0;position:relative;top:56px;padding:0 24px 12px;line-height:1.6;color:#3b4150}
.check{position:absolute;display:flex;align-items:center;gap:8px;color:#3b4150}
.check input{width:18px;height:18px;margin:0}
"""
    )
    body = h(
        "body",
        None,
        topbar(
            "Acme ",
            "Outfitters",
            ["Shop", "Journal", "Help"],
            h("span", None, "Cart (", Text("0", key="cart-count"), ")"),
        ),
        main,
        key="body",
    )
    person = Person(
        "Sofia Lindqvist",
        "sofia.lindqvist@example.net",
        "+46 70 123 45 67",
        "Stockholm",
        "SE",
        "u_c04e6a57-sofia",
    )

    def script(tl: Timeline) -> None:
        tl.wait(1500)
        tl.move_to("size-42", 1000)
        tl.click("size-42", focusable=False)
        tl.mutate(attributes={"size-42": {"class": "btn ghost selected"}})
        tl.wait(700)
        tl.move_to("add-to-cart", 700)
        tl.click("add-to-cart", focusable=False)
        tl.mutate(
            texts={"cart-count": "1", "add-to-cart-text": "Added to cart ✓"},
            attributes={"add-to-cart": {"class": "btn done"}},
        )
        tl.wait(1200)
        tl.scroll_to(300, 900)
        tl.wait(1800)  # reading the description
        tl.scroll_to(620, 900)
        tl.move_to("email", 1000)
        tl.click("email")
        tl.type("email", person.email)
        tl.tab_to("name")
        tl.type("name", person.name)
        tl.move_to("street", 800)
        tl.click("street")
        tl.type("street", "Storgatan 12")
        tl.move_to("postcode", 700)
        tl.click("postcode")
        tl.type("postcode", "114 55")
        tl.tab_to("city")
        tl.type("city", "Stockholm")
        tl.move_to("updates", 900)
        tl.check("updates")
        tl.move_to("mobile", 700)
        tl.click("mobile")
        tl.type("mobile", person.phone)
        tl.move_to("continue", 900)
        tl.click("continue", focusable=False)
        tl.mutate(
            texts={"continue-text": "Loading payment…"},
            attributes={"continue": {"class": "btn busy"}},
        )
        tl.wait(1500)

    return Scenario(
        rec_id="demo-3",
        summary="Product page: add to cart, then express checkout details",
        href="https://shop.acme-outfitters.example/products/trail-runner-2?color=moss",
        width=vw,
        height=vh,
        start=datetime(2024, 5, 15, 7, 3, 41, 730000, tzinfo=UTC),
        person=person,
        title="Trail Runner 2 · Acme Outfitters",
        css=css,
        body=body,
        rects=page.rects,
        script=script,
        mouse=(640.0, 380.0),
        seed=3,
    )


# --------------------------------------------------------------------------- output


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build(sc: Scenario) -> tuple[list[Json], Json]:
    node, ids = serialize(sc.title, sc.css, sc.body)
    start_ms = int(sc.start.timestamp() * 1000)
    tl = Timeline(start_ms, ids, sc.rects, random.Random(sc.seed), sc.mouse)
    tl.emit(EVENT_META, {"href": sc.href, "width": sc.width, "height": sc.height})
    tl.t += 3
    tl.emit(EVENT_FULL_SNAPSHOT, {"node": node, "initialOffset": {"left": 0, "top": 0}})
    sc.script(tl)
    tl.flush_moves()
    events = tl.events
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps), f"{sc.rec_id}: timestamps not increasing"
    end_ms = stamps[-1]
    duration = round((end_ms - start_ms) / 1000)
    active = len({(ts - start_ms) // 1000 for ts in stamps})
    p = sc.person
    person_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"jitgate-demo:person:{p.distinct_id}"))
    meta: Json = {
        "id": sc.rec_id,
        "distinct_id": p.distinct_id,
        "viewed": False,
        "recording_duration": duration,
        "active_seconds": min(active, duration),
        "inactive_seconds": max(0, duration - active),
        "start_time": iso(start_ms),
        "end_time": iso(end_ms),
        "click_count": tl.counts["clicks"],
        "keypress_count": tl.counts["keys"],
        "mouse_activity_count": tl.counts["moves"] + tl.counts["interactions"],
        "console_log_count": 0,
        "console_warn_count": 0,
        "console_error_count": 0,
        "start_url": sc.href,
        "snapshot_source": "web",
        "storage": "object_storage",
        "ongoing": False,
        "event_count": len(events),
        "summary": sc.summary,
        "viewport": {"width": sc.width, "height": sc.height},
        "person": {
            "id": person_uuid,
            "uuid": person_uuid,
            "name": p.name,
            "distinct_ids": [p.distinct_id],
            "properties": {
                "name": p.name,
                "email": p.email,
                "phone": p.phone,
                "$geoip_city_name": p.city,
                "$geoip_country_code": p.country,
            },
            "created_at": iso(start_ms - 86_400_000 * 40),
        },
    }
    return events, meta


def dump_events(events: list[Json]) -> str:
    """One event per line: compact, but readable in a diff."""
    lines = [json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in events]
    return "[\n" + ",\n".join(lines) + "\n]\n"


def render_all() -> dict[str, str]:
    files: dict[str, str] = {}
    index: list[Json] = []
    for sc in (checkout_scenario(), settings_scenario(), product_scenario()):
        events, meta = build(sc)
        files[f"{sc.rec_id}.json"] = dump_events(events)
        index.append(meta)
    doc = {"project_id": PROJECT_ID, "recordings": index}
    files["index.json"] = json.dumps(doc, ensure_ascii=False, indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    parser.add_argument("--check", action="store_true", help="only check the files are current")
    args = parser.parse_args(argv)
    out: Path = args.out
    files = render_all()
    if args.check:
        stale = [n for n, text in files.items() if _read(out / n) != text]
        for name in stale:
            print(f"stale: {out / name}", file=sys.stderr)
        return 1 if stale else 0
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        print(f"wrote {out / name} ({len(text.encode())} bytes)")
    return 0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
