"""Building a model already partitioned under ZeRO-3, so no rank ever holds the whole fp32 model.

transformers builds a model inside DeepSpeed's ``zero.Init`` (each parameter partitioned as it is created,
initialised module by module on gathered parameters, ``from_pretrained`` weights loaded straight into
partitions) when its ``HfDeepSpeedConfig`` says ZeRO-3 is on. That setting is process-wide (a weak reference
inside transformers): :func:`partitioned_construction` keeps it alive for one build only, so a later build in
the same process (another run, an export) is not partitioned by accident.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def partitioned_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Within this block, transformers builds models partitioned by ``ds_config``'s ZeRO-3 (a no-op below stage 3)."""
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    live = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference: this keeps it alive for the block
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del live
