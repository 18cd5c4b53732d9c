"""One clear line for the errors a user can fix (bad config, missing data or features, corrupt shards), instead of
a traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback as well."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def _user_errors() -> tuple[type[BaseException], ...]:
    from larex.extraction.hooks import LayerNotFoundError
    from larex.extraction.plan import PlanError
    from larex.features import UnknownFeatureError
    from larex.io import CorruptShardError
    from larex.postprocessors.base import FeatureError, MissingFeatureError
    from larex.stages.common import ConfigError
    from larex.tracking import TrackingUnavailableError

    return (ConfigError, PlanError, FileNotFoundError, CorruptShardError, LayerNotFoundError, UnknownFeatureError,
            MissingFeatureError, FeatureError, TrackingUnavailableError, ValueError)


@contextlib.contextmanager
def user_errors(command: str) -> Iterator[None]:
    try:
        yield
    except _user_errors() as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"{command}: error: {msg}", file=sys.stderr)
        raise SystemExit(1) from None
