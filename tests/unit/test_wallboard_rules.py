"""The wallboard's definitions (ingest/wallboard.py) on hand-made calls shaped like Hipcall's real
call_hangup payloads: answered_at set on a missed call, a call handled with no bridge, a voicemail,
out of business hours; per-day in a timezone, per number, per 15-minute slot; the live calls."""

from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from ingest.wallboard import Call, day_figures, figures, live, outcome, slot_start, talk_seconds, tally, wait_seconds

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


ANSWERED_FAST = Call("a1", number_id=1, user_id=7, started_at=at(0), bridged_at=at(12), ended_at=at(72), missing_call=False)
ANSWERED_SLOW = Call("a2", number_id=1, user_id=8, started_at=at(60), bridged_at=at(95), ended_at=at(215), missing_call=False)
# handled by an external manager: missing_call false, no bridge; its wait comes from first_touch_duration
HANDLED_NO_BRIDGE = Call("a3", number_id=2, started_at=at(120), ended_at=at(180), first_touch_duration=4, missing_call=False)
# answered_at (the greeting) is set on missed calls too: it is not an answer
ABANDONED = Call("m1", number_id=1, started_at=at(200), ended_at=at(260), missing_call=True, missing_call_reason="abandoned")
SHORT = Call("m2", number_id=1, started_at=at(300), ended_at=at(303), missing_call=True, missing_call_reason="short_abandoned")
VOICEMAIL = Call("m3", number_id=2, started_at=at(400), ended_at=at(460), missing_call=True,
                 missing_call_reason="abandoned", voicemail_id="vm-1")
OUT_OF_HOURS = Call("o1", number_id=2, started_at=at(500), ended_at=at(510), missing_call=True,
                    missing_call_reason="out_of_business_hours")
OUTBOUND = Call("x1", direction="outbound", number_id=1, user_id=7, started_at=at(30), bridged_at=at(40), ended_at=at(90),
                missing_call=False)
NOT_ENDED = Call("w1", number_id=1, started_at=at(600), last_event="call_init")
DAY = [ANSWERED_FAST, ANSWERED_SLOW, HANDLED_NO_BRIDGE, ABANDONED, SHORT, VOICEMAIL, OUT_OF_HOURS, OUTBOUND, NOT_ENDED]


def test_each_real_payload_shape_counts_as_the_issue_defines():
    assert [outcome(c) for c in DAY] == ["answered", "answered", "answered", "abandoned", "short_abandoned", "voicemail",
                                         "out_of_hours", None, None]
    assert outcome(Call("z", missing_call=None, missing_call_reason=None)) == "abandoned"  # not said answered: missed


def test_wait_is_the_bridge_else_first_touch_else_zero_and_talk_needs_a_bridge():
    assert wait_seconds(ANSWERED_FAST) == 12 and wait_seconds(HANDLED_NO_BRIDGE) == 4
    assert wait_seconds(Call("z", started_at=at(0), missing_call=False)) == 0
    assert talk_seconds(ANSWERED_SLOW) == 120 and talk_seconds(HANDLED_NO_BRIDGE) is None


def test_the_day_figures_by_hand():
    got = figures(tally(DAY, 20))
    # offered: 3 answered + abandoned + short + voicemail = 6 (out of hours apart, outbound and open calls out)
    assert (got["offered"], got["answered"], got["short_abandoned"], got["voicemail"], got["abandoned"],
            got["out_of_hours"]) == (6, 3, 1, 1, 1, 1)
    assert got["service_level"] == 2 / 5  # waits 12 and 4 within 20 s, 35 not; over 6 - 1 short
    assert got["abandon_rate"] == 1 / 5
    assert got["asa"] == (12 + 35 + 4) / 3
    assert got["talk"] == (60 + 120) / 2  # the call with no bridge has no talk time
    assert figures(tally(DAY, 35))["service_level"] == 3 / 5  # wait <= T: the boundary counts


def test_empty_denominators_are_null_not_zero():
    got = figures(tally([SHORT, OUT_OF_HOURS], 20))
    assert (got["offered"], got["service_level"], got["abandon_rate"], got["asa"], got["talk"]) == (1, None, None, None, None)


def test_a_call_counts_on_the_local_day_of_its_start_per_number_and_slot():
    istanbul = ZoneInfo("Europe/Istanbul")  # UTC+3: 21:30 UTC on the 6th is 00:30 on the 7th there
    late = Call("n1", number_id=1, started_at=datetime(2026, 12, 6, 21, 30, tzinfo=timezone.utc),
                bridged_at=datetime(2026, 12, 6, 21, 30, 25, tzinfo=timezone.utc),
                ended_at=datetime(2026, 12, 6, 21, 40, tzinfo=timezone.utc), missing_call=False)
    assert day_figures([late], date(2026, 12, 6), timezone.utc, lambda n: 20)["answered"] == 1
    assert day_figures([late], date(2026, 12, 6), istanbul, lambda n: 20)["offered"] == 0
    local = day_figures([late], date(2026, 12, 7), istanbul, lambda n: 30)
    assert local["service_level"] == 1.0  # T 30 for this number: 25 s is in time
    assert [s["start"] for s in local["slots"]] == ["2026-12-07T00:30:00+03:00"]

    per_number = day_figures(DAY, date(2026, 12, 7), timezone.utc, lambda n: {2: 2}.get(n, 20))
    one, two = per_number["numbers"]
    assert (one["number_id"], one["offered"], one["answered"], one["service_level"]) == (1, 4, 2, 1 / 3)
    assert (two["number_id"], two["offered"], two["answered"], two["service_level"]) == (2, 2, 1, 0.0)  # 4 s > T 2 s
    assert per_number["service_level"] == 1 / 5
    assert [s["start"] for s in per_number["slots"]] == ["2026-12-07T09:00:00+00:00"]
    assert day_figures(DAY, date(2026, 12, 7), timezone.utc, lambda n: 20, number_id=2)["offered"] == 2


def test_slots_are_local_quarter_hours():
    kolkata = ZoneInfo("Asia/Kolkata")  # UTC+5:30: a quarter hour in UTC is one there too, shifted
    assert slot_start(datetime(2026, 12, 7, 9, 44, 59, tzinfo=timezone.utc), kolkata).isoformat() == "2026-12-07T15:00:00+05:30"


def test_live_waiting_and_in_progress_calls_and_the_age_limit():
    now = at(700)
    calls = [NOT_ENDED, Call("w2", number_id=2, started_at=at(650), last_event="call_init"),
             Call("w-out", direction="outbound", started_at=at(650), last_event="call_init"),  # ringing out: not waiting
             Call("b1", number_id=1, user_id=7, started_at=at(500), bridged_at=at(520), last_event="call_bridged"),
             Call("b2", direction="outbound", user_id=7, started_at=at(600), bridged_at=at(610), last_event="call_bridged"),
             Call("stale", started_at=at(700 - 5 * 3600), last_event="call_init"),  # its hangup never came
             ANSWERED_FAST]
    got = live(calls, now, max_age=4 * 3600)
    assert (got["waiting_now"], got["longest_wait"], got["in_progress"], got["agents_on_calls"]) == (2, 100, 2, 1)
    assert [w["uuid"] for w in got["waiting"]] == ["w1", "w2"] and got["agents"] == [7]
    assert live([], now, 60)["longest_wait"] == 0
