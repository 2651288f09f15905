"""gin registrations, imported by the binaries only.

Library code is configured by plain dataclasses; this module makes them
configurable from gin files under the `tiered_routing.` prefix, e.g.
`tiered_routing.DecoderConfig.d_model = 512`.
"""

import gin

from tiered_routing.train import optimizers
from tiered_routing import sharding
from tiered_routing.train import trainer
from tiered_routing.model import transformer

DecoderConfig = gin.external_configurable(
    transformer.DecoderConfig, module="tiered_routing")

# Trainer (tiered_routing.train / eval binaries).
OptimizerConfig = gin.external_configurable(
    optimizers.OptimizerConfig, module="tiered_routing")
TrainConfig = gin.external_configurable(
    trainer.TrainConfig, module="tiered_routing")
MeshConfig = gin.external_configurable(
    sharding.MeshConfig, module="tiered_routing")
