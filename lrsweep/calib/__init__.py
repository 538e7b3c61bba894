"""Calibration: the data a data-aware method learns its statistics from (``conf/calib``).

  sources  calibration batches and the loss behind the Fisher, by model kind; a source reads the
           calibration config it is given (``calib``, ``heal.data``, allocation's held-out draws);
  stats    the statistics of the target layers (xtx, absmean, fisher) from forward hooks and one
           backward pass per batch, cached on disk by everything they depend on.
Methods with no ``needs`` never come here. Which statistics are taken when (the whole model at once,
block by block, streamed through the device) is the compression schedule: :mod:`lrsweep.schedule`.
"""

from lrsweep.calib import sources, stats
from lrsweep.calib.sources import SAMPLERS, SOURCES, Source, to_device
from lrsweep.calib.stats import (CACHE_VERSION, FISHER, calibration, check, collect, estimator_info,
                                 fisher_estimator, layer_stats, linears, stats_key)

__all__ = ["CACHE_VERSION", "FISHER", "SAMPLERS", "SOURCES", "Source", "calibration", "check", "collect",
           "estimator_info", "fisher_estimator", "layer_stats", "linears", "sources", "stats", "stats_key",
           "to_device"]
