"""Bad command-line arguments are argparse's one error line and exit 2, never a traceback or a silent default
(issue 26, case 13)."""

import pytest

from analytics_views_tests.operations.test_cli import run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dev", "--port", "-1"], "argument --port: -1 is not between 1 and 65535"),
        (["dev", "--port", "99999"], "argument --port: 99999 is not between 1 and 65535"),
        (["dev", "--port", "http"], "argument --port: 'http' is not a whole number"),
        (["seed", "--users", "100000000000000000000"], "argument --users: 100000000000000000000 is not between 1 and"),
        (["seed", "--days", "0"], "argument --days: 0 is not between 1 and"),
        (["refresh", "--all", "--wait", "-5"], "argument --wait: -5 is not between 0 and"),
        (["refresh", "--all", "--wait", "nan"], "argument --wait: nan is not between 0 and"),
    ],
)
def test_an_out_of_range_argument_is_refused_in_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(message) or message in result.stderr.strip().splitlines()[-1]
