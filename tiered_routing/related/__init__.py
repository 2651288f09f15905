"""Related methods, each on the one loop, evaluator and forward pass.

Modules:
  esft              expert-specialized fine-tuning, forced routing, router
                    LoRA.
  expert_gates      adding and removing experts of sequence-gated layers.
  moefication       a dense FFN split into experts.
  moefied_decoder   MoEfication of every dense FFN of a `TieredDecoder`.
  method_tables     row comparisons and Markdown tables of the binaries.
"""
