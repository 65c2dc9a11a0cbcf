"""Admin for machine states and their locks.

Both models live on ``MACHINE_MEMORY['DATABASE']``, which need not be "default": every
query and write goes through that alias, the way Django's multiple-database docs describe a
"using" admin. Lists stay fast on tables with millions of rows: no per-row queries, no
exact COUNT(*), filters built from index seeks, sorting only on indexed columns.

Read-only by default (``ADMIN_READONLY``): workers own the states, and an edit through a
form would bypass the compare-and-set. When it is turned off, a state's document can be
edited, and the edit is a ``MachineMemory.overwrite`` at the version the form showed: a
state written meanwhile is refused, and the page then shows the stored document
(docs/contract.md#write, docs/contract.md#settings).
"""

from __future__ import annotations

import datetime
import functools
import json
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import quote, unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import Q
from django.http import HttpResponseRedirect
from django.urls import reverse
from django.utils.formats import localize
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.timezone import localtime

from machine_memory.conf import conf
from machine_memory.exceptions import (
    LockError,
    MachineMemoryError,
    WriteConflict,
    WriteOutcomeUnknown,
)
from machine_memory.models import MachineLock, MachineState
from machine_memory.validation import DOCUMENT_KEYS, METADATA_KEYS

if TYPE_CHECKING:
    from collections.abc import Iterable

    from django.db.models import Model, QuerySet
    from django.http import HttpRequest, HttpResponse
    from django.utils.safestring import SafeString

    from machine_memory.memory import MachineMemory
    from machine_memory.models import MachineLockQuerySet, MachineStateQuerySet

    ModelAdmin = admin.ModelAdmin[Any]
else:
    ModelAdmin = admin.ModelAdmin

# An exact count of a large table reads all of it (PostgreSQL, InnoDB): lists count this
# many rows at most and say "10000+" beyond (the first pages stay reachable; filters and
# search narrow the rest).
COUNT_CAP = 10_000
# Distinct values offered by the status and source filters (one index seek each).
FILTER_CHOICES = 50
# Children linked from a state's page; the rest are one click away in the filtered list.
CHILDREN_SHOWN = 20
# Rows a "purge expired" action deletes per statement.
PURGE_BATCH = 1000


def memory() -> MachineMemory:
    from machine_memory.memory import MachineMemory

    return MachineMemory(using=conf.DATABASE)


def state_url(machine_id: str) -> str:
    return reverse("admin:machine_memory_machinestate_change", args=[quote(machine_id)])


def lock_url(machine_id: str) -> str:
    return reverse("admin:machine_memory_machinelock_change", args=[quote(machine_id)])


def owner_html(owner: str) -> SafeString:
    """A lock owner cut to the column's width with an ellipsis, whole in its title.

    The REST API's owners are ``"api:"`` and a 64-digit hash, long enough to push a list
    past a laptop's screen (the CSS is in templates/admin/machine_memory/styles.html).
    """
    return format_html('<span class="machine-memory-owner" title="{}">{}</span>', owner, owner)


def seconds_text(delta: datetime.timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class CappedCountPaginator(Paginator):  # type: ignore[type-arg]
    """Counts at most ``COUNT_CAP`` rows (``COUNT(*)`` of a LIMITed subquery)."""

    capped = False

    @cached_property
    def count(self) -> int:
        rows = cast("QuerySet[Any]", self.object_list)
        # Keys only, unordered: the list's annotations and ORDER BY would be computed for
        # every counted row.
        counted = rows.order_by().values("pk")[: COUNT_CAP + 1].count()
        self.capped = counted > COUNT_CAP
        return min(counted, COUNT_CAP)


class SortableByOnlyChangeList(ChangeList):
    """Ignores ``?o=`` for columns outside ``sortable_by``: Django only hides their links.

    Refuses NUL in filter and search values and in the ids an action selects, the way
    Django refuses a lookup it cannot run (a redirect to ``?e=1``): PostgreSQL raises on
    NUL in a text parameter, and no id, status or source can hold one
    (docs/contract.md#ids).
    """

    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> Any:
        # POST too: an action names its rows by id (_selected_action).
        for params in (request.GET, request.POST):
            if any("\x00" in value for _, values in params.lists() for value in values):
                raise IncorrectLookupParameters("NUL in a filter, search or selected id.")
        if exclude_parameters is None:  # Django 4.2 has no such argument
            return super().get_queryset(request)
        return super().get_queryset(request, exclude_parameters)

    def get_ordering_field(self, field_name: Any) -> Any:
        if self.sortable_by is not None and field_name not in self.sortable_by:
            return None
        return super().get_ordering_field(field_name)


class UsingDatabaseAdmin(ModelAdmin):
    """Queries and writes on ``MACHINE_MEMORY['DATABASE']``; fast lists on big tables."""

    paginator = CappedCountPaginator
    # The search box matches these indexed columns exactly, or by prefix when the term ends
    # with "*" (a LIKE that scans the table): never Django's icontains over every row.
    exact_search_fields: tuple[str, ...] = ("machine_id",)
    # The REST API's order (cursor pagination on the id, ascending): the same rows in the
    # same order in both, sorted by the database in the id column's collation. Without it
    # the admin would sort by "-pk".
    ordering = ("machine_id",)
    # Django's "N total" next to a filtered count would be a second full COUNT(*).
    show_full_result_count = False
    # Facet counts (Django >= 5.0) are one COUNT per filter choice.
    if hasattr(admin, "ShowFacets"):
        show_facets = admin.ShowFacets.NEVER
    list_per_page = 50

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        lookup, value = (
            ("startswith", term[:-1]) if term.endswith("*") and len(term) > 1 else ("exact", term)
        )
        match = functools.reduce(
            operator.or_, (Q(**{f"{field}__{lookup}": value}) for field in self.exact_search_fields)
        )
        return queryset.filter(match), False

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return SortableByOnlyChangeList

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return super().get_queryset(request).using(conf.DATABASE)

    def get_object(
        self, request: HttpRequest, object_id: str, from_field: str | None = None
    ) -> Any:
        if "\x00" in unquote(object_id):  # no id holds NUL, and PostgreSQL refuses it
            return None
        return super().get_object(request, object_id, from_field)

    def save_model(self, request: HttpRequest, obj: Model, form: Any, change: bool) -> None:
        obj.save(using=conf.DATABASE)

    def delete_model(self, request: HttpRequest, obj: Model) -> None:
        obj.delete(using=conf.DATABASE)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        queryset.using(conf.DATABASE).delete()

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Rows are created by workers (states) and by lock() (locks), never by hand.
        return False

    def has_release_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("machine_memory.change_machinelock")

    @admin.action(description="Release the locks of the selected machines", permissions=["release"])
    def release_locks(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        mem = memory()
        if not mem.locks.supports_force_release:
            mem.close()
            self.message_user(
                request,
                f"The lock backend {type(mem.locks).__name__} cannot force-release locks: "
                "nothing was released.",
                messages.ERROR,
            )
            return
        released: list[str] = []
        try:
            for machine_id in queryset.values_list("pk", flat=True):
                info = mem.force_unlock(machine_id)
                if info is not None:
                    released.append(f"{machine_id} (held by {info.owner}, token {info.token})")
        except LockError as exc:
            self.message_user(request, f"Releasing locks failed: {exc}", messages.ERROR)
        finally:
            mem.close()
        if released:
            self.message_user(
                request,
                f"Released {len(released)} lock(s): {'; '.join(released)}.",
                messages.SUCCESS,
            )
        else:
            self.message_user(request, "None of the selected machines had a live lock.")


# -- list filters ------------------------------------------------------------------------


class IndexedValuesFilter(admin.SimpleListFilter):
    """Choices from the distinct values of an indexed column, found by index seeks."""

    field = ""

    def lookups(self, request: HttpRequest, model_admin: Any) -> Iterable[tuple[str, str]]:
        values = MachineState.objects.using(conf.DATABASE).distinct_values(
            self.field, FILTER_CHOICES
        )
        return [(value, value or '""') for value in values]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        value = self.value()
        return None if value is None else queryset.filter(**{self.field: value})


class ExecutionStatusFilter(IndexedValuesFilter):
    title = "execution status"
    parameter_name = "status"
    field = "execution_status"


class SourceFilter(IndexedValuesFilter):
    title = "source"
    parameter_name = "source"
    field = "source"


class LockStatusFilter(admin.SimpleListFilter):
    title = "lock status"
    parameter_name = "lock"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Iterable[tuple[str, str]]:
        return [("live", "live"), ("expired", "expired"), ("none", "no lock")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        states = cast("MachineStateQuerySet", queryset)
        return {
            "live": states.with_live_lock,
            "expired": states.with_expired_lock,
            "none": states.without_lock,
        }.get(self.value() or "", lambda: None)()


class RootsFilter(admin.SimpleListFilter):
    title = "hierarchy"
    parameter_name = "roots"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Iterable[tuple[str, str]]:
        return [("yes", "roots only (no parent)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        if self.value() == "yes":
            return cast("MachineStateQuerySet", queryset).roots()
        return None


class LockLiveFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "live"

    def lookups(self, request: HttpRequest, model_admin: Any) -> Iterable[tuple[str, str]]:
        return [("yes", "live"), ("no", "expired or released")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any] | None:
        locks = cast("MachineLockQuerySet", queryset)
        if self.value() == "yes":
            return locks.live()
        if self.value() == "no":
            return locks.expired()
        return None


# -- machine states ----------------------------------------------------------------------


class StateForm(forms.ModelForm):  # type: ignore[type-arg]
    """The document, plus the version it was shown at (the compare-and-set's expectation)."""

    shown_version = forms.IntegerField(widget=forms.HiddenInput)

    class Meta:
        model = MachineState
        fields = ("state",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["shown_version"].initial = self.instance.version

    def clean_state(self) -> Any:
        value = self.cleaned_data["state"]
        if not isinstance(value, dict):
            raise ValidationError("The state must be a JSON object.")
        return value


# Set on the request when MachineMemory refused an edit (a Refusal), for response_change.
REFUSED = "_machine_memory_refused"


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an edit was not saved, and whether the state still exists to be shown."""

    message: str
    level: int = messages.ERROR
    gone: bool = False


@admin.register(MachineState)
class MachineStateAdmin(UsingDatabaseAdmin):
    list_display = (
        "machine_id",
        "status_text",
        "source_text",
        "parent",
        "version",
        "updated_at",
        "lock_status",
    )
    # The primary key only: the list adds "-pk" to any other ordering to make it total,
    # and ORDER BY <status or source>, pk sorts the whole table (seconds at 1,000,000 rows).
    sortable_by = ("machine_id",)
    list_filter = (ExecutionStatusFilter, SourceFilter, LockStatusFilter, RootsFilter)
    # Only shows the search box: get_search_results matches exactly, on indexes.
    search_fields = ("machine_id",)
    exact_search_fields = ("machine_id", "parent_id", "source")
    search_help_text = (
        "Exact machine id, parent id or source. End with * for a prefix (scans the table)."
    )
    form = StateForm
    actions = ("release_locks", "delete_selected")
    readonly_fields = (
        "machine_id",
        "version",
        "status_text",
        "parent",
        "children",
        "initiator_text",
        "source_text",
        "created_at",
        "updated_at",
        "lock",
        "pretty_state",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        return cast("MachineStateQuerySet", super().get_queryset(request)).with_lock()

    # -- deleting: never a state whose lock is live, as purge_machine_states ------------

    # Named as Django's own delete action, so it stands in for it (a ModelAdmin's action
    # replaces the site's action of the same name).
    @admin.action(
        description="Delete selected machine states (not those with a live lock)",
        permissions=["delete"],
    )
    def delete_selected(self, request: HttpRequest, queryset: QuerySet[Any]) -> Any:
        """Django's delete action, on the selected states without a live lock."""
        from django.contrib.admin.actions import delete_selected as djangos_delete_selected

        states = cast("MachineStateQuerySet", queryset)
        kept = states.with_live_lock().count()
        if kept:
            self.message_user(
                request,
                f"{kept} of the selected machine states have a live lock: a worker is in the "
                "middle of its cycle. They are not deleted; release their locks first, or wait.",
                messages.WARNING,
            )
        deletable = states.without_live_lock()
        if not deletable.exists():
            return None
        return djangos_delete_selected(self, request, deletable)

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        machine_id = unquote(object_id)
        live = live_lock(machine_id) if "\x00" not in machine_id else None
        if live is not None:
            self.message_user(
                request, f"Not deleted: {locked_refusal(machine_id, live)}", messages.ERROR
            )
            return HttpResponseRedirect(state_url(machine_id))
        return super().delete_view(request, object_id, extra_context)

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        # One DELETE that skips the state if its lock went live since the confirmation.
        deleted, _ = (
            MachineState.objects.using(conf.DATABASE).filter(pk=obj.pk).without_live_lock().delete()
        )
        if not deleted:
            live = live_lock(obj.pk)
            reason = locked_refusal(obj.pk, live) if live else "it changed meanwhile."
            setattr(request, REFUSED, Refusal(f"Not deleted: {reason}"))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        ids = list(queryset.values_list("pk", flat=True))
        MachineState.objects.using(conf.DATABASE).filter(pk__in=ids).without_live_lock().delete()

    def response_delete(self, request: HttpRequest, obj_display: str, obj_id: Any) -> HttpResponse:
        refused: Refusal | None = getattr(request, REFUSED, None)
        if refused is None:
            return super().response_delete(request, obj_display, obj_id)
        self.message_user(request, refused.message, refused.level)
        return HttpResponseRedirect(state_url(str(obj_id)))

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields: tuple[str, ...] = self.readonly_fields
        if self.has_change_permission(request, obj):
            fields += ("state", "shown_version")
        return fields

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return not conf.ADMIN_READONLY and super().has_change_permission(request, obj)

    # -- columns and fields --------------------------------------------------------------

    # Empty values, whatever is missing (a parent, a lock, children, a metadata column),
    # are spelled one way: get_empty_value_display(), Django's empty_value_display.

    def text_or_empty(self, value: str | None) -> str:
        """A metadata column's value: NULL (unknown) as every empty value, "" visibly."""
        if value is None:
            return self.get_empty_value_display()
        return value or '""'

    @admin.display(description="execution status")
    def status_text(self, obj: MachineState) -> str:
        return self.text_or_empty(obj.execution_status)

    @admin.display(description="source")
    def source_text(self, obj: MachineState) -> str:
        return self.text_or_empty(obj.source)

    @admin.display(description="initiator")
    def initiator_text(self, obj: MachineState) -> str:
        return self.text_or_empty(obj.initiator)

    @admin.display(description="parent")
    def parent(self, obj: MachineState) -> str:
        if not obj.parent_id:  # no parent, or "" (no machine's id)
            return self.text_or_empty(obj.parent_id)
        return format_html('<a href="{}">{}</a>', state_url(obj.parent_id), obj.parent_id)

    @admin.display(description="lock")
    def lock_status(self, obj: MachineState) -> str:
        owner = getattr(obj, "lock_owner", None)
        if owner is None:
            return self.get_empty_value_display()
        status = "live" if getattr(obj, "lock_live", False) else "expired"
        # The owner under the status: a column as narrow as the owner's cut.
        return format_html("{}<br>{}", status, owner_html(owner))

    @admin.display(description="children")
    def children(self, obj: MachineState) -> str:
        ids = list(
            MachineState.objects.using(conf.DATABASE)
            .children_of(obj.machine_id)
            .order_by("pk")
            .values_list("pk", flat=True)[: CHILDREN_SHOWN + 1]
        )
        if not ids:
            return self.get_empty_value_display()
        links = format_html_join(
            ", ", '<a href="{}">{}</a>', ((state_url(i), i) for i in ids[:CHILDREN_SHOWN])
        )
        if len(ids) <= CHILDREN_SHOWN:
            return links
        everything = reverse("admin:machine_memory_machinestate_changelist")
        query = urlencode({"parent_id__exact": obj.machine_id})
        return format_html('{} … <a href="{}?{}">all children</a>', links, everything, query)

    @admin.display(description="state")
    def pretty_state(self, obj: MachineState) -> str:
        text = json.dumps(obj.state, indent=2, ensure_ascii=False, sort_keys=True)
        # format_html escapes the document: a state may hold any text, markup included.
        return format_html('<pre class="machine-memory-state">{}</pre>', text)

    @admin.display(description="lock")
    def lock(self, obj: MachineState) -> str:
        row = (
            MachineLock.objects.using(conf.DATABASE).with_clock().filter(pk=obj.machine_id).first()
        )
        if row is not None:
            return format_html(
                '{} <a href="{}">(lock row)</a>', describe_lock(row), lock_url(row.pk)
            )
        mem = memory()
        try:
            if mem.locks.supports_listing:
                # The lock rows are the whole truth, and there is none.
                return self.get_empty_value_display()
            info = mem.lock_info(obj.machine_id)
        except LockError as exc:
            return f"unknown: {exc}"
        finally:
            mem.close()
        if info is None:  # none live (this backend keeps no expired locks)
            return self.get_empty_value_display()
        return (
            f"live: {info.owner}, token {info.token}, acquired {when(info.acquired_at)}"
            f", expires {when(info.expires_at)}"
        )

    # -- editing (ADMIN_READONLY = False) ------------------------------------------------

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        # Through MachineMemory: validation, version bump and metadata as for any write, in
        # one compare-and-set at the version the form was shown at (overwrite() under a
        # row lock): a state written since is refused, whoever wrote it.
        shown: int = form.cleaned_data["shown_version"]
        data = form.cleaned_data["state"]
        # ``obj`` is the row as this request loaded it (the form changes only ``state``):
        # when its version is the one shown, its metadata columns are the shown version's.
        kept = {"parent_subject": obj.parent_id, "initiator": obj.initiator, "source": obj.source}
        # Keep metadata that workers passed beside the document, unless the document
        # itself now names it.
        named = {DOCUMENT_KEYS[key] for key in data if key in DOCUMENT_KEYS}
        metadata = {key: kept[key] for key, column in METADATA_KEYS.items() if column not in named}
        mem = memory()
        try:
            if obj.version != shown:  # stale already when this request loaded the row
                raise WriteConflict(obj.pk, shown, obj.version)
            obj.version = mem.overwrite(obj.pk, data, version=shown, metadata=metadata)
        except WriteConflict as exc:
            setattr(request, REFUSED, stale_refusal(exc, shown))
        except WriteOutcomeUnknown as exc:
            setattr(
                request,
                REFUSED,
                Refusal(
                    f"The save may or may not have been stored ({exc}). This page shows "
                    "what is stored now: check it before saving again.",
                    messages.WARNING,
                ),
            )
        except (MachineMemoryError, ValueError) as exc:
            setattr(request, REFUSED, Refusal(f"The state was not saved: {exc}"))
        finally:
            mem.close()

    def log_change(self, request: HttpRequest, obj: Any, message: Any) -> Any:
        # Nothing changed when MachineMemory refused the edit: no "Changed" history entry.
        if getattr(request, REFUSED, None) is not None:
            return None
        return super().log_change(request, obj, message)

    def response_change(self, request: HttpRequest, obj: Any) -> HttpResponse:
        refused: Refusal | None = getattr(request, REFUSED, None)
        if refused is None:
            return super().response_change(request, obj)
        self.message_user(request, refused.message, refused.level)
        if refused.gone:
            return HttpResponseRedirect(reverse("admin:machine_memory_machinestate_changelist"))
        # A fresh GET of this page: the form and the document show the stored state and
        # its version, never the rejected document (which a re-rendered POST would hold).
        return HttpResponseRedirect(request.get_full_path())


def live_lock(machine_id: str) -> MachineLock | None:
    """The live lock row of ``machine_id``, with the database's clock for describe_lock."""
    rows = MachineLock.objects.using(conf.DATABASE).live().with_clock()
    return rows.filter(pk=machine_id).first()


def locked_refusal(machine_id: str, live: MachineLock) -> str:
    return (
        f"machine {machine_id!r} has a live lock ({describe_lock(live)}): a worker is in the "
        "middle of its cycle. Release the lock first (the Release action), or wait for it."
    )


def stale_refusal(exc: WriteConflict, shown: int) -> Refusal:
    if exc.actual_version is None:
        return Refusal(
            f"The state was not saved: it was deleted since you opened it (you edited "
            f"version {shown}). Nothing was written.",
            gone=True,
        )
    return Refusal(
        f"The state was not saved: it was written since you opened it (you edited version "
        f"{shown}; it is now at version {exc.actual_version}). This page now shows the "
        "stored document: make your change again on it and save."
    )


def when(value: datetime.datetime) -> str:
    """A datetime as the admin shows its date fields (current time zone, DATETIME_FORMAT)."""
    return str(localize(localtime(value)))


def describe_lock(row: MachineLock) -> str:
    db_now: datetime.datetime = getattr(row, "db_now", None) or row.expires_at
    live = row.expires_at > db_now
    status = f"live, {seconds_text(row.expires_at - db_now)} left" if live else "expired"
    return (
        f"{status}: {row.owner}, token {row.token}, acquired {when(row.acquired_at)}"
        f", expires {when(row.expires_at)}"
    )


# -- machine locks -----------------------------------------------------------------------


@admin.register(MachineLock)
class MachineLockAdmin(UsingDatabaseAdmin):
    list_display = (
        "machine_id",
        "state_link",
        "owner_text",
        "token",
        "acquired_at",
        "expires_at",
        "status",
        "time_left",
    )
    sortable_by = ("machine_id",)
    list_filter = (LockLiveFilter,)
    search_fields = ("machine_id",)
    search_help_text = "Exact machine id. End with * for a prefix (scans the table)."
    actions = ("release_locks", "purge_expired")
    fields = ("machine_id", "state_link", "owner", "token", "acquired_at", "expires_at", "status")
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        locks = cast("MachineLockQuerySet", super().get_queryset(request))
        return locks.with_clock().with_state()

    # A lock row is only ever changed by lock()/unlock()/extend() (an edit would break
    # fencing), and deleting one could drop the token high-water row: release and purge
    # are the actions.
    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_purge_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("machine_memory.delete_machinelock")

    @admin.display(description="state")
    def state_link(self, obj: MachineLock) -> str:
        if not obj.has_state:  # type: ignore[attr-defined]
            return self.get_empty_value_display()
        return format_html('<a href="{}">state</a>', state_url(obj.machine_id))

    @admin.display(description="owner")
    def owner_text(self, obj: MachineLock) -> SafeString:
        return owner_html(obj.owner)

    @admin.display(description="status")
    def status(self, obj: MachineLock) -> str:
        return "live" if obj.expires_at > obj.db_now else "expired"  # type: ignore[attr-defined]

    @admin.display(description="time left")
    def time_left(self, obj: MachineLock) -> str:
        left = obj.expires_at - obj.db_now  # type: ignore[attr-defined]
        if left <= datetime.timedelta(0):
            return self.get_empty_value_display()
        return seconds_text(left)

    @admin.action(
        description="Purge the selected locks if expired (keeps the token high-water row)",
        permissions=["purge"],
    )
    def purge_expired(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        purged = cast("MachineLockQuerySet", queryset).purge_expired(batch_size=PURGE_BATCH)
        self.message_user(request, f"Purged {purged.deleted} expired lock(s).", messages.SUCCESS)
