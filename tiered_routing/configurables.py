"""gin registrations, imported by the binaries only.

Library code is configured by plain dataclasses; this module makes them
configurable from gin files under the `tiered_routing.` prefix, e.g.
`tiered_routing.DecoderConfig.d_model = 512`.
"""

import gin

from tiered_routing.model import transformer

DecoderConfig = gin.external_configurable(
    transformer.DecoderConfig, module="tiered_routing")
