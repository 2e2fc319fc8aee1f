"""Stop strings that span stream chunks never leak to the client."""

from kvfleet.controller.router.stops import StopMatcher


def run(deltas, stops):
    m = StopMatcher(stops)
    out = []
    for d in deltas:
        text, stopped = m.feed(d)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def test_a_stop_string_split_across_single_character_deltas_is_cut_before_it():
    assert run(list("Hello\n\nWorld"), ["\n\n"]) == ("Hello", True)


def test_the_earliest_of_several_stop_strings_wins():
    assert run(["abc END x STOP"], ["STOP", "END"]) == ("abc ", True)


def test_a_partial_match_that_does_not_complete_is_released():
    assert run(["Hel", "l", "o wor", "ld"], ["lol"]) == ("Hello world", False)


def test_held_text_is_flushed_at_the_end_of_the_stream():
    assert run(["ab", "c\n"], ["\n\n"]) == ("abc\n", False)


def test_no_stop_strings_passes_text_through_unchanged():
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False)
