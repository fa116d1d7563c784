"""Database URLs are read by one function: passwords with @ : / % # ? work percent-encoded, and a URL that
does not parse is one line quoting nothing of it but host, port and database."""

from urllib.parse import quote

import pytest
from sqlalchemy.engine import make_url

from analytics_views.orchestration.dagster_storage import check_storage_url
from analytics_views.postgres.database import describe_target, parse_url, redact, with_database
from analytics_views.errors import AnalyticsViewsError

# Every character that means something in a URL, and pieces long enough to be recognised in any text.
SPECIAL_PASSWORDS = ["ab@cd:Ef9Secret", "Qz@9:vK/w%Xj#Rt?5m", "p/ss#wo?rd%zz", "::@@//??##%%", "Tr0ub4dor&3=x"]


def secret_windows(password: str) -> set[str]:
    """Every 4-character run of the password, raw and percent-encoded: any longer piece contains one."""
    forms = {password, quote(password, safe="")}
    return {form[i : i + 4] for form in forms for i in range(len(form) - 3)}


def assert_no_piece(text: str, password: str) -> None:
    found = sorted(window for window in secret_windows(password) if window in text)
    assert found == [], text


@pytest.mark.parametrize("password", SPECIAL_PASSWORDS)
@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"])
def test_a_percent_encoded_password_is_read_whole_by_libpq_and_sqlalchemy(password, scheme):
    url = f"{scheme}://analyst:{quote(password, safe='')}@db.example.com:6543/analytics?sslmode=disable"
    parsed = parse_url(url)
    assert (parsed.user, parsed.password, parsed.host, parsed.port, parsed.dbname) == (
        "analyst", password, "db.example.com", "6543", "analytics",
    )
    assert parsed.params["sslmode"] == "disable"
    storage = make_url(url)  # what dagster-postgres hands SQLAlchemy: the URL as given
    assert (storage.drivername, storage.password, storage.host, storage.port, storage.database) == (
        scheme, password, "db.example.com", 6543, "analytics",
    )
    other = parse_url(with_database(url, "dagster"))
    assert (other.password, other.dbname, other.params["sslmode"]) == (password, "dagster", "disable")


@pytest.mark.parametrize(
    ("password", "told"),
    [
        ("ab@cd:Ef9Secret", "(host 127.0.0.1, port 5432, database analytics) has an @ or / that is not percent-encoded"),
        ("Qz@9:vK/w%Xj#Rt?5m", "(host 127.0.0.1, port 5432, database analytics) has an @ or / that is not percent-encoded"),
        ("p/ss#wo?rd%zz", "(host 127.0.0.1, port 5432, database analytics) has an @ or / that is not percent-encoded"),
        ("Se%zzcret7", "(host 127.0.0.1, port 5432, database analytics) is not a valid PostgreSQL URL"),
    ],
)
@pytest.mark.parametrize("variable", ["DATABASE_URL", "DAGSTER_POSTGRES_URL"])
def test_an_unencoded_password_is_one_line_with_only_host_port_and_database(password, told, variable):
    url = f"postgresql://analyst:{password}@127.0.0.1:5432/analytics"
    with pytest.raises(AnalyticsViewsError) as raised:
        parse_url(url, variable)
    message = str(raised.value)
    assert message.startswith(f"{variable} {told}: percent-encode the user name and password")
    assert "urllib.parse.quote(password, safe='')" in message and "\n" not in message
    assert raised.value.__cause__ is None and (raised.value.__context__ is None or raised.value.__suppress_context__)
    assert_no_piece(message, password)


def test_the_measured_password_no_longer_becomes_a_port():
    with pytest.raises(AnalyticsViewsError) as raised:
        check_storage_url("postgresql://analyst:ab@cd:Ef9Secret@127.0.0.1:5432/dagster")
    assert "Ef9Secret" not in str(raised.value) and "DAGSTER_POSTGRES_URL (host 127.0.0.1" in str(raised.value)


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("postgresql://analyst:Hunter22x/analytics", "Hunter22x"),  # no host: libpq would read it as host:port
        ("postgresql://analyst@db/analytics?password=ab@cdSecret9", "cdSecret9"),  # '@' in the query
        ("postgresql://analyst@db/analytics?password=Se%zzcret99", "Se%zzcret99"),
    ],
)
def test_nothing_after_an_at_sign_in_the_query_or_a_password_taken_for_a_port_is_quoted(url, secret):
    with pytest.raises(AnalyticsViewsError) as raised:
        parse_url(url)
    assert_no_piece(str(raised.value), secret)


def test_a_port_that_is_not_a_number_is_named_when_it_cannot_be_a_password():
    with pytest.raises(AnalyticsViewsError, match="DATABASE_URL has port '54x2', which is not a number"):
        parse_url("postgresql://analyst:pw@db:54x2/analytics")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://analyst:pw@db.example.com:6543/analytics", "db.example.com:6543/analytics"),
        ("postgresql://analyst:pw@/analytics?host=/run/postgresql", "analytics on the socket in /run/postgresql"),
        ("host=/run/postgresql dbname=analytics user=analyst", "analytics on the socket in /run/postgresql"),
        ("postgresql://analyst:ab@cd:Ef9Secret@127.0.0.1:5432/analytics", "<unparsable URL>"),
    ],
)
def test_describe_target_names_host_port_and_database_only(url, expected):
    assert describe_target(url) == expected


@pytest.mark.parametrize("password", SPECIAL_PASSWORDS)
def test_redact_hides_every_piece_of_the_password_in_any_form(password):
    encoded = quote(password, safe="")
    url = f"postgresql://analyst:{encoded}@db/analytics"
    pieces = [password, encoded, *password.split("@"), *password.split(":"), password[1:-1], encoded[2:-2]]
    text = " | ".join(f"could not translate host name {piece!r}" for piece in pieces)
    redacted = redact(text, url)
    assert_no_piece(redacted, password)
    assert redacted.count("could not translate host name") == len(pieces)  # the rest of the text is kept


def test_redact_of_an_unparsable_url_still_hides_its_password():
    url = "postgresql://analyst:ab@cd:Ef9Secret@127.0.0.1:5432/analytics"
    assert redact("invalid port 'Ef9Secret@127.0.0.1:5432' and user:ab@cd", url) == "invalid port '***@127.0.0.1:5432' and user:***"
