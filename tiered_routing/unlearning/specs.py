"""What an unlearning experiment trains, forgets, how, and from which data.

Immutable records: `TrainSpec` says how a configuration's models are trained,
`DataSpec` names its SeqIO data (task and mixture names and the functions
that make them; the library never imports the `tasks` package) and
`UnlearningConfig` chooses the forget language, the methods and their
settings. `runner.run_configuration` takes all three.
"""

import dataclasses
from collections.abc import Callable

from tiered_routing.model import decoder_config
from tiered_routing.tier1 import languages
from tiered_routing.train import optimizers
from tiered_routing.train import steps
from tiered_routing.unlearning import expert_attribution
from tiered_routing.unlearning import gradient_methods

METHODS = ("exact", "mask") + gradient_methods.METHODS


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """How a configuration's models are trained (original and reference)."""

  model_config: decoder_config.DecoderConfig
  optimizer_config: optimizers.OptimizerConfig
  train_config: steps.TrainConfig
  batch_size: int
  sequence_length: int

  def __post_init__(self):
    p = self.model_config.num_partitions
    if self.batch_size < p or self.batch_size % p:
      raise ValueError(
          f"batch_size={self.batch_size} must be a positive "
          f"multiple of num_partitions={p}."
      )

  @property
  def batch_shape(self) -> tuple[int, int, int]:
    p = self.model_config.num_partitions
    return (p, self.batch_size // p, self.sequence_length)

  def partition_alone(self) -> "TrainSpec":
    """How one strict partition is retrained alone: a one-partition model
    on B/P rows, its loss scaled by 1/P (`steps.TrainConfig.loss_scale`)
    so that it sees the gradients it had inside the P-partition model."""
    cfg = self.model_config
    if cfg.sharing != "none":
      raise ValueError(
          "Only strict partitions (sharing 'none') train alone; got "
          f"sharing={cfg.sharing!r}."
      )
    p = cfg.num_partitions
    return TrainSpec(
        dataclasses.replace(cfg, num_partitions=1),
        self.optimizer_config,
        dataclasses.replace(
            self.train_config,
            loss_scale=self.train_config.loss_scale / p,
        ),
        self.batch_size // p,
        self.sequence_length,
    )


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Registered SeqIO names of one configuration's data.

  Attributes:
    partition_names: the trained model's mixture per partition.
    task_name: language code -> its task, e.g. 'ur' -> 'tr.sample.ur_v1'.
    mixture_name: (routing table name, partition, codes) -> a registered
      mixture of those languages' tasks (the retrain data of a partition
      after forgetting, e.g. 'tr.sample.family4-ur.p2_v1').
  """

  partition_names: tuple[str, ...]
  task_name: Callable[[str], str]
  mixture_name: Callable[[str, int, tuple[str, ...]], str]


def _is_int(value, low: int) -> bool:
  return not isinstance(value, bool) and isinstance(value, int) and (
      value >= low)


def _check_int(name: str, value, low: int) -> None:
  if not _is_int(value, low):
    raise ValueError(f"{name}={value!r} must be an int >= {low}.")


@dataclasses.dataclass(frozen=True)
class AuditConfig:
  """The attacks and audits every method's model is put through
  (`forget_audits`), beyond mean validation loss.

  Attributes:
    enabled: run them (False: the sweep's v1 columns only).
    paragraphs: members (training paragraphs of the forget language) and as
      many non-members (its held-out paragraphs) for membership inference.
    min_paragraph_tokens: shorter paragraphs are skipped (a score of a few
      tokens is noise).
    scan_steps: training steps of the forget partition's stream searched
      for member paragraphs (every one of them was trained on).
    minkpp_k: the fraction of lowest tokens Min-K%++ averages.
    prompts: member paragraphs continued for verbatim memorization.
    prefix_tokens: prompt length.
    continuation_tokens: tokens generated and compared.
    quant_bits: weight round-trips (8 and / or 4 bits).
    relearn_budgets: relearning attacks on this many of the forget
      language's training paragraphs (`relearning`).
    relearn_related: also attack with related languages' paragraphs only
      (`audit_sets.related_languages`; the largest budget of each).
    relearn_steps: optimizer steps of every attack.
    relearn_rows_per_step: paragraphs per step.
    relearn_learning_rate: the attacks' constant learning rate.
    relearn_eval_rows: held-out forget paragraphs scored after each step.
    router_rows: evaluation rows per language routed by the classifier
      (`router_audit`; 0 = no classifier-routed columns).
    router_docs: training documents per language the classifier is fit on.
  """

  enabled: bool = True
  paragraphs: int = 64
  min_paragraph_tokens: int = 8
  scan_steps: int = 64
  minkpp_k: float = 0.2
  prompts: int = 32
  prefix_tokens: int = 8
  continuation_tokens: int = 16
  quant_bits: tuple[int, ...] = (8, 4)
  relearn_budgets: tuple[int, ...] = (8, 32, 128)
  relearn_related: bool = True
  relearn_steps: int = 16
  relearn_rows_per_step: int = 4
  relearn_learning_rate: float = 1e-3
  relearn_eval_rows: int = 16
  router_rows: int = 8
  router_docs: int = 1000

  def __post_init__(self):
    for name in ("relearn_budgets", "quant_bits"):  # gin gives lists.
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in ("paragraphs", "min_paragraph_tokens", "scan_steps",
                 "prompts", "prefix_tokens", "continuation_tokens",
                 "relearn_steps", "relearn_rows_per_step",
                 "relearn_eval_rows", "router_docs"):
      _check_int(f"AuditConfig.{name}", getattr(self, name), 1)
    _check_int("AuditConfig.router_rows", self.router_rows, 0)
    if not 0 < self.minkpp_k <= 1:
      raise ValueError(f"AuditConfig.minkpp_k={self.minkpp_k!r}; allowed: "
                       "0 < k <= 1.")
    if not all(_is_int(b, 1) for b in self.relearn_budgets):
      raise ValueError(f"AuditConfig.relearn_budgets={self.relearn_budgets!r}"
                       "; allowed: ints >= 1.")
    if not self.relearn_learning_rate > 0:
      raise ValueError("AuditConfig.relearn_learning_rate="
                       f"{self.relearn_learning_rate!r} must be > 0.")
    bad = [b for b in self.quant_bits if b not in (8, 4)]
    if bad:
      raise ValueError(f"AuditConfig.quant_bits={self.quant_bits!r}; "
                       "allowed: a subset of (8, 4).")


@dataclasses.dataclass(frozen=True)
class UnlearningConfig:
  """What to forget, with which methods and settings.

  Attributes:
    forget_language: code of the language to forget.
    methods: a subset of METHODS, run in this order ('exact' becomes
      exact_retrain or exact_drop).
    finetune: settings of the gradient methods (GA, GradDiff, NPO, TRACE).
    attribution: how `mask` and `trace` pick forget-critical experts.
    attribution_batches: forget and retain unlearning batches whose routing
      the attribution counts.
    eval_rows: rows per partition of an evaluation batch.
    top_m: m of the top-m routing mass (compartmentalization).
    seed: seed of the forget-language stream.
    eval_split: the held-out split every model is scored on.
    stop_split: the split of the held-out forget rows the gradient methods
      stop on (`held_out_stop`); with eval_split 'test' and stop_split
      'validation' no reported number is measured on rows a method was
      stopped on (corpora with a test split: debian16).
    stop_rows: how many of those rows.
    audits: the attacks and audits beyond mean loss.
  """

  forget_language: str = "ur"
  methods: tuple[str, ...] = METHODS
  finetune: gradient_methods.FinetuneConfig = gradient_methods.FinetuneConfig()
  attribution: expert_attribution.AttributionConfig = (
      expert_attribution.AttributionConfig(selection="coverage", coverage=0.5)
  )
  attribution_batches: int = 4
  eval_rows: int = 16
  top_m: int = 2
  seed: int = 0
  eval_split: str = "validation"
  stop_split: str = "validation"
  stop_rows: int = 16
  audits: AuditConfig = AuditConfig()

  def __post_init__(self):
    languages.get(self.forget_language)
    bad = [m for m in self.methods if m not in METHODS]
    if bad or not self.methods:
      raise ValueError(
          f"UnlearningConfig.methods={self.methods!r}: unknown {bad}; allowed"
          f" a non-empty subset of {METHODS}."
      )
    if not 1 <= self.attribution_batches <= self.finetune.steps:
      raise ValueError(
          f"UnlearningConfig.attribution_batches={self.attribution_batches!r}"
          f" must be in [1, finetune.steps={self.finetune.steps}]."
      )
    for name in ("eval_rows", "top_m", "stop_rows"):
      _check_int(f"UnlearningConfig.{name}", getattr(self, name), 1)
