"""The one progress bar: a run whose stderr is not a terminal gets periodic log lines, not silence."""

import re

from anyquant.progress import progress_bar


def test_redirected_stderr_gets_log_lines(capsys):
    with progress_bar("evaluating", 4, unit="windows", remaining=True, every=0.0) as advance:
        for _ in range(4):
            advance(1)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4, err
    assert re.fullmatch(r"anyquant: evaluating: 2/4 windows \(50%\), \S+ windows/s, ETA \d+s", err[1]), err[1]
    assert re.fullmatch(r"anyquant: evaluating: 4/4 windows \(100%\), \S+ windows/s, done in \d+s", err[3]), err[3]


def test_log_lines_are_periodic(capsys):
    with progress_bar("quantizing (int4)", 100, every=3600) as advance:
        for _ in range(100):
            advance()
    err = capsys.readouterr().err.splitlines()
    assert err == [e for e in err if "100/100 (100%)" in e] and len(err) == 1, err  # only the final line


def test_disabled_is_silent(capsys):
    with progress_bar("x", 3, enabled=False) as advance:
        advance(3)
    assert capsys.readouterr().err == ""
