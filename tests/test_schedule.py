"""Unit tests of schedule expressions: when rate and cron schedules fire, and how bad ones are rejected."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from faas.core.errors import InvalidRequest
from faas.core.schedule import ScheduleError, parse_schedule

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY = 86_400


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int((datetime(year, month, day, hour, minute, second, tzinfo=UTC) - EPOCH).total_seconds())


def dt(t: int) -> datetime:
    return EPOCH + timedelta(seconds=t)


def brute_force(matches: Callable[[datetime], bool], start: int, stop: int, step: int) -> list[int]:
    """Every ``step``-th second in [start, stop) whose UTC time satisfies ``matches``."""
    return [t for t in range(start, stop, step) if matches(dt(t))]


def cron_weekday(d: datetime) -> int:
    return d.isoweekday() % 7  # cron numbering: 0 = Sunday


# --- rate ---------------------------------------------------------------------------------------------


def test_rate_ticks_are_multiples_of_the_interval_since_the_epoch() -> None:
    every_5_min = parse_schedule("rate(5 minutes)")
    assert every_5_min.next_after(1_000) == 1_200
    assert every_5_min.next_after(1_200) == 1_500  # strictly after
    assert every_5_min.next_after(1_199.5) == 1_200
    assert every_5_min.next_after(-1) == 0
    assert every_5_min.ticks_between(1_000, 2_100, 10) == [1_200, 1_500, 1_800, 2_100]

    daily = parse_schedule("rate(1 day)")
    assert daily.next_after(ts(2024, 3, 5, 13, 7, 1)) == ts(2024, 3, 6)  # midnight UTC

    hourly = parse_schedule("rate(2 hours)")
    assert dt(hourly.next_after(ts(2024, 3, 5, 13, 7))) == datetime(2024, 3, 5, 14, tzinfo=UTC)


def test_two_processes_agree_on_rate_ticks_whenever_they_start() -> None:
    # A process started at 10:03:17 and one started at 10:04:59 fire at the same instants.
    first = parse_schedule("rate(90 seconds)")
    second = parse_schedule("rate(90 seconds)")
    now = ts(2024, 6, 1, 10, 3, 17)
    later = ts(2024, 6, 1, 10, 4, 59)
    until = now + 3_600
    assert set(second.ticks_between(later, until, 100)) <= set(first.ticks_between(now, until, 100))
    assert all(t % 90 == 0 for t in first.ticks_between(now, until, 100))


@pytest.mark.parametrize(
    ("expression", "interval_s"),
    [
        ("rate(1 second)", 1),
        ("rate(30 seconds)", 30),
        ("rate(1 minute)", 60),
        ("rate(5 minute)", 300),
        ("rate(1 hours)", 3_600),
        ("rate(7 days)", 7 * DAY),
        ("  RATE( 3  Hours )  ", 3 * 3_600),
    ],
)
def test_rate_units_singular_or_plural(expression: str, interval_s: int) -> None:
    schedule = parse_schedule(expression)
    assert schedule.ticks_between(0, 3 * interval_s, 10) == [interval_s, 2 * interval_s, 3 * interval_s]


def test_rate_ticks_between_matches_repeated_next_after() -> None:
    schedule = parse_schedule("rate(7 minutes)")
    after, until = 1_000_003.25, 1_100_000.0
    ticks = schedule.ticks_between(after, until, 1_000)
    walked, t = [], after
    while (t := schedule.next_after(t)) <= until:
        walked.append(t)
    assert ticks == walked
    assert schedule.ticks_between(after, until, 5) == walked[:5]


# --- cron: when it fires ------------------------------------------------------------------------------


def test_every_second_cron() -> None:
    for expression in ("* * * * * *", "cron(* * * * * *)"):
        schedule = parse_schedule(expression)
        assert schedule.next_after(10) == 11
        assert schedule.next_after(10.5) == 11
        assert schedule.ticks_between(0, 5, 100) == [1, 2, 3, 4, 5]
        new_year = ts(2025, 1, 1)
        assert schedule.next_after(new_year - 1) == new_year


def test_five_fields_mean_second_zero() -> None:
    five = parse_schedule("*/20 * * * *")
    six = parse_schedule("0 */20 * * * *")
    start = ts(2024, 1, 1, 0, 0, 1)
    assert five.ticks_between(start, start + DAY, 10) == six.ticks_between(start, start + DAY, 10)
    assert dt(five.next_after(start)) == datetime(2024, 1, 1, 0, 20, tzinfo=UTC)
    assert parse_schedule("cron(0 12 * * *)").next_after(ts(2024, 1, 1)) == ts(2024, 1, 1, 12)


COMPLEX_CASES: list[tuple[str, Callable[[datetime], bool]]] = [
    (
        "30 */15 9-17 * JAN,jul Mon-FRI",
        lambda d: (
            d.second == 30
            and d.minute % 15 == 0
            and 9 <= d.hour <= 17
            and d.month in (1, 7)
            and 1 <= cron_weekday(d) <= 5
        ),
    ),
    (
        "0 5/20 1-23/4,0 * * *",
        lambda d: d.second == 0 and d.minute in (5, 25, 45) and d.hour in (0, 1, 5, 9, 13, 17, 21),
    ),
    (
        "15,45 0-10/5,58 22 */10 feb-apr,11 *",
        lambda d: (
            d.second in (15, 45)
            and d.minute in (0, 5, 10, 58)
            and d.hour == 22
            and d.day in (1, 11, 21, 31)
            and d.month in (2, 3, 4, 11)
        ),
    ),
    (
        "cron(0 0 6 ? * 5-7)",  # Friday, Saturday and Sunday (7 = Sunday)
        lambda d: d.second == 0 and d.minute == 0 and d.hour == 6 and cron_weekday(d) in (5, 6, 0),
    ),
]


@pytest.mark.parametrize(("expression", "matches"), COMPLEX_CASES, ids=[c[0] for c in COMPLEX_CASES])
def test_complex_cron_agrees_with_brute_force(expression: str, matches: Callable[[datetime], bool]) -> None:
    schedule = parse_schedule(expression)
    rng = random.Random(expression)
    fired = 0
    # Random two-day windows from 1901 to 2399, in months these expressions use, so leap and century
    # years and pre-epoch times are covered.  Every case's seconds are multiples of 15.
    for _ in range(12):
        month = rng.choice((1, 2, 3, 4, 7, 11))
        start = ts(rng.randint(1901, 2399), month, rng.randint(1, 28), rng.randint(0, 23))
        stop = start + 2 * DAY
        expected = brute_force(matches, start, stop, 15)
        assert schedule.ticks_between(start - 1, stop - 1, 10_000) == expected, dt(start)
        fired += len(expected)
    assert fired > 0


def test_names_are_case_insensitive_and_equal_their_numbers() -> None:
    named = parse_schedule("0 0 12 * jan,Jul,DEC mon-FRI")
    numbered = parse_schedule("0 0 12 * 1,7,12 1-5")
    start = ts(2023, 1, 1)
    assert named.ticks_between(start, start + 400 * DAY, 500) == numbered.ticks_between(
        start, start + 400 * DAY, 500
    )


def test_day_of_week_zero_and_seven_are_sunday() -> None:
    start = ts(2024, 5, 1)  # a Wednesday
    sundays = [ts(2024, 5, 5), ts(2024, 5, 12)]
    for dow in ("0", "7", "SUN", "sun"):
        assert parse_schedule(f"0 0 0 * * {dow}").ticks_between(start, start + 14 * DAY, 10) == sundays


def test_restricted_day_of_month_and_day_of_week_match_either() -> None:
    start = ts(2024, 9, 1)  # September 2024: Fridays are the 6th, 13th, 20th and 27th
    end = ts(2024, 9, 30)

    either = parse_schedule("0 0 0 10 * FRI")
    assert [dt(t).day for t in either.ticks_between(start, end, 100)] == [6, 10, 13, 20, 27]

    # With one side unrestricted (* or ?) only the other side counts.
    assert [dt(t).day for t in parse_schedule("0 0 0 10 * ?").ticks_between(start, end, 100)] == [10]
    assert [dt(t).day for t in parse_schedule("0 0 0 10 * *").ticks_between(start, end, 100)] == [10]
    assert [dt(t).day for t in parse_schedule("0 0 0 ? * FRI").ticks_between(start, end, 100)] == [
        6,
        13,
        20,
        27,
    ]

    # Friday the 13th needs both, which cron cannot say: the OR rule gives every 13th and every Friday.
    friday_13 = parse_schedule("0 0 0 13 * 5")
    assert dt(friday_13.next_after(ts(2024, 9, 14))) == datetime(2024, 9, 20, tzinfo=UTC)

    # A stepped field counts as restricted (unlike Vixie cron, which treats "*/2" as unrestricted).
    odd_days_or_friday = parse_schedule("0 0 0 */2 * FRI")
    days = [dt(t).day for t in odd_days_or_friday.ticks_between(start, ts(2024, 9, 10), 100)]
    assert days == [3, 5, 6, 7, 9]


def test_month_rollovers_skip_months_without_the_day() -> None:
    the_31st = parse_schedule("0 0 0 31 * *")
    assert dt(the_31st.next_after(ts(2024, 1, 31))) == datetime(2024, 3, 31, tzinfo=UTC)
    assert dt(the_31st.next_after(ts(2024, 4, 1))) == datetime(2024, 5, 31, tzinfo=UTC)
    assert [dt(t).month for t in the_31st.ticks_between(ts(2024, 1, 1), ts(2025, 1, 1), 12)] == [
        1,
        3,
        5,
        7,
        8,
        10,
        12,
    ]

    new_year = parse_schedule("59 59 23 31 12 *")
    assert new_year.next_after(ts(2024, 12, 31, 23, 59, 59)) == ts(2025, 12, 31, 23, 59, 59)

    # Later in the same day, then the next matching day, across a month and a year boundary.
    morning = parse_schedule("0 30 8 * * *")
    assert morning.next_after(ts(2024, 2, 29, 8, 29, 59)) == ts(2024, 2, 29, 8, 30)
    assert morning.next_after(ts(2024, 2, 29, 8, 30)) == ts(2024, 3, 1, 8, 30)
    assert morning.next_after(ts(2023, 12, 31, 23)) == ts(2024, 1, 1, 8, 30)

    # An hour with no minute left falls through to the next hour, and the last hour to the next day.
    twice_an_hour = parse_schedule("10 0,30 9,17 * * *")
    assert twice_an_hour.next_after(ts(2024, 6, 3, 9, 30, 10)) == ts(2024, 6, 3, 17, 0, 10)
    assert twice_an_hour.next_after(ts(2024, 6, 3, 17, 30, 10)) == ts(2024, 6, 4, 9, 0, 10)


def test_leap_day_fires_only_in_leap_years() -> None:
    leap_day = parse_schedule("0 0 0 29 2 *")
    assert dt(leap_day.next_after(ts(1999, 6, 1))) == datetime(2000, 2, 29, tzinfo=UTC)  # 2000: /400
    assert dt(leap_day.next_after(ts(2000, 2, 29))) == datetime(2004, 2, 29, tzinfo=UTC)
    assert dt(leap_day.next_after(ts(2097, 1, 1))) == datetime(2104, 2, 29, tzinfo=UTC)  # 2100: not leap
    ticks = leap_day.ticks_between(ts(2020, 1, 1), ts(2040, 1, 1), 100)
    assert [dt(t).year for t in ticks] == [2020, 2024, 2028, 2032, 2036]
    assert parse_schedule("0 0 0 28-31 2 *").ticks_between(ts(2023, 2, 1), ts(2024, 3, 1), 10) == [
        ts(2023, 2, 28),
        ts(2024, 2, 28),
        ts(2024, 2, 29),
    ]


def test_times_before_the_epoch_and_after_year_9999() -> None:
    new_year = parse_schedule("0 0 0 1 JAN *")
    assert new_year.next_after(-1) == 0
    assert new_year.next_after(ts(1900, 6, 1)) == ts(1901, 1, 1)
    # datetime stops at 9999; schedules do not.
    year_10000 = (datetime(9999, 12, 31, tzinfo=UTC) - EPOCH).days * DAY + DAY
    assert new_year.next_after(ts(9999, 6, 1)) == year_10000


def test_ticks_between_is_half_open_and_bounded_by_limit() -> None:
    every_second = parse_schedule("* * * * * *")
    assert every_second.ticks_between(100, 103, 10) == [101, 102, 103]  # after excluded, until included
    assert every_second.ticks_between(100, 100, 10) == []
    assert every_second.ticks_between(0, 10 * 365 * DAY, 3) == [1, 2, 3]
    assert every_second.ticks_between(0, 10, 0) == []
    hourly = parse_schedule("0 0 * * * *")
    assert hourly.ticks_between(0, 10 * 365 * DAY, 2) == [3_600, 7_200]


def test_parsing_is_deterministic() -> None:
    a, b = parse_schedule("0 */7 * * * MON"), parse_schedule("0 */7 * * * MON")
    assert a == b
    assert a.expression == "0 */7 * * * MON"
    assert a.ticks_between(0, 30 * DAY, 1_000) == b.ticks_between(0, 30 * DAY, 1_000)


# --- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        # the expression as a whole
        (
            "",
            'invalid schedule expression "": it is empty; expected rate(N unit) or cron(SEC MIN HOUR DOM MON DOW)',
        ),
        (
            "   ",
            'invalid schedule expression "   ": it is empty; expected rate(N unit) or cron(SEC MIN HOUR DOM MON DOW)',
        ),
        (
            "hourly",
            'invalid schedule expression "hourly": expected rate(N unit) or cron(SEC MIN HOUR DOM MON DOW), '
            "or five or six bare cron fields",
        ),
        (
            "every(5 minutes)",
            'invalid schedule expression "every(5 minutes)": unknown schedule kind "every"; '
            "expected rate(N unit) or cron(SEC MIN HOUR DOM MON DOW)",
        ),
        (
            "cron(0 * * * * *",
            'invalid schedule expression "cron(0 * * * * *": it has stray or unbalanced parentheses; '
            "expected rate(N unit) or cron(SEC MIN HOUR DOM MON DOW)",
        ),
        # rate
        (
            "rate(0 minutes)",
            'invalid rate expression "rate(0 minutes)": the interval must be at least 1, got 0',
        ),
        (
            "rate(-5 minutes)",
            'invalid rate expression "rate(-5 minutes)": the interval "-5" is not a whole number',
        ),
        (
            "rate(1.5 hours)",
            'invalid rate expression "rate(1.5 hours)": the interval "1.5" is not a whole number',
        ),
        (
            "rate(2 weeks)",
            'invalid rate expression "rate(2 weeks)": unknown unit "weeks"; '
            "expected second(s), minute(s), hour(s) or day(s)",
        ),
        ("rate(5)", 'invalid rate expression "rate(5)": expected "rate(N unit)", e.g. rate(5 minutes)'),
        ("rate()", 'invalid rate expression "rate()": expected "rate(N unit)", e.g. rate(5 minutes)'),
        # cron: field count
        (
            "cron(0 0 * * * * *)",
            'invalid cron expression "cron(0 0 * * * * *)": expected 6 fields (SEC MIN HOUR DOM MON DOW) '
            "or 5 fields (MIN HOUR DOM MON DOW), got 7",
        ),
        (
            "0 * * *",
            'invalid cron expression "0 * * *": expected 6 fields (SEC MIN HOUR DOM MON DOW) '
            "or 5 fields (MIN HOUR DOM MON DOW), got 4",
        ),
        # cron: out of range, per field
        (
            "cron(0 61 * * * *)",
            'invalid cron expression "cron(0 61 * * * *)": minute 61 is out of range 0-59',
        ),
        ("60 * * * * *", 'invalid cron expression "60 * * * * *": second 60 is out of range 0-59'),
        ("0 0 24 * * *", 'invalid cron expression "0 0 24 * * *": hour 24 is out of range 0-23'),
        ("0 0 0 0 * *", 'invalid cron expression "0 0 0 0 * *": day-of-month 0 is out of range 1-31'),
        ("0 0 0 * 13 *", 'invalid cron expression "0 0 0 * 13 *": month 13 is out of range 1-12'),
        ("0 0 0 * * 8", 'invalid cron expression "0 0 0 * * 8": day-of-week 8 is out of range 0-7'),
        ("0 0 0 * * 1-9", 'invalid cron expression "0 0 0 * * 1-9": day-of-week 9 is out of range 0-7'),
        # cron: steps
        (
            "*/0 * * * * *",
            'invalid cron expression "*/0 * * * * *": second step 0 is invalid: a step must be at least 1',
        ),
        (
            "0 1-10/0 * * * *",
            'invalid cron expression "0 1-10/0 * * * *": minute step 0 is invalid: a step must be at least 1',
        ),
        ("0 */x * * * *", 'invalid cron expression "0 */x * * * *": minute step "x" is not a number'),
        (
            "0 1/2/3 * * * *",
            'invalid cron expression "0 1/2/3 * * * *": minute "1/2/3" has more than one "/"',
        ),
        # cron: ranges
        (
            "0 0 17-9 * * *",
            'invalid cron expression "0 0 17-9 * * *": hour range 17-9 is reversed: the start must not be after the end',
        ),
        (
            "0 0 0 * * FRI-MON",
            'invalid cron expression "0 0 0 * * FRI-MON": day-of-week range FRI-MON is reversed: '
            "the start must not be after the end",
        ),
        ("0 5- * * * *", 'invalid cron expression "0 5- * * * *": minute range "5-" is missing a bound'),
        (
            "0 1-2-3 * * * *",
            'invalid cron expression "0 1-2-3 * * * *": minute range "1-2-3" has more than one "-"',
        ),
        # cron: values, names, lists and "?"
        ("0 x * * * *", 'invalid cron expression "0 x * * * *": minute "x" is not a number'),
        (
            "0 0 0 * SEPT *",
            'invalid cron expression "0 0 0 * SEPT *": month "SEPT" is not a number or a month name (JAN-DEC)',
        ),
        (
            "0 0 0 * * JAN",
            'invalid cron expression "0 0 0 * * JAN": day-of-week "JAN" is not a number or a weekday name (SUN-SAT)',
        ),
        ("0 0 0 MON * *", 'invalid cron expression "0 0 0 MON * *": day-of-month "MON" is not a number'),
        ("1,,2 * * * * *", 'invalid cron expression "1,,2 * * * * *": second "1,,2" has an empty list item'),
        (
            "cron(0 12 * * ? *)",
            'invalid cron expression "cron(0 12 * * ? *)": "?" is only allowed in day-of-month and day-of-week, '
            "not in month",
        ),
        (
            "0 0 0 ?/2 * *",
            'invalid cron expression "0 0 0 ?/2 * *": "?" must stand alone as the whole day-of-month field, not in "?/2"',
        ),
        # cron: never fires
        (
            "0 0 0 30 2 *",
            'invalid cron expression "0 0 0 30 2 *": it never fires: day-of-month 30 does not occur in month 2',
        ),
        (
            "cron(0 0 31 APR,JUN,SEP,NOV ?)",
            'invalid cron expression "cron(0 0 31 APR,JUN,SEP,NOV ?)": it never fires: '
            "day-of-month 31 does not occur in month APR,JUN,SEP,NOV",
        ),
    ],
)
def test_invalid_expressions_name_the_field_and_the_fault(expression: str, message: str) -> None:
    with pytest.raises(ScheduleError) as excinfo:
        parse_schedule(expression)
    assert str(excinfo.value) == message


def test_rare_but_possible_days_are_accepted() -> None:
    # Each of these fires, so none is rejected as "never fires".
    for expression in ("0 0 0 29 2 *", "0 0 0 30,31 2,3 *", "0 0 0 30 2 MON", "0 0 0 31 */2 *"):
        schedule = parse_schedule(expression)
        assert schedule.next_after(ts(2024, 1, 1)) > ts(2024, 1, 1)


def test_schedule_error_is_a_value_error_and_a_400() -> None:
    with pytest.raises(ScheduleError) as excinfo:
        parse_schedule("rate(0 seconds)")
    assert isinstance(excinfo.value, ValueError)
    assert isinstance(excinfo.value, InvalidRequest)
    assert excinfo.value.to_body()["error"]["kind"] == "invalid_request"
