"""A slot of a Prefect global concurrency limit, for workspaces on several machines (one S3 registry, many pods)."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def global_limit_slot(name: str | None, wait_s: float):
    """A slot of the Prefect global concurrency limit `name` (none asked: nothing to hold). Yields False when
    it is taken. The slot is a lease that the server revokes if the holder dies, so crashes free it too."""
    if not name:
        yield True
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    # Ask first: under load the acquisition below can time out before the server answers "no such
    # limit", and a missing limit must be a setup error, never a silent "busy".
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            raise RuntimeError(f"the global concurrency limit {name!r} must be created before runs can hold it: "
                               f"prefect gcl create {name} --limit 1") from None
    with contextlib.ExitStack() as held:
        try:
            # strict: a limit that does not exist is a setup error, not a silent "no limit".
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=max(wait_s, 1.0), strict=True))
        except TimeoutError:
            yield False
            return
        yield True
