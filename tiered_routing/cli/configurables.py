"""gin registrations of the library's configs, imported by the binaries only.

Library code is configured by plain frozen dataclasses; this module makes
them configurable from gin files, e.g. `tiered_routing.DecoderConfig.d_model
= 512` or `tradeoff_script.FinetuneConfig.steps = 30`. The binaries' own
entry functions (`train_script.train`, `eval_script.evaluate`,
`tradeoff_script.sweep`, ...) are registered where they are defined.
"""

import gin

from tiered_routing import sharding
from tiered_routing.eval import routed_eval
from tiered_routing.model import decoder_config
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.unlearning import expert_attribution
from tiered_routing.unlearning import gradient_methods
from tiered_routing.unlearning import specs
from tiered_routing.unlearning import trace

# The model and the trainer (every binary).
DecoderConfig = gin.external_configurable(
    decoder_config.DecoderConfig, module="tiered_routing"
)
OptimizerConfig = gin.external_configurable(
    optimizers.OptimizerConfig, module="tiered_routing"
)
TrainConfig = gin.external_configurable(
    steps.TrainConfig, module="tiered_routing"
)
MeshConfig = gin.external_configurable(
    sharding.MeshConfig, module="tiered_routing"
)

# Tier-1 inference routing of the eval binary.
RoutingConfig = gin.external_configurable(
    routed_eval.RoutingConfig, module="eval_script"
)

# The trade-off sweep.
UnlearningConfig = gin.external_configurable(
    specs.UnlearningConfig, module="tradeoff_script"
)
FinetuneConfig = gin.external_configurable(
    gradient_methods.FinetuneConfig, module="tradeoff_script"
)
AuditConfig = gin.external_configurable(
    specs.AuditConfig, module="tradeoff_script"
)
TraceConfig = gin.external_configurable(
    trace.TraceConfig, module="tradeoff_script"
)
AttributionConfig = gin.external_configurable(
    expert_attribution.AttributionConfig, module="tradeoff_script"
)
