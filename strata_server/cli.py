"""``strata``: the operator's command line, a client of ``strata serve`` (SPEC §9).

Exit status: 0 done, 1 a typed error from the daemon (its ``code`` printed on stderr, or the
error object on stdout with ``--json``), 2 a usage error (typer's). Tables are for people;
``--json`` prints the API's JSON. ``--wait`` follows the event stream (``GET /events``) and
draws a progress bar per image until it is optimized or has failed (has a ``last_error``).
Anything that is not an :class:`~strata_server.client.ApiError` is a bug and keeps its
traceback.

Imports: its own package (``strata_server.client``, ``strata_server.progress``;
``strata_server.serve`` when it runs ``strata serve``); typer, rich, click; the standard library.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from strata_server.client import ApiError, Endpoint, StrataClient
from strata_server.progress import follow_stream

P = ParamSpec("P")
R = TypeVar("R")

app = typer.Typer(
    name="strata",
    help="Drive a Strata host daemon (strata serve).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
repo_app = typer.Typer(help="Storage repositories.", no_args_is_help=True)
image_app = typer.Typer(help="Images: virtual disks and snapshots.", no_args_is_help=True)
app.add_typer(repo_app, name="repo")
app.add_typer(image_app, name="image")

out = Console()
err = Console(stderr=True)


class FixType(StrEnum):
    clean = "clean"
    optimize = "optimize"
    merge = "merge"
    mend = "mend"


class Strategy(StrEnum):
    space = "space"
    performance = "performance"


_SIZE = re.compile(r"(\d+)([KMGT]?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """``SIZE``: bytes, or a whole number with ``K``, ``M``, ``G`` or ``T`` (powers of 1024).
    Whether the size is acceptable (not zero, not absurd) is the engine's to say."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r}: bytes, or a whole number with K, M, G or T (1G, 512M)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        raise typer.BadParameter(f"not JSON: {e}") from e


@dataclass
class Session:
    """What the global options chose: where the daemon is, and how to print."""

    endpoint: Endpoint
    as_json: bool

    def client(self) -> StrataClient:
        return StrataClient(self.endpoint)

    def emit(self, value: Any, human: Callable[[], None]) -> None:
        if self.as_json:
            out.print_json(json.dumps(value))
        else:
            human()


def _session(ctx: typer.Context) -> Session:
    session = ctx.find_object(Session)
    if session is None:  # only when a command is invoked without the group's callback
        raise RuntimeError("strata: no session; run commands through strata_server.cli:main")
    return session


def _fail(session: Session | None, error: ApiError) -> NoReturn:
    if session is not None and session.as_json:
        out.print_json(json.dumps(error.to_dict()))
    else:
        err.print(f"[bold red]error[/]: {error.code}: {error.message}", highlight=False)
    raise typer.Exit(1)


def typed_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the daemon's typed errors into exit status 1, with the code printed."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ApiError as e:
            # typer passes its click Context, not always a typer.Context instance
            find = getattr(kwargs.get("ctx"), "find_object", None)
            _fail(find(Session) if find is not None else None, e)

    return wrapper


@app.callback()
def main_options(
    ctx: typer.Context,
    socket: Annotated[
        str | None,
        typer.Option(
            "--socket",
            envvar="STRATA_SOCKET",
            help="The daemon's Unix socket (default /run/strata/strata.sock).",
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option("--url", envvar="STRATA_URL", help="https://HOST:PORT of the daemon."),
    ] = None,
    token_file: Annotated[
        str | None, typer.Option("--token-file", help="The bearer token, for --url.")
    ] = None,
    cacert: Annotated[
        str | None, typer.Option("--cacert", help="The CA certificate, for --url.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Drive a Strata host daemon (strata serve)."""
    if socket is not None and url is not None:
        given = {ctx.get_parameter_source(n) for n in ("socket", "url")}
        if {getattr(source, "name", None) for source in given} == {"COMMANDLINE"}:
            raise typer.BadParameter("--socket or --url, not both")
        socket = None  # from the environment: --url (or STRATA_URL) is the more specific
    if url is not None and not url.startswith(("https://", "http://")):
        raise typer.BadParameter(f"{url!r} is not an https:// URL", param_hint="--url")
    try:
        endpoint = Endpoint.choose(socket, url, token_file, cacert)
    except OSError as e:
        raise typer.BadParameter(f"cannot read {token_file}: {e}", param_hint="--token-file") from e
    ctx.obj = Session(endpoint, as_json)


# --- the daemon -------------------------------------------------------------------------------


@app.command()
def serve(
    config: Annotated[str, typer.Option("--config", help="The daemon's TOML config file.")],
) -> None:
    """Run the host daemon (one StorageEngine and its HTTP/JSON API)."""
    # Imported here: the client's commands need neither FastAPI nor the engine.
    from strata_server.serve import main as serve_main

    # serve.main sets up logging and turns a bad config into one line and exit status 1
    raise typer.Exit(serve_main(["--config", config]))


# --- repositories -----------------------------------------------------------------------------


def _params(pairs: list[str] | None) -> dict[str, str]:
    params = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--param")
        params[key] = value
    return params


ParamOption = Annotated[
    list[str] | None,
    typer.Option("--param", help="A connection parameter KEY=VALUE (e.g. path=/srv/repo1)."),
]


@repo_app.command("list")
@typed_errors
def repo_list(
    ctx: typer.Context,
) -> None:
    """The repositories the daemon has connected."""
    session = _session(ctx)
    with session.client() as client:
        repos = client.get("/repositories")

    def table() -> None:
        t = Table("REPO", "FORMAT", "IMAGES", "DISKS", "SNAPSHOTS")
        for r in repos:
            t.add_row(
                str(r.get("repo_id")),
                str(r.get("format", "")),
                str(r.get("images", "")),
                str(r.get("virtual_disks", "")),
                str(r.get("snapshots", "")),
            )
        out.print(t)

    session.emit(repos, table)


@repo_app.command("describe")
@typed_errors
def repo_describe(ctx: typer.Context, repo: str) -> None:
    """A repository's format, free space and images counted by kind and status."""
    session = _session(ctx)
    with session.client() as client:
        described = client.get(f"/repositories/{repo}")
    session.emit(described, lambda: _fields(described))


@repo_app.command("create")
@typed_errors
def repo_create(
    ctx: typer.Context,
    repo_format: Annotated[str, typer.Argument(metavar="FORMAT")],
    param: ParamOption = None,
) -> None:
    """Format an empty place as a repository."""
    session = _session(ctx)
    body = {"format": repo_format, "connection_parameters": _params(param)}
    with session.client() as client:
        answer = client.post("/repositories", body)
    session.emit(answer or {}, lambda: out.print("created"))


@repo_app.command("connect")
@typed_errors
def repo_connect(
    ctx: typer.Context,
    repo: str,
    repo_format: Annotated[str, typer.Argument(metavar="FORMAT")],
    param: ParamOption = None,
) -> None:
    """Connect a repository under the name REPO."""
    session = _session(ctx)
    body = {"format": repo_format, "connection_parameters": _params(param)}
    with session.client() as client:
        answer = client.post(f"/repositories/{repo}/connect", body)
    session.emit(answer or {}, lambda: out.print(f"connected {repo}"))


@repo_app.command("disconnect")
@typed_errors
def repo_disconnect(
    ctx: typer.Context,
    repo: str,
    force: Annotated[bool, typer.Option("--force", help="Even while stages run.")] = False,
) -> None:
    """Disconnect a repository."""
    session = _session(ctx)
    with session.client() as client:
        answer = client.post(f"/repositories/{repo}/disconnect", {"force": force})
    session.emit(answer or {}, lambda: out.print(f"disconnected {repo}"))


# --- images -----------------------------------------------------------------------------------


def _fields(value: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None)
    for key, item in value.items():
        t.add_row(f"[bold]{key}[/]", item if isinstance(item, str) else json.dumps(item))
    out.print(t)


def _options(strategy: Strategy | None) -> dict[str, Any] | None:
    return None if strategy is None else {"strategy": strategy.value}


WaitOption = Annotated[
    bool, typer.Option("--wait", help="Show progress until the image is optimized.")
]
UserDataOption = Annotated[
    str | None, typer.Option("--user-data", help="User data, as JSON.", metavar="JSON")
]


@image_app.command("list")
@typed_errors
def image_list(ctx: typer.Context, repo: str) -> None:
    """The images of a repository."""
    session = _session(ctx)
    with session.client() as client:
        images = client.get(f"/repositories/{repo}/images")

    def table() -> None:
        t = Table("IMAGE", "KIND", "SIZE", "DEPTH", "CREATED")
        for i in images:
            t.add_row(
                str(i.get("image_id")),
                str(i.get("kind")),
                str(i.get("size")),
                str(i.get("chain_depth")),
                str(i.get("created")),
            )
        out.print(t)

    session.emit(images, table)


def _with_wait(
    session: Session, repo: str, wait: bool, make: Callable[[StrataClient], Any]
) -> None:
    """Make an image; with ``--wait`` the stream is opened first, so no event is missed."""
    with session.client() as client:
        if not wait:
            answer = make(client)
            session.emit(answer, lambda: out.print(str(answer["image_id"]), highlight=False))
            return
        with client.events() as events:
            answer = make(client)
            image_id = str(answer["image_id"])
            if not session.as_json:
                out.print(image_id, highlight=False)
            follow_stream(client, events, [(repo, image_id)], console=err, quiet=session.as_json)
        if session.as_json:
            out.print_json(json.dumps({"image_id": image_id}))


@image_app.command("create")
@typed_errors
def image_create(
    ctx: typer.Context,
    repo: str,
    size: Annotated[int, typer.Argument(parser=parse_size, metavar="SIZE")],
    base: Annotated[
        str | None, typer.Option("--base", help="A snapshot to start from.", metavar="SNAPSHOT_ID")
    ] = None,
    strategy: Annotated[
        Strategy | None,
        typer.Option("--strategy", help="Volume layout."),
    ] = None,
    user_data: UserDataOption = None,
    wait: WaitOption = False,
) -> None:
    """Create a virtual disk of SIZE (bytes, or 1G, 512M...)."""
    session = _session(ctx)
    body: dict[str, Any] = {"size": size, "user_data": parse_json(user_data)}
    if base is not None:
        body["base_snapshot_id"] = base
    if strategy is not None:
        body["options"] = _options(strategy)
    _with_wait(session, repo, wait, lambda c: c.post(f"/repositories/{repo}/images", body))


@image_app.command("snapshot")
@typed_errors
def image_snapshot(
    ctx: typer.Context,
    repo: str,
    disk_id: str,
    user_data: UserDataOption = None,
    wait: WaitOption = False,
) -> None:
    """Snapshot a virtual disk; the disk stays writable."""
    session = _session(ctx)
    body = {"user_data": parse_json(user_data)}
    _with_wait(
        session,
        repo,
        wait,
        lambda c: c.post(f"/repositories/{repo}/images/{disk_id}/snapshots", body),
    )


@image_app.command("copy")
@typed_errors
def image_copy(
    ctx: typer.Context,
    target_repo: str,
    image_id: str,
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="Copy only the difference from this image.", metavar="IMAGE_ID"
        ),
    ] = None,
    user_data: UserDataOption = None,
    wait: WaitOption = False,
) -> None:
    """Copy an image into TARGET_REPO."""
    session = _session(ctx)
    body: dict[str, Any] = {"image_id": image_id}
    if base is not None:
        body["base_image_id"] = base
    if user_data is not None:
        body["user_data"] = parse_json(user_data)
    _with_wait(
        session, target_repo, wait, lambda c: c.post(f"/repositories/{target_repo}/copies", body)
    )


def _simple(
    ctx: typer.Context, method: str, path: str, body: dict[str, Any] | None, done: str
) -> None:
    session = _session(ctx)
    with session.client() as client:
        answer = client.request(method, path, body)
    session.emit(answer or {}, lambda: out.print(done, highlight=False))


def _answer_fields(ctx: typer.Context, method: str, path: str) -> None:
    """Ask, then print the answer's fields (its JSON with ``--json``)."""
    session = _session(ctx)
    with session.client() as client:
        answer = client.get(path) if method == "GET" else client.post(path)
    session.emit(answer, lambda: _fields(answer))


@image_app.command("remove")
@typed_errors
def image_remove(ctx: typer.Context, repo: str, image_id: str) -> None:
    """Remove an image."""
    _simple(ctx, "DELETE", f"/repositories/{repo}/images/{image_id}", None, f"removed {image_id}")


@image_app.command("info")
@typed_errors
def image_info(ctx: typer.Context, repo: str, image_id: str) -> None:
    """An image's kind, size, user data, creation time and chain depth."""
    _answer_fields(ctx, "GET", f"/repositories/{repo}/images/{image_id}")


@image_app.command("status")
@typed_errors
def image_status(ctx: typer.Context, repo: str, image_id: str) -> None:
    """An image's status and its last progress."""
    _answer_fields(ctx, "GET", f"/repositories/{repo}/images/{image_id}/status")


@image_app.command("wait")
@typed_errors
def image_wait(
    ctx: typer.Context,
    repo: str,
    image_id: str,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Give up after SECONDS.", metavar="SECONDS")
    ] = None,
) -> None:
    """Wait until no work is left on an image; print its status."""
    session = _session(ctx)
    body = {} if timeout is None else {"timeout": timeout}
    with session.client() as client:
        status = client.post(f"/repositories/{repo}/images/{image_id}/wait", body)
    session.emit(status, lambda: _fields(status))


@image_app.command("set-user-data")
@typed_errors
def image_set_user_data(
    ctx: typer.Context,
    repo: str,
    image_id: str,
    user_data: Annotated[str, typer.Argument(metavar="JSON")],
) -> None:
    """Replace an image's user data (JSON)."""
    body = {"user_data": parse_json(user_data)}
    _simple(ctx, "PUT", f"/repositories/{repo}/images/{image_id}/user-data", body, "user data set")


@image_app.command("resize")
@typed_errors
def image_resize(
    ctx: typer.Context,
    repo: str,
    image_id: str,
    new_size: Annotated[int, typer.Argument(parser=parse_size, metavar="SIZE")],
) -> None:
    """Grow a virtual disk to SIZE."""
    body = {"new_size": new_size}
    _simple(
        ctx, "POST", f"/repositories/{repo}/images/{image_id}/resize", body, f"resized {image_id}"
    )


@image_app.command("attach")
@typed_errors
def image_attach(ctx: typer.Context, repo: str, image_id: str) -> None:
    """Serve an image over NBD from this host's storage daemon."""
    _answer_fields(ctx, "POST", f"/repositories/{repo}/images/{image_id}/attach")


@image_app.command("detach")
@typed_errors
def image_detach(ctx: typer.Context, repo: str, image_id: str) -> None:
    """Stop serving an image over NBD."""
    _simple(
        ctx, "POST", f"/repositories/{repo}/images/{image_id}/detach", {}, f"detached {image_id}"
    )


@image_app.command("migrate")
@typed_errors
def image_migrate(ctx: typer.Context, repo: str, image_id: str, dst_repo: str) -> None:
    """Move a live image to DST_REPO; prints the job's id."""
    session = _session(ctx)
    with session.client() as client:
        answer = client.post(
            f"/repositories/{repo}/images/{image_id}/migrate", {"dst_repo_id": dst_repo}
        )
    session.emit(answer, lambda: out.print(str(answer.get("job_id")), highlight=False))


# --- check, fix, stop -------------------------------------------------------------------------


def _fix_table(fixes: list[dict[str, Any]]) -> None:
    if not fixes:
        out.print("nothing to fix")
        return
    t = Table("#", "TYPE", "IMAGES", "DESCRIPTION")
    for number, fix in enumerate(fixes, start=1):
        t.add_row(
            str(number), str(fix["type"]), "\n".join(fix["image_ids"]), str(fix["description"])
        )
    out.print(t)


@app.command()
@typed_errors
def check(
    ctx: typer.Context,
    repo: str,
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="Also read every volume: qemu-img check, and each digest (finds rot). "
            "`strata repo describe` shows its progress; `strata stop` ends it.",
        ),
    ] = False,
) -> None:
    """What the repository needs: fixes numbered from 1, for `strata fix`."""
    session = _session(ctx)
    with session.client() as client:
        body = {"options": {"deep": True}} if deep else None
        fixes = client.post(f"/repositories/{repo}/check", body)
    session.emit(fixes, lambda: _fix_table(fixes))


@app.command()
@typed_errors
def fix(
    ctx: typer.Context,
    repo: str,
    numbers: Annotated[
        list[int] | None, typer.Argument(metavar="[NUMBER]...", help="Fixes of a fresh check.")
    ] = None,
    run_all: Annotated[bool, typer.Option("--all", help="Every fix of a fresh check.")] = False,
    fix_type: Annotated[
        FixType | None,
        typer.Option("--type", help="With --all: only these."),
    ] = None,
) -> None:
    """Run fixes by their number in a fresh check, or --all of them (of a --type)."""
    numbers = numbers or []
    if run_all == bool(numbers):
        raise typer.BadParameter("give fix NUMBERs or --all, one of the two")
    if fix_type is not None and not run_all:
        raise typer.BadParameter("--type goes with --all", param_hint="--type")
    if any(n < 1 for n in numbers):
        raise typer.BadParameter("fixes are numbered from 1")
    session = _session(ctx)
    with session.client() as client:
        offered: list[dict[str, Any]] = client.post(f"/repositories/{repo}/check")
        if run_all:
            chosen = [f for f in offered if fix_type is None or f["type"] == fix_type]
        else:
            beyond = [n for n in numbers if n > len(offered)]
            if beyond:
                raise ApiError(
                    "invalid_parameter",
                    f"no fix number {beyond[0]}: the check offers {len(offered)}"
                    " (see `strata check`)",
                )
            chosen = [offered[n - 1] for n in numbers]
        for one in chosen:
            client.post(f"/repositories/{repo}/fixes", {"fix": one})
            if not session.as_json:
                out.print(f"fixed: {one['type']} {' '.join(one['image_ids'])}", highlight=False)
    if session.as_json:
        out.print_json(json.dumps(chosen))
    elif not chosen:
        out.print("nothing to fix")


@app.command()
@typed_errors
def stop(
    ctx: typer.Context,
    repo: str,
    image_id: str,
    reason: Annotated[str, typer.Option("--reason", help="Why, for the log.")] = "",
) -> None:
    """Stop the fix running on an image."""
    body = {"reason": reason}
    _simple(
        ctx, "POST", f"/repositories/{repo}/images/{image_id}/stop", body, f"stopped {image_id}"
    )


def main() -> None:
    """The ``strata`` console script."""
    app(prog_name="strata")


if __name__ == "__main__":
    main()
