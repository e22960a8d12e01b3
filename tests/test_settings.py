"""Config loading: defaults, environment overrides and errors that name file:line."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from proxy.errors import ConfigErrors
from proxy.settings import load
from proxy.settings.read import Secret, parse_duration, parse_size


def test_example_config_loads() -> None:
    s = load(ROOT / "config" / "jitgate.yaml", environ={})
    assert s.listen.port == 8080
    assert str(s.upstream.url) == "http://127.0.0.1:8081"
    assert s.redis.url is None  # embedded
    assert s.policy_file == ROOT / "config" / "policy.yaml"
    assert s.state_dir.resolve() == ROOT / ".jitgate"
    assert s.identity.hs_secret is not None


def test_environment_overrides(tmp_path: Path) -> None:
    env = {
        "JITGATE_UPSTREAM__URL": "http://10.1.2.3:9000",
        "JITGATE_LISTEN__PORT": "9999",
        "JITGATE_REDIS__URL": "redis://127.0.0.1:7000/2",
        "JITGATE_AUDIT__STDOUT": "true",
        "OTHER": "ignored",
    }
    s = load(ROOT / "config" / "jitgate.yaml", environ=env)
    assert str(s.upstream.url) == "http://10.1.2.3:9000"
    assert s.listen.port == 9999
    assert s.redis.url == "redis://127.0.0.1:7000/2"
    assert s.audit.stdout is True


def test_bad_environment_override_names_the_variable() -> None:
    with pytest.raises(ConfigErrors) as exc:
        load(ROOT / "config" / "jitgate.yaml", environ={"JITGATE_LISTEN__PORT": "http"})
    assert "env JITGATE_LISTEN__PORT: listen.port: must be an integer" in str(exc.value)


def test_errors_name_file_line_and_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "listen:\n"
        "  port: eighty\n"
        "upstream:\n"
        "  url: ftp://x\n"
        "  read_timeout: -1\n"
        "identity:\n"
        "  algorithms: [none]\n"
        "  hs_secret: short\n"
        "bogus: 1\n"
    )
    with pytest.raises(ConfigErrors) as exc:
        load(cfg, environ={})
    text = str(exc.value)
    assert f"{cfg}:2: listen.port: must be an integer" in text
    assert f"{cfg}:4: upstream.url: must be an http(s) URL" in text
    assert f"{cfg}:5: upstream.read_timeout: must be greater than 0" in text
    assert f"{cfg}:7: identity.algorithms: unsupported algorithm 'none'" in text
    assert f"{cfg}:8: identity.hs_secret: must be at least 32 characters" in text
    assert f"{cfg}:9: bogus: unknown field" in text


def test_yaml_syntax_error_is_located(tmp_path: Path) -> None:
    from proxy.errors import ConfigError

    cfg = tmp_path / "broken.yaml"
    cfg.write_text("listen:\n  port: 1\n upstream: [\n")
    with pytest.raises(ConfigError) as exc:
        load(cfg, environ={})
    assert str(exc.value).startswith(f"{cfg}:3: invalid YAML")


def test_secret_never_shows_its_value() -> None:
    s = load(ROOT / "config" / "jitgate.yaml", environ={})
    assert "demo-only" not in repr(s)
    assert repr(Secret("x" * 40)) == "Secret('********')"
    assert Secret("abc").reveal() == "abc"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), (45, 45)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "5x", "-5m", "0", "m5", "1.5.2h", 1.7976931348623155e308, "36501d", "inf"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_production_example_is_valid(tmp_path: Path) -> None:
    key = tmp_path / "idp.pem"
    key.write_text("placeholder")  # settings only check the file exists
    s = load(
        ROOT / "config" / "production.example.yaml",
        environ={"JITGATE_IDENTITY__PUBLIC_KEY_FILES": f"[{key}]", "SPLUNK_HEC_TOKEN": "t0k"},
    )
    assert s.redis.url == "redis://redis.internal:6379/3"
    assert s.audit.http[0].headers == (("Authorization", Secret("Splunk t0k")),)
    assert s.audit.strict and s.audit.file and s.audit.file.rotate_daily
    assert s.identity.dev_key is None and s.identity.hs_secret is None
    assert s.identity.algorithms == ("RS256", "ES256")


def _config(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "jitgate.yaml"
    cfg.write_text(
        f"upstream: {{url: 'http://127.0.0.1:8081'}}\nidentity: {{hs_secret: {'s' * 32}}}\n" + text
    )
    return cfg


def test_notifications_defaults_and_fields(tmp_path: Path) -> None:
    assert load(_config(tmp_path, ""), environ={}).notifications.webhooks == ()
    cfg = _config(
        tmp_path,
        "notifications:\n"
        "  public_url: https://jitgate.example.com/\n"
        "  expiring_before: 10m\n"
        "  check_interval: 2\n"
        "  retries: 0\n"
        "  webhooks:\n"
        "    - url: https://hooks.slack.com/services/T0/B0/secret\n"
        "      format: slack\n"
        "      events: [break_glass, expiring]\n"
        "      timeout: 2.5\n"
        "    - url: http://127.0.0.1:9000/hook\n",
    )
    n = load(cfg, environ={}).notifications
    assert (n.public_url, n.expiring_before, n.check_interval) == (
        "https://jitgate.example.com", 600, 2,
    )  # fmt: skip
    assert (n.retries, n.backoff, n.queue_max) == (0, 0.5, 10_000)
    slack, plain = n.webhooks
    assert (slack.format, slack.events, slack.timeout) == (
        "slack", {"break_glass", "expiring"}, 2.5,
    )  # fmt: skip
    assert slack.url.reveal().endswith("/secret") and "secret" not in repr(n)
    assert slack.origin == "https://hooks.slack.com"
    assert (plain.format, plain.timeout) == ("json", 5.0)
    assert plain.events == {"requested", "approved", "denied", "break_glass", "expiring"}


def test_notification_errors_name_file_line_and_field(tmp_path: Path) -> None:
    cfg = _config(
        tmp_path,
        "notifications:\n"  # 3
        "  public_url: jitgate.example.com\n"  # 4
        "  expiring_before: soon\n"  # 5
        "  retries: -1\n"  # 6
        "  backoff: 0\n"  # 7
        "  webhooks:\n"  # 8
        "    - url: ftp://x/secret-path\n"  # 9
        "      format: teams\n"  # 10
        "      events: [requested, revoked]\n"  # 11
        "      timeout: 0\n"  # 12
        "    - format: json\n"  # 13
        "    - just-a-string\n"  # 14
        "    - url: http://ok/\n"  # 15
        "      events: []\n"  # 16
        "      colour: red\n"  # 17
        "  channel: '#ops'\n",  # 18
    )
    with pytest.raises(ConfigErrors) as exc:
        load(cfg, environ={})
    text = str(exc.value)
    expected = [
        f"{cfg}:4: notifications.public_url: must be an http(s) URL",
        f"{cfg}:5: notifications.expiring_before: invalid duration 'soon'",
        f"{cfg}:6: notifications.retries: must not be negative",
        f"{cfg}:7: notifications.backoff: must be greater than 0",
        f"{cfg}:9: notifications.webhooks[0].url: must be an http(s) URL with a host, got scheme"
        " 'ftp'",
        f"{cfg}:10: notifications.webhooks[0].format: must be one of json, slack, got 'teams'",
        f"{cfg}:11: notifications.webhooks[0].events: unknown event 'revoked'",
        f"{cfg}:12: notifications.webhooks[0].timeout: must be greater than 0",
        f"{cfg}:13: notifications.webhooks[1].url: is required",
        f"{cfg}:14: notifications.webhooks[2]: must be a mapping with a url",
        f"{cfg}:16: notifications.webhooks[3].events: must name at least one event",
        f"{cfg}:17: notifications.webhooks[3].colour: unknown field",
        f"{cfg}:18: notifications.channel: unknown field",
    ]
    for line in expected:
        assert line in text, f"{line}\n--- not in ---\n{text}"
    assert "secret-path" not in text  # a webhook URL may be a credential


def test_webhooks_from_the_environment(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "")
    env = {"JITGATE_NOTIFICATIONS__WEBHOOKS": "[{url: 'http://hooks.internal/x', format: slack}]"}
    (hook,) = load(cfg, environ=env).notifications.webhooks
    assert (hook.url.reveal(), hook.format) == ("http://hooks.internal/x", "slack")
    env = {"JITGATE_NOTIFICATIONS__WEBHOOKS": "[{url: 'http://hooks.internal/x', format: xml}]"}
    with pytest.raises(ConfigErrors) as exc:
        load(cfg, environ=env)
    assert str(exc.value) == (
        "env JITGATE_NOTIFICATIONS__WEBHOOKS: notifications.webhooks[0].format: "
        "must be one of json, slack, got 'xml'"
    )


def test_audit_hmac_key_defaults_and_fields(tmp_path: Path) -> None:
    a = load(_config(tmp_path, ""), environ={}).audit
    assert a.hmac_key is None and a.key_id == "k1"
    assert (a.checkpoint_every, a.checkpoint_interval) == (1000, 60.0)
    key = "k" * 32
    text = f"audit:\n  hmac_key: {key}\n  key_id: k2\n  checkpoint_every: 50\n"
    a = load(_config(tmp_path, text + "  checkpoint_interval: 5\n"), environ={}).audit
    assert a.hmac_key == Secret(key) and key not in repr(a)
    assert (a.key_id, a.checkpoint_every, a.checkpoint_interval) == ("k2", 50, 5.0)


def test_audit_hmac_key_errors_name_file_line_and_never_the_key(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "audit:\n  hmac_key: too-short-key\n  checkpoint_every: 0\n")
    with pytest.raises(ConfigErrors) as exc:
        load(cfg, environ={})
    text = str(exc.value)
    assert f"{cfg}:4: audit.hmac_key: must be at least 32 characters" in text
    assert f"{cfg}:5: audit.checkpoint_every: must be greater than 0" in text
    assert "too-short-key" not in text
    digits = "1234567890" * 4
    with pytest.raises(ConfigErrors) as exc:
        load(_config(tmp_path, ""), environ={"JITGATE_AUDIT__HMAC_KEY": digits})
    text = str(exc.value)
    assert "env JITGATE_AUDIT__HMAC_KEY: audit.hmac_key: must be a string" in text
    assert digits not in text


def test_audit_sinks_defaults_and_shapes(tmp_path: Path) -> None:
    a = load(_config(tmp_path, ""), environ={}).audit
    assert a.redis is not None and (a.redis.stream, a.redis.maxlen, a.redis.retention) == (
        "audit",
        1_000_000,
        None,
    )
    assert a.file is None and a.http == () and not a.strict
    assert a.spool and a.spool_dir == tmp_path.parent / ".jitgate" / "audit-spool"
    text = (
        "audit:\n"
        "  redis: {stream: trail, maxlen: null, retention: 90d}\n"
        "  file: {path: logs/a.jsonl, rotate_bytes: 100MB, rotate_daily: true, retention: 1w}\n"
        "  spool: {dir: sp, max_bytes: 2GiB}\n"
        "  strict: true\n"
        "  http:\n"
        "    - {name: loki, url: 'http://loki:3100/loki/api/v1/push', format: loki, gzip: true}\n"
        "    - name: splunk\n"
        "      url: https://hec:8088/services/collector/event\n"
        "      format: splunk\n"
        "      headers: {Authorization: 'Splunk ${HEC}'}\n"
    )
    a = load(_config(tmp_path, text), environ={"HEC": "s3cret"}).audit
    assert a.redis is not None and (a.redis.stream, a.redis.maxlen) == ("trail", None)
    assert a.redis.retention == 90 * 86400
    assert a.file is not None and a.file.path == tmp_path / "logs" / "a.jsonl"
    assert (a.file.rotate_bytes, a.file.rotate_daily, a.file.retention) == (
        100 << 20,
        True,
        7 * 86400,
    )
    assert a.spool_dir == tmp_path / "sp" and a.spool_max_bytes == 2 << 30 and a.strict
    assert [(h.name, h.format, h.gzip) for h in a.http] == [
        ("loki", "loki", True),
        ("splunk", "splunk", False),
    ]
    assert a.http[1].headers == (("Authorization", Secret("Splunk s3cret")),)
    assert "s3cret" not in repr(a)
    a = load(
        _config(tmp_path, "audit: {redis: null, spool: null, file: x.jsonl}\n"), environ={}
    ).audit
    assert a.redis is None and not a.spool and a.file is not None and a.file.rotate_bytes is None


def test_audit_sink_errors_name_the_field(tmp_path: Path) -> None:
    text = (
        "audit:\n"
        "  redis: {maxlen: 0}\n"
        "  file: {path: a.jsonl, retention: 30d}\n"
        "  spool: {max_bytes: lots}\n"
        "  http:\n"
        "    - {name: a, url: 'ftp://x', format: xml}\n"
        "    - {name: a, url: 'http://x', headers: {Authorization: '${NOPE}'}}\n"
        "    - {url: 'http://x'}\n"
    )
    cfg = _config(tmp_path, text)
    with pytest.raises(ConfigErrors) as exc:
        load(cfg, environ={})
    text = str(exc.value)
    for line, message in (
        (4, "audit.redis.maxlen: must be greater than 0"),
        (5, "audit.file.retention: needs rotate_bytes or rotate_daily"),
        (6, "audit.spool.max_bytes: invalid size 'lots'"),
        (8, "audit.http[0].url: must be an http(s) URL, got scheme 'ftp'"),
        (8, "audit.http[0].format: must be one of jsonl, splunk, elastic, loki, got 'xml'"),
        (9, "audit.http[1].name: 'a' is used twice"),
        (9, "audit.http[1].headers: header Authorization: environment variable NOPE is not set"),
        (10, "audit.http[2].name: is required"),
    ):
        assert f"{cfg}:{line}: {message}" in text, (message, text)


def test_parse_size() -> None:
    assert [parse_size(x) for x in (512, "512", "4KB", "4k", "100MB", "1GiB", "2 gb")] == [
        512,
        512,
        4096,
        4096,
        100 << 20,
        1 << 30,
        2 << 30,
    ]
    for bad in ("", "1.5GB", "-1", "0", "ten", True, "5PB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_audit_http_headers_must_be_a_mapping_of_strings(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "audit:\n  http:\n    - {name: c, url: 'http://c', headers: [x]}\n")
    with pytest.raises(ConfigErrors) as exc:
        load(cfg, environ={})
    assert f"{cfg}:5: audit.http[0].headers: must map header names to strings" in str(exc.value)


def test_grant_view_settings(tmp_path: Path) -> None:
    s = load(ROOT / "config" / "jitgate.yaml", environ={})
    assert (s.redis.local_view, s.redis.view_lag) == (True, 0.1)
    cfg = _config(tmp_path, "redis: {local_view: false, view_lag: 0.25}\n")
    s = load(cfg, environ={})
    assert (s.redis.local_view, s.redis.view_lag) == (False, 0.25)
    cfg = _config(tmp_path, "redis: {local_view: sometimes, view_lag: 0}\n")
    with pytest.raises(ConfigErrors) as exc:
        load(cfg, environ={})
    text = str(exc.value)
    assert "redis.local_view: must be" in text and "redis.view_lag: must be greater than 0" in text


def test_listen_limits_defaults_and_errors(tmp_path: Path) -> None:
    s = load(_config(tmp_path, ""), environ={})
    assert (s.listen.max_line_bytes, s.listen.max_headers, s.listen.keepalive_timeout) == (
        8190, 100, 75.0,
    )  # fmt: skip
    assert (s.listen.max_body_bytes, s.listen.max_ws_message_bytes) == (64 << 20, 4 << 20)
    cfg = _config(tmp_path, "listen: {max_headers: 20, max_body_bytes: 1000}\n")
    s = load(cfg, environ={})
    assert (s.listen.max_headers, s.listen.max_body_bytes) == (20, 1000)
    with pytest.raises(ConfigErrors, match=r"listen\.max_headers: must be greater than 0"):
        load(_config(tmp_path, "listen: {max_headers: 0}\n"), environ={})
