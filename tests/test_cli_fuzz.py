"""Hostile values for every option of every `refinery` command: each run ends with exit
status 0, 2 (one line `error [code] ...`, or click's usage message) or 3 (a wait that
timed out), never 1, and never a traceback.

The command runs in this process (click's CliRunner) against a real redis-server and
moto's S3 server with no workers, so jobs submitted here stay queued; a second set of
runs points it at a Redis port and an S3 port where nothing listens.
"""

from __future__ import annotations

import signal
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli import refinery
from devstack.stack import LocalStack, free_port
from producer.client import Client
from shared.settings import get_settings

pytestmark = pytest.mark.integration

CASE_TIMEOUT_S = 30
DEEP_JSON = "[" * 5000 + "]" * 5000  # json.loads raises RecursionError, not JSONDecodeError
UNDECODABLE = b"caf\xe9 \xff\xfe".decode("utf-8", "surrogateescape")  # argv bytes that are not UTF-8

TEXT = ["", " ", "x" * 100_000, UNDECODABLE, "\x00", "-1", "--json", "\u202e\u0000\U0001f600"]
INTEGER = ["abc", "", "-1", "0", "1.5", "1e3", "0x10", "NaN", "9" * 40, "-" + "9" * 40, UNDECODABLE]
NUMBER = ["abc", "", "nan", "NaN", "inf", "-inf", "-1", "0", "1e309", "-1e309", "9" * 400, UNDECODABLE]
JSON = ["{", "[]", "null", "1", '"text"', '{"a": NaN}', '{"a": 1e999}', DEEP_JSON, "{" * 100_000, UNDECODABLE]
JSON += ['{"k": "' + "v" * 100_000 + '"}']
URI = ["s3://", "s3:///key", "s3://bucket", "s3://bucket/", "s3://b/key", "s3://Bad_Bucket/key"]
URI += ["s3://bucket/../etc/passwd", "s3://bucket/" + "k" * 5000, "s3://other-bucket/key", "http://x/y"]
URI += ["file:///etc/passwd", "not a uri", "", "\x00", UNDECODABLE]
CALLBACK = ["http://[::1", "http://10.0.0.1/hook", "ftp://example.com/", "http://", "https://" + "a" * 5000]
CALLBACK += ["http://localhost:0/", "http://169.254.169.254/latest", "javascript:alert(1)", "", UNDECODABLE]
JOB_ID = ["", "x" * 100_000, "../../etc", "*", "\x00", UNDECODABLE, "refinery:job:*"]


def files(tmp: Path) -> list[str]:
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "text.png").write_text("not an image")
    (tmp / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x10\x00")
    return [str(tmp / "missing.png"), str(tmp), str(tmp / "empty.png"), str(tmp / "text.png")]


def cases(tmp: Path, cancelled: str, bucket: str) -> Iterator[tuple[list[str], str]]:
    """(argv, what it varies): each hostile value in the place of one valid option."""
    generate = ["submit", "generate", "--prompt", "a portrait", "--width", "256", "--height", "256"]
    job = {
        "--format": ["gif", "", "PNG"],
        "--callback-url": CALLBACK,
        "--idempotency-key": TEXT + ["a b", "k" * 201],
        "--metadata": JSON,
        "--priority": ["urgent", ""],
        "--deadline": NUMBER + ["604801"],
        "--timeout": NUMBER,
    }
    submit_options = {
        "--prompt": TEXT,
        "--seed": INTEGER + [str(2**32), str(2**64)],
        "--width": INTEGER + ["255", "4096", "1000"],
        "--height": INTEGER,
        "--steps": INTEGER + ["101"],
        "--guidance": NUMBER + ["21"],
    }
    for option, values in {**submit_options, **job}.items():
        extra = ["--wait"] if option == "--timeout" else []
        for value in values:
            yield [*_replace(generate, option, value), *extra], f"generate {option}"
    refine = ["submit", "refine"]
    for value in URI:
        yield [*refine, "--input", value], "refine --input"
    for value in files(tmp):
        yield [*refine, "--file", value], "refine --file"
    yield [*refine, "--file", str(tmp / "text.png"), "--input", "s3://b/k"], "refine both"
    yield refine, "refine neither"
    for option, values in job.items():
        for value in values:
            yield [*refine, "--input", f"s3://{bucket}/in.png", option, value], f"refine {option}"
    for command in ("status", "wait", "cancel"):
        for value in JOB_ID:
            yield [command, value], f"{command} JOB_ID"
    for value in NUMBER:
        yield ["wait", cancelled, "--timeout", value], "wait --timeout"
    for value in INTEGER:
        yield ["dead-letters", "--limit", value], "dead-letters --limit"
    pairs = ["pairs", "generate", "--count", "1", "--out", f"s3://{bucket}/fuzz", "--no-wait"]
    pairs_options = {
        "--count": INTEGER,
        "--out": URI + [str(tmp / "text.png")],
        "--student": TEXT + ["flux-dev"],
        "--teacher": TEXT,
        "--width": INTEGER,
        "--height": INTEGER,
        "--seed": INTEGER,
    }
    for option, values in pairs_options.items():
        for value in values:
            yield _replace(pairs, option, value), f"pairs generate {option}"
    for value in URI:
        yield ["pairs", "status", "--out", value], "pairs status --out"
    for option in ("--count", "--seed", "--top"):
        for value in INTEGER:
            yield ["pairs", "prompts", "--count", "3", *_replace([], option, value)], f"pairs prompts {option}"
    for command in ("train", "eval"):
        for value in [*URI, *files(tmp)]:
            yield [command, "--data", value, "--out", str(tmp / "run")], f"{command} --data"
    for value in TEXT:
        yield ["doctor", "--queues", value], "doctor --queues"
    for argv in (["status"], ["status", "--json"], ["workers"], ["workers", "--json"], ["workers", "--file-sd"]):
        yield argv, "no options"
    for option, values in {"--jobs": INTEGER, "--refiner": [str(tmp / "missing"), str(tmp / "text.png")]}.items():
        for value in values:
            yield ["demo", "--out", str(tmp / "demo-out"), option, value], f"demo {option}"


def _replace(argv: list[str], option: str, value: str) -> list[str]:
    if option not in argv:
        return [*argv, option, value]
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("fuzz"), s3_retry_budget_s=0, s3_max_attempts=1) as local:
        yield local


class Hung(Exception):
    pass


def _hung(signum: int, frame: object) -> None:
    raise Hung(f"no answer after {CASE_TIMEOUT_S} s")


def run(args: list[str], env: dict[str, str]) -> Result:
    """One in-process run; one that hangs ends as an exception after CASE_TIMEOUT_S."""
    get_settings.cache_clear()  # the command reads its settings from env
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT_S)
    try:
        return CliRunner().invoke(refinery, args, env=env)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        get_settings.cache_clear()


def trouble(result: Result, args: list[str]) -> str | None:
    """What is wrong with how the command ended, if anything."""
    shown = [a if len(a) < 80 else a[:80] + "..." for a in args]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"{shown}: {''.join(traceback.format_exception(*result.exc_info))}"
    if result.exit_code not in (0, 2, 3) or "Traceback" in result.output:
        return f"{shown}: exit {result.exit_code}: {result.output}"
    lines = result.stderr.strip().splitlines()
    # Our typed error is one line; a usage error ends with click's "Error:" line (or, for
    # the options train and eval pass on, argparse's "refinery train: error:"); doctor's
    # failed checks are its report on stdout.
    typed = len(lines) == 1 and lines[0].startswith("error [")
    usage = bool(lines) and (lines[-1].startswith("Error:") or f"refinery {args[0]}: error:" in lines[-1])
    report = args[0] == "doctor" and not lines and bool(result.stdout.strip())
    if result.exit_code == 2 and not (typed or usage or report):
        return f"{shown}: exit 2 without the one-line error: {result.stderr}"
    return None


def test_hostile_option_values_get_a_typed_error(stack: LocalStack, tmp_path: Path) -> None:
    env = {key: value for key, value in stack.env.items() if key.startswith("REFINERY_")}
    client = Client(stack.settings)
    cancelled = client.submit_generate("to be cancelled", width=256, height=256).job_id
    client.cancel(cancelled)
    runs = list(cases(tmp_path, cancelled, stack.settings.s3_bucket))
    assert len(runs) > 300
    problems = [problem for args, _ in runs if (problem := trouble(run(args, env), args))]
    assert not problems, "\n\n".join(problems)


def test_an_unreachable_redis_or_s3_is_one_line(stack: LocalStack, tmp_path: Path) -> None:
    env = {key: value for key, value in stack.env.items() if key.startswith("REFINERY_")}
    env["REFINERY_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env["REFINERY_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "face.png").write_bytes(b"")
    for args in (
        ["submit", "generate", "--prompt", "a portrait", "--width", "256", "--height", "256"],
        ["submit", "refine", "--input", f"s3://{stack.settings.s3_bucket}/in.png"],
        ["status", "some-job"],
        ["status"],
        ["wait", "some-job", "--timeout", "1"],
        ["cancel", "some-job"],
        ["dead-letters"],
        ["workers"],
        ["pairs", "status", "--out", f"s3://{stack.settings.s3_bucket}/fuzz"],
        ["pairs", "generate", "--count", "2", "--out", f"s3://{stack.settings.s3_bucket}/fuzz", "--no-wait"],
    ):
        result = run(args, env)
        assert trouble(result, args) is None, trouble(result, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith(("error [broker_unavailable]", "error [storage_unavailable]")), result.stderr
    doctor = run(["doctor", "--json"], env)
    assert trouble(doctor, ["doctor", "--json"]) is None, doctor.output
    assert doctor.exit_code == 2 and '"name": "redis", "status": "fail"' in doctor.stdout


def test_a_malformed_setting_is_one_line(stack: LocalStack) -> None:
    env = {key: value for key, value in stack.env.items() if key.startswith("REFINERY_")}
    result = run(["status", "some-job"], {**env, "REFINERY_MAX_QUEUE_DEPTH": "many"})
    assert result.exit_code == 2
    assert result.stderr.startswith("error [invalid_input] REFINERY_MAX_QUEUE_DEPTH: Input should be a valid integer")
