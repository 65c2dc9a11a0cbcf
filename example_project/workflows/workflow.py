"""The example workflow: an order (the parent) with payment, stock and shipping children.

Plain Python, no Django: worker processes import this module (to unpickle their target
and the events) before they call ``django.setup()``.

A customer's events (created, one per item added, submitted) reach the order in any
order. Once the order is complete it starts two child workflows, payment and stock; the
payment provider and the warehouse answer them (``service_replies``); each child reports
back to its parent when it is done, and then the order starts its shipping child. Every
handler is idempotent: a state lists the events it applied (``applied``) and what each one
emitted (``outbox``), so a redelivered event that had already landed changes nothing and
emits the same events again.
"""

from __future__ import annotations

import copy
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import random

CHILDREN = ("payment", "stock", "shipping")
INITIATOR = "demo.shop.checkout"
# Where a service call goes: its machine id is the service's name after this prefix.
SERVICE = "service:"

CATALOG = (("mug", 1250), ("t-shirt", 2400), ("poster", 900), ("stickers", 450), ("hoodie", 5200))
CUSTOMERS = ("ada", "grace", "linus", "margaret", "guido", "barbara", "ken", "radia")


@dataclass(frozen=True, slots=True)
class Event:
    machine_id: str  # the workflow it is for, or SERVICE + name for a service call
    type: str  # "order.item_added"
    key: str  # unique among the machine's events: the type, "#n" added when it repeats
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.machine_id}|{self.key}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        return cls(data["machine_id"], data["type"], data["key"], dict(data.get("data", {})))


@dataclass(frozen=True, slots=True)
class Order:
    """One order of the run, as the shop placed it: what its workflows must end up with."""

    machine_id: str
    customer: str
    items: tuple[tuple[str, int, int], ...]  # sku, quantity, unit price in cents

    @property
    def total(self) -> int:
        return sum(quantity * price for _, quantity, price in self.items)

    def child(self, kind: str) -> str:
        return f"{self.machine_id}/{kind}"

    def placed(self) -> list[Event]:
        """The customer's events, in the order the shop sent them."""
        events = [
            Event(self.machine_id, "order.created", "order.created", {"customer": self.customer})
        ]
        for number, (sku, quantity, price) in enumerate(self.items, 1):
            item = {"sku": sku, "quantity": quantity, "price": price}
            events.append(
                Event(self.machine_id, "order.item_added", f"order.item_added#{number}", item)
            )
        submitted = {"items": len(self.items)}
        events.append(Event(self.machine_id, "order.submitted", "order.submitted", submitted))
        return events

    def expected(self) -> dict[str, list[str]]:
        """Every workflow of this order and the event keys it must have applied, once each."""
        count = len(self.items)
        return {
            self.machine_id: [
                *(event.key for event in self.placed()),
                "payment.completed",
                "stock.completed",
                "shipping.completed",
            ],
            self.child("payment"): ["payment.requested", "payment.authorized", "payment.captured"],
            self.child("stock"): [
                "stock.requested",
                *(f"stock.reserved#{n}" for n in range(1, count + 1)),
            ],
            self.child("shipping"): [
                "shipping.requested",
                "shipping.packed",
                "shipping.dispatched",
            ],
        }


def plan_orders(run: str, events: int, rng: random.Random) -> list[Order]:
    """Orders of one to four items under ``run``, enough for about ``events`` events."""
    orders: list[Order] = []
    total = 0
    while not orders or total < events:
        items = tuple(
            (sku, rng.randint(1, 3), price) for sku, price in rng.sample(CATALOG, rng.randint(1, 4))
        )
        order = Order(f"{run}/order-{len(orders) + 1:03d}", rng.choice(CUSTOMERS), items)
        orders.append(order)
        total += sum(len(keys) for keys in order.expected().values())
    return orders


def arrivals(
    orders: list[Order], rng: random.Random, spacing: float = 0.12, spread: float = 0.6
) -> list[tuple[float, Event]]:
    """When each placed event reaches the broker, in seconds from the start: a new order
    every ``spacing`` seconds, its events within ``spread`` seconds after it, in order per
    order (as customers shop at the same time: several orders' events interleave)."""
    timed = []
    for number, order in enumerate(orders):
        start = number * spacing
        offsets = sorted(rng.uniform(0, spread) for _ in order.placed())
        timed += [
            (start + offset, event) for offset, event in zip(offsets, order.placed(), strict=True)
        ]
    return sorted(timed, key=lambda pair: pair[0])


def kind_of(machine_id: str) -> str:
    last = machine_id.rsplit("/", 1)[-1]
    return last if last in CHILDREN else "order"


@dataclass(frozen=True, slots=True)
class Step:
    """What handling one event does: the next state (None: it was applied already, store
    nothing) and the events it emits once that state is stored."""

    state: dict[str, Any] | None
    emits: tuple[Event, ...]


def apply(prev: dict[str, Any] | None, event: Event, worker: str) -> Step:
    """Handle ``event`` on ``prev`` (left as it is)."""
    if prev is not None and event.key in prev["applied"]:
        # A redelivery of an event whose write landed (its worker died before it could
        # say so): nothing to store, and the same events to emit as the first time.
        emitted = prev["outbox"].get(event.key, [])
        return Step(None, tuple(Event.from_dict(e) for e in emitted))
    kind = kind_of(event.machine_id)
    state = copy.deepcopy(prev) if prev is not None else new_state(kind, event.machine_id)
    emits = HANDLERS[kind](state, event)
    state["applied"].append(event.key)
    if emits:
        state["outbox"][event.key] = [e.as_dict() for e in emits]
    state["lastWorker"] = worker
    return Step(state, tuple(emits))


def new_state(kind: str, machine_id: str) -> dict[str, Any]:
    # subject, parentSubject, initiator, source and executionStatus are Arvo's metadata:
    # the memory copies them into indexed columns (the admin's filters, children_of()).
    parent = machine_id.rsplit("/", 1)[0] if kind != "order" else None
    state: dict[str, Any] = {
        "subject": machine_id,
        "parentSubject": parent,
        "initiator": INITIATOR if kind == "order" else "demo.order.handler",
        "source": f"demo.{kind}.handler",
        "executionStatus": "active",
        "applied": [],
        "outbox": {},
    }
    if kind == "order":
        state.update(stage="open", customer=None, items=[], expectedItems=None, total=0)
        state["children"] = {}
    elif kind == "payment":
        state.update(amount=None, authorized=False, captured=False)
    elif kind == "stock":
        state.update(items=None, reserved=[])
    else:
        state.update(customer=None, packed=False, dispatched=False, tracking=None)
    return state


def on_order(state: dict[str, Any], event: Event) -> list[Event]:
    data, machine_id = event.data, event.machine_id
    if event.type == "order.created":
        state["customer"] = data["customer"]
    elif event.type == "order.item_added":
        state["items"].append(data)
        state["total"] += data["quantity"] * data["price"]
    elif event.type == "order.submitted":
        state["expectedItems"] = data["items"]
    elif event.type.endswith(".completed"):
        state["children"][event.type.split(".")[0]] = "done"
    children = state["children"]
    if (
        state["stage"] == "open"
        and state["customer"] is not None
        and state["expectedItems"] == len(state["items"])
    ):
        state["stage"] = "paying"
        children.update(payment="requested", stock="requested")
        lines = [{"sku": item["sku"], "quantity": item["quantity"]} for item in state["items"]]
        payment = {"amount": state["total"]}
        return [
            Event(f"{machine_id}/payment", "payment.requested", "payment.requested", payment),
            Event(f"{machine_id}/stock", "stock.requested", "stock.requested", {"items": lines}),
        ]
    if state["stage"] == "paying" and children["payment"] == children["stock"] == "done":
        state["stage"] = "shipping"
        children["shipping"] = "requested"
        request = {"customer": state["customer"]}
        return [
            Event(f"{machine_id}/shipping", "shipping.requested", "shipping.requested", request)
        ]
    if state["stage"] == "shipping" and children["shipping"] == "done":
        state["stage"] = "done"
        state["executionStatus"] = "done"
    return []


def on_payment(state: dict[str, Any], event: Event) -> list[Event]:
    if event.type == "payment.requested":
        state["amount"] = event.data["amount"]
        return [call("payment", "payment.charge", event.machine_id, amount=state["amount"])]
    state[event.type.split(".")[1]] = True  # authorized, captured: in whichever order
    if state["amount"] is not None and state["authorized"] and state["captured"]:
        return complete(state, event.machine_id, amount=state["amount"])
    return []


def on_stock(state: dict[str, Any], event: Event) -> list[Event]:
    if event.type == "stock.requested":
        state["items"] = event.data["items"]
        return [call("warehouse", "stock.reserve", event.machine_id, items=state["items"])]
    state["reserved"].append(event.data["sku"])
    if state["items"] is not None and len(state["reserved"]) == len(state["items"]):
        return complete(state, event.machine_id, reserved=sorted(state["reserved"]))
    return []


def on_shipping(state: dict[str, Any], event: Event) -> list[Event]:
    if event.type == "shipping.requested":
        state["customer"] = event.data["customer"]
        return [call("carrier", "shipping.book", event.machine_id, customer=state["customer"])]
    if event.type == "shipping.packed":
        state["packed"] = True
    else:
        state["dispatched"], state["tracking"] = True, event.data["tracking"]
    if state["customer"] is not None and state["packed"] and state["dispatched"]:
        return complete(state, event.machine_id, tracking=state["tracking"])
    return []


HANDLERS = {"order": on_order, "payment": on_payment, "stock": on_stock, "shipping": on_shipping}


def call(service: str, type: str, reply_to: str, **data: Any) -> Event:
    return Event(f"{SERVICE}{service}", type, f"{type}:{reply_to}", {"replyTo": reply_to, **data})


def complete(state: dict[str, Any], machine_id: str, **result: Any) -> list[Event]:
    """The child is done: it tells its parent."""
    state["executionStatus"] = "done"
    kind = kind_of(machine_id)
    parent = state["parentSubject"]
    return [Event(parent, f"{kind}.completed", f"{kind}.completed", result)]


def service_replies(call: Event) -> list[Event]:
    """The outside world: what the payment provider, the warehouse and the carrier send
    back to the workflow that called them (webhooks, as they would arrive)."""
    to = call.data["replyTo"]
    if call.type == "payment.charge":
        return [
            Event(to, "payment.authorized", "payment.authorized", {"amount": call.data["amount"]}),
            Event(to, "payment.captured", "payment.captured", {"amount": call.data["amount"]}),
        ]
    if call.type == "stock.reserve":
        return [
            Event(to, "stock.reserved", f"stock.reserved#{number}", {"sku": line["sku"]})
            for number, line in enumerate(call.data["items"], 1)
        ]
    # The same number in every process (hash() of a str is salted per process).
    tracking = f"TRK-{zlib.crc32(to.encode()):010d}"
    return [
        Event(to, "shipping.packed", "shipping.packed", {}),
        Event(to, "shipping.dispatched", "shipping.dispatched", {"tracking": tracking}),
    ]


def verify(
    order: Order, states: dict[str, dict[str, Any] | None], expected: dict[str, list[str]]
) -> list[str]:
    """What is wrong with ``order``'s workflows as stored, against the events each had to
    apply (``expected``, by machine id): an empty list when nothing is."""
    problems: list[str] = []
    for machine_id, keys in expected.items():
        state = states.get(machine_id)
        if state is None:
            problems.append(f"{machine_id}: no state stored")
            continue
        applied = Counter(state["applied"])
        for key in keys:
            if applied[key] != 1:
                problems.append(f"{machine_id}: {key} applied {applied[key]} times")
        unexpected = set(applied) - set(keys)
        if unexpected:
            problems.append(f"{machine_id}: unexpected events {sorted(unexpected)}")
    order_state = states.get(order.machine_id)
    if order_state is not None and (
        order_state["total"] != order.total or len(order_state["items"]) != len(order.items)
    ):
        problems.append(
            f"{order.machine_id}: {len(order_state['items'])} items for "
            f"{order_state['total']}, placed {len(order.items)} for {order.total}"
        )
    if len(expected) == 1:  # the order's own events only (demo --celery)
        return problems
    children = {kind: states.get(order.child(kind)) or {} for kind in CHILDREN}
    finished = [order_state or {}, *children.values()]
    if any(state.get("executionStatus") != "done" for state in finished):
        problems.append(f"{order.machine_id}: not every workflow of the order is done")
    if children["payment"].get("amount") != order.total:
        problems.append(f"{order.child('payment')}: charged {children['payment'].get('amount')}")
    if sorted(children["stock"].get("reserved", [])) != sorted(sku for sku, _, _ in order.items):
        problems.append(f"{order.child('stock')}: reserved {children['stock'].get('reserved')}")
    return problems
