"""The mocker engine (`--engine mocker`): the engine core (scheduler, KV block pool, events, tiers) with
simulated step times and deterministic fake tokens. Imports no torch: 16 of these start in seconds on 2 cores."""

from kvrelay.workers.engines.mocker.config import MockerConfig, ModelInfo
from kvrelay.workers.engines.mocker.engine import MockerEngine
from kvrelay.workers.engines.mocker.timing import TimingModel

__all__ = ["MockerConfig", "MockerEngine", "ModelInfo", "TimingModel"]
