"""Schedule expressions: ``rate(N unit)`` and six- or five-field cron, and the ticks they fire at.

``parse_schedule`` turns an expression into a ``Schedule`` or raises ``ScheduleError`` naming the field
and what is wrong with it; nothing that parses can fail later.  Guarantees:

- **UTC, integer seconds.**  A tick is an int epoch second; there are no time zones and no DST.
- **Aligned rate ticks.**  ``rate(N unit)`` fires at the epoch seconds that are multiples of its interval
  (``rate(5 minutes)`` at :00, :05, ... of every hour), not N units after some start time, so two
  processes, or one process before and after a restart, compute the same ticks.
- **Determinism.**  ``next_after`` and ``ticks_between`` are pure functions of the expression and their
  arguments: no clock, no randomness, no state between calls.
- **Every schedule fires.**  An expression that can never fire (``0 0 0 30 2 *``: February 30) is
  rejected at parse time, so ``next_after`` always returns.  The check is exact rather than a bounded
  search: the only cron that can never fire restricts the day of the month but not the weekday to days
  that none of its months has.  The rarest schedule that does fire (February 29) waits at most 8 years.
- **Bounded work.**  ``next_after`` walks candidate months, then matching days, then the sorted
  hour/minute/second sets, never second by second; ``ticks_between`` stops at ``limit`` ticks.

Cron syntax: ``SEC MIN HOUR DOM MON DOW`` (seconds first), bare or inside ``cron(...)``; five fields
``MIN HOUR DOM MON DOW`` mean second 0.  Fields take ``*``, numbers, ranges ``a-b``, steps ``*/n``,
``a-b/n`` and ``a/n`` (``a`` to the field's end), and comma lists; MON takes JAN-DEC and DOW takes
SUN-SAT (case-insensitive), with DOW 0 and 7 both Sunday.  ``?`` means ``*`` and is allowed only as the
whole DOM or DOW field.

Caveats:

- Day matching follows the standard cron rule: when DOM and DOW are both restricted, a day matches if
  *either* does.  "Restricted" means the field is anything but ``*`` or ``?``, so ``*/2`` restricts
  (Vixie cron treats any field starting with ``*`` as unrestricted).
- AWS EventBridge's six-field cron is ``MIN HOUR DOM MON DOW YEAR``; here the sixth field from the end
  is seconds, so ``cron(0 12 * * ? *)`` is rejected (``?`` in the month field) rather than misread.
- Wrap-around ranges such as ``FRI-MON`` are rejected as reversed; write ``FRI-SAT,SUN-MON``.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from faas.core.errors import InvalidRequest

__all__ = ["CronSchedule", "RateSchedule", "Schedule", "ScheduleError", "parse_schedule"]

_SECONDS_PER_DAY = 86_400
_MONTHS_PER_GREGORIAN_CYCLE = 400 * 12  # the calendar, weekdays included, repeats every 400 years
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_WEEKDAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_RATE_UNITS: Mapping[str, int] = {
    "second": 1,
    "seconds": 1,
    "minute": 60,
    "minutes": 60,
    "hour": 3_600,
    "hours": 3_600,
    "day": _SECONDS_PER_DAY,
    "days": _SECONDS_PER_DAY,
}
_USAGE = "expected rate(N unit) or cron(SEC MIN HOUR DOM MON DOW)"
_CALL_RE = re.compile(r"([A-Za-z_]\w*)\s*\((.*)\)", re.DOTALL)
_DIGITS_RE = re.compile(r"[0-9]+")


class ScheduleError(InvalidRequest, ValueError):
    """A schedule expression is malformed or can never fire; the message names the field and the fault."""


class Schedule(ABC):
    """When something fires: a sorted, unbounded series of integer UTC epoch seconds."""

    expression: str

    @abstractmethod
    def next_after(self, t: float) -> int:
        """The first tick strictly after epoch second ``t``."""

    def ticks_between(self, after: float, until: float, limit: int) -> list[int]:
        """The ticks in ``(after, until]``, oldest first, at most ``limit`` of them."""
        ticks: list[int] = []
        t = after
        while len(ticks) < limit:
            tick = self.next_after(t)
            if tick > until:
                break
            ticks.append(tick)
            t = tick
        return ticks


@dataclass(frozen=True)
class RateSchedule(Schedule):
    """Fires at every epoch second that is a multiple of ``interval_s``."""

    expression: str
    interval_s: int

    def next_after(self, t: float) -> int:
        # Ticks are integers, so the first multiple above t is the first multiple above floor(t).
        return (math.floor(t) // self.interval_s + 1) * self.interval_s

    def ticks_between(self, after: float, until: float, limit: int) -> list[int]:
        first = self.next_after(after)
        if limit <= 0 or first > until:
            return []
        count = min(limit, (math.floor(until) - first) // self.interval_s + 1)
        return list(range(first, first + count * self.interval_s, self.interval_s))


@dataclass(frozen=True)
class CronSchedule(Schedule):
    """Fires at every second whose UTC fields are all in the sets (days by the DOM/DOW rule).

    Each set is a sorted tuple; ``days_of_week`` uses 0 = Sunday.  ``days_or`` is true when both the
    day-of-month and day-of-week fields were restricted, so a day matches if either matches.
    """

    expression: str
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days_of_month: tuple[int, ...]
    months: tuple[int, ...]
    days_of_week: tuple[int, ...]
    days_or: bool

    def next_after(self, t: float) -> int:
        start = math.floor(t) + 1
        day_number, floor_s = divmod(start, _SECONDS_PER_DAY)
        year, month, first_day = _civil_from_days(day_number)
        for _ in range(_MONTHS_PER_GREGORIAN_CYCLE + 1):
            i = bisect_left(self.months, month)
            if i == len(self.months):
                year, month, first_day, floor_s = year + 1, self.months[0], 1, 0
            elif self.months[i] != month:
                month, first_day, floor_s = self.months[i], 1, 0
            for day in self._days_in_month(year, month, first_day):
                time_of_day = self._time_at_or_after(floor_s if day == first_day else 0)
                if time_of_day is not None:
                    return _days_from_civil(year, month, day) * _SECONDS_PER_DAY + time_of_day
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)
            first_day, floor_s = 1, 0
        # parse_schedule rejects every expression that cannot fire, and the calendar repeats within this
        # many months, so reaching here means a CronSchedule was built by hand with impossible sets.
        raise ValueError(f"schedule {self.expression!r} never fires")

    def _days_in_month(self, year: int, month: int, first_day: int) -> Iterator[int]:
        """The matching days of ``month`` from ``first_day`` on, in order."""
        weekday_of_first = (_days_from_civil(year, month, 1) + 4) % 7  # 1970-01-01 was a Thursday
        for day in range(first_day, _month_length(year, month) + 1):
            dom_ok = day in self.days_of_month
            dow_ok = (weekday_of_first + day - 1) % 7 in self.days_of_week
            if (dom_ok or dow_ok) if self.days_or else (dom_ok and dow_ok):
                yield day

    def _time_at_or_after(self, floor_s: int) -> int | None:
        """The first matching second of a day at or after second-of-day ``floor_s``, if any."""
        hour, rest = divmod(floor_s, 3_600)
        minute, second = divmod(rest, 60)
        h = bisect_left(self.hours, hour)
        if h == len(self.hours):
            return None
        if self.hours[h] == hour:
            m = bisect_left(self.minutes, minute)
            if m < len(self.minutes) and self.minutes[m] == minute:
                s = bisect_left(self.seconds, second)
                if s < len(self.seconds):
                    return hour * 3_600 + minute * 60 + self.seconds[s]
                m += 1  # no second left in this minute
            if m < len(self.minutes):
                return hour * 3_600 + self.minutes[m] * 60 + self.seconds[0]
            h += 1  # no minute left in this hour
            if h == len(self.hours):
                return None
        return self.hours[h] * 3_600 + self.minutes[0] * 60 + self.seconds[0]


def parse_schedule(expression: str) -> Schedule:
    """Parse ``rate(N unit)``, ``cron(...)`` or a bare five- or six-field cron expression."""
    text = expression.strip()
    if not text:
        raise _error("schedule", expression, f"it is empty; {_USAGE}")
    call = _CALL_RE.fullmatch(text)
    if call is not None:
        kind, body = call[1].lower(), call[2]
        if kind == "rate":
            return _parse_rate(expression, body)
        if kind == "cron":
            return _parse_cron(expression, body.split())
        raise _error("schedule", expression, f'unknown schedule kind "{call[1]}"; {_USAGE}')
    if "(" in text or ")" in text:
        raise _error("schedule", expression, f"it has stray or unbalanced parentheses; {_USAGE}")
    fields = text.split()
    if len(fields) == 1:
        raise _error("schedule", expression, f"{_USAGE}, or five or six bare cron fields")
    return _parse_cron(expression, fields)


def _error(kind: str, expression: str, reason: str) -> ScheduleError:
    return ScheduleError(f'invalid {kind} expression "{expression}": {reason}')


def _parse_rate(expression: str, body: str) -> RateSchedule:
    parts = body.split()
    if len(parts) != 2:
        raise _error("rate", expression, 'expected "rate(N unit)", e.g. rate(5 minutes)')
    amount, unit = parts
    if not _DIGITS_RE.fullmatch(amount):
        raise _error("rate", expression, f'the interval "{amount}" is not a whole number')
    n = int(amount)
    if n < 1:
        raise _error("rate", expression, f"the interval must be at least 1, got {n}")
    unit_s = _RATE_UNITS.get(unit.lower())
    if unit_s is None:
        raise _error(
            "rate", expression, f'unknown unit "{unit}"; expected second(s), minute(s), hour(s) or day(s)'
        )
    return RateSchedule(expression=expression, interval_s=n * unit_s)


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int  # the largest value accepted
    star_high: int  # where ``*`` and ``a/n`` end (DOW: 6, although 7 is accepted as Sunday)
    names: tuple[str, ...] = ()  # names[i] means the value i + first_name_value
    first_name_value: int = 0
    name_kind: str = ""  # what the names are, for messages
    allows_question: bool = False


_SECOND = _Field("second", 0, 59, 59)
_MINUTE = _Field("minute", 0, 59, 59)
_HOUR = _Field("hour", 0, 23, 23)
_DAY_OF_MONTH = _Field("day-of-month", 1, 31, 31, allows_question=True)
_MONTH = _Field("month", 1, 12, 12, _MONTH_NAMES, 1, "month")
_DAY_OF_WEEK = _Field("day-of-week", 0, 7, 6, _WEEKDAY_NAMES, 0, "weekday", allows_question=True)
_FIELDS = (_SECOND, _MINUTE, _HOUR, _DAY_OF_MONTH, _MONTH, _DAY_OF_WEEK)


def _parse_cron(expression: str, fields: list[str]) -> CronSchedule:
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise _error(
            "cron",
            expression,
            "expected 6 fields (SEC MIN HOUR DOM MON DOW) or 5 fields (MIN HOUR DOM MON DOW), "
            f"got {len(fields)}",
        )
    try:
        seconds, minutes, hours, doms, months, dows = (
            _parse_field(text, spec) for text, spec in zip(fields, _FIELDS, strict=True)
        )
    except _FieldError as exc:
        raise _error("cron", expression, str(exc)) from None
    dom_text, month_text, dow_text = fields[3], fields[4], fields[5]
    dom_restricted = dom_text not in ("*", "?")
    dow_restricted = dow_text not in ("*", "?")
    days_of_week = tuple(sorted({d % 7 for d in dows}))
    if dom_restricted and not dow_restricted:
        # February counts 29: a schedule that fires only on leap days still fires.
        longest = max(_MONTH_DAYS[m - 1] + (m == 2) for m in months)
        if min(doms) > longest:
            raise _error(
                "cron",
                expression,
                f"it never fires: day-of-month {dom_text} does not occur in month {month_text}",
            )
    return CronSchedule(
        expression=expression,
        seconds=seconds,
        minutes=minutes,
        hours=hours,
        days_of_month=doms,
        months=months,
        days_of_week=days_of_week,
        days_or=dom_restricted and dow_restricted,
    )


class _FieldError(Exception):
    """Why one cron field is invalid; ``_parse_cron`` adds the expression."""


def _parse_field(text: str, spec: _Field) -> tuple[int, ...]:
    if text == "?":
        if not spec.allows_question:
            raise _FieldError(f'"?" is only allowed in day-of-month and day-of-week, not in {spec.name}')
        return tuple(range(spec.low, spec.star_high + 1))
    values: set[int] = set()
    for item in text.split(","):
        values.update(_parse_item(item, text, spec))
    return tuple(sorted(values))


def _parse_item(item: str, text: str, spec: _Field) -> range:
    if not item:
        raise _FieldError(f'{spec.name} "{text}" has an empty list item')
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if "/" in step_text:
            raise _FieldError(f'{spec.name} "{item}" has more than one "/"')
        if not _DIGITS_RE.fullmatch(step_text):
            raise _FieldError(f'{spec.name} step "{step_text}" is not a number')
        step = int(step_text)
        if step < 1:
            raise _FieldError(f"{spec.name} step {step} is invalid: a step must be at least 1")
    if base == "?":
        raise _FieldError(f'"?" must stand alone as the whole {spec.name} field, not in "{text}"')
    if base == "*":
        return range(spec.low, spec.star_high + 1, step)
    if "-" in base:
        start_text, _, end_text = base.partition("-")
        if not start_text or not end_text:
            raise _FieldError(f'{spec.name} range "{base}" is missing a bound')
        if "-" in end_text:
            raise _FieldError(f'{spec.name} range "{base}" has more than one "-"')
        start, end = _parse_value(start_text, spec), _parse_value(end_text, spec)
        if start > end:
            raise _FieldError(f"{spec.name} range {base} is reversed: the start must not be after the end")
        return range(start, end + 1, step)
    value = _parse_value(base, spec)
    # ``a/n`` runs from a to the end of the field; a plain value is just itself.
    return range(value, spec.star_high + 1, step) if slash else range(value, value + 1)


def _parse_value(text: str, spec: _Field) -> int:
    if _DIGITS_RE.fullmatch(text):
        value = int(text)
        if not spec.low <= value <= spec.high:
            raise _FieldError(f"{spec.name} {value} is out of range {spec.low}-{spec.high}")
        return value
    upper = text.upper()
    if spec.names and upper in spec.names:
        return spec.names.index(upper) + spec.first_name_value
    if spec.names:
        raise _FieldError(
            f'{spec.name} "{text}" is not a number or a {spec.name_kind} name '
            f"({spec.names[0]}-{spec.names[-1]})"
        )
    raise _FieldError(f'{spec.name} "{text}" is not a number')


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _month_length(year: int, month: int) -> int:
    return 29 if month == 2 and _is_leap(year) else _MONTH_DAYS[month - 1]


# Integer proleptic-Gregorian date arithmetic (H. Hinnant, "chrono-Compatible Low-Level Date
# Algorithms"): exact for every year, unlike datetime, which stops at year 9999.
def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to the given date."""
    year -= month <= 2
    era, year_of_era = divmod(year, 400)
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """The (year, month, day) that is ``days`` days after 1970-01-01."""
    era, day_of_era = divmod(days + 719_468, 146_097)
    year_of_era = (day_of_era - day_of_era // 1_460 + day_of_era // 36_524 - day_of_era // 146_096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted_month = (5 * day_of_year + 2) // 153  # 0 = March
    day = day_of_year - (153 * shifted_month + 2) // 5 + 1
    month = shifted_month + (3 if shifted_month < 10 else -9)
    return year_of_era + era * 400 + (month <= 2), month, day
