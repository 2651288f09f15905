"""Tier-1 routing at inference time: oracle, classifier and ensemble.

During training tier 1 routes each sequence to the partition of its language
label. At inference the label may be missing, so three modes are compared,
all as pure functions of per-partition log-probabilities (every partition
scores every sequence; leading axis P):

  oracle      the language label's partition (the training-time route; the
              upper bound of single-partition routing).
  classifier  the argmax partition of a text classifier's posterior
              (`classifier.LanguageClassifier.partition_posterior`).
  ensemble    a mixture of the partitions' next-token distributions,
                p(x_t | x_<t) = sum_p w_p,t p_p(x_t | x_<t),
              with weights either from the classifier posterior (fixed per
              sequence, as c-BTM, Gururangan et al. 2023, Sec. 2.3) or from
              the prefix likelihood (Branch-Train-Merge, Li et al. 2022,
              Sec. 4.2: w_p,t = P(p | x_<t) proportional to
              prior_p * prod_{s<t} p_p(x_s | x_<s), updated per position).
              Both may keep only the top-k partitions (c-BTM's sparse
              ensemble), renormalized.

With prefix weights and no top-k the ensemble is the exact Bayesian model
average: its summed token log-likelihood telescopes to
log sum_p prior_p * p_p(x). Everything is computed in log space (logsumexp),
so sequences whose likelihood underflows in probability space still mix.

Layouts: logprobs_PxBxLxV (full next-token distributions), token_logprobs_PxBxL
(log-probability of the actual next token), routing per row (`_B`, `_BxP`) or
per token (`_BxL`, `_BxLxP`, e.g. for packed rows).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tiered_routing.tier1 import schemes

MODES = ("oracle", "classifier", "ensemble")
WEIGHTINGS = ("posterior", "prefix")


def oracle_partitions(language_ids, scheme: schemes.PartitionScheme):
  """Partition of each token's (or row's) language label, int32, same shape.

  Ids outside 0..15 (padding) are clipped; mask them downstream.
  """
  table = jnp.asarray(scheme.language_to_partition_table())
  return jnp.take(table, jnp.asarray(language_ids), mode="clip")


def classifier_partitions(posterior_xP):
  """Argmax partition of a posterior [..., P], int32[...]."""
  return jnp.argmax(jnp.asarray(posterior_xP), axis=-1).astype(jnp.int32)


def routing_accuracy(predicted, oracle, mask=None):
  """Share of (unmasked) rows or tokens routed to the oracle's partition."""
  predicted, oracle = jnp.asarray(predicted), jnp.asarray(oracle)
  if predicted.shape != oracle.shape:
    raise ValueError(
        f"predicted shape {predicted.shape} != oracle shape {oracle.shape}"
    )
  mask = jnp.ones(predicted.shape) if mask is None else jnp.asarray(mask)
  hits = jnp.sum((predicted == oracle) * mask)
  return hits / jnp.maximum(jnp.sum(mask), 1)


def gather_targets(logprobs_PxBxLxV, targets_BxL):
  """Log-probability of the target token under each partition, [P, B, L]."""
  logprobs_PxBxLxV = jnp.asarray(logprobs_PxBxLxV)
  idx = jnp.broadcast_to(
      jnp.asarray(targets_BxL)[None, ..., None],
      logprobs_PxBxLxV.shape[:-1] + (1,),
  )
  return jnp.take_along_axis(logprobs_PxBxLxV, idx, axis=-1)[..., 0]


def _per_token(x, batch_len, name, trailing=()):
  """Broadcasts per-row routing [B, *trailing] to per-token [B, L, *trailing].

  The rank, not the sizes, tells the two apart (a [B, P] posterior with
  P == L is still per row).
  """
  b, length = batch_len
  if x.ndim == 1 + len(trailing) and x.shape[0] == b:
    return jnp.broadcast_to(x[:, None], (b, length) + x.shape[1:])
  if x.ndim == 2 + len(trailing) and x.shape[:2] == (b, length):
    return x
  raise ValueError(
      f"{name} has shape {x.shape}; expected [B, ...] or [B, L, ...] with "
      f"B={b}, L={length} and {len(trailing)} trailing axes"
  )


def select_partition(values_PxBxL, partition):
  """values[partition[b, l], b, l, ...]: one partition's values per token.

  Args:
    values_PxBxL: [P, B, L] token log-probs or [P, B, L, V] distributions.
    partition: int partition per row [B] or per token [B, L].

  Returns:
    values_PxBxL without its leading axis.
  """
  values = jnp.asarray(values_PxBxL)
  part_BxL = _per_token(jnp.asarray(partition), values.shape[1:3], "partition")
  idx = part_BxL.reshape((1,) + part_BxL.shape + (1,) * (values.ndim - 3))
  return jnp.take_along_axis(values, idx, axis=0)[0]


@functools.partial(jax.jit, static_argnames="top_k")
def normalize_log_weights(log_weights_xP, top_k: int | None = None):
  """Keeps the top-k partitions and renormalizes: log-softmax over P.

  Entries of -inf (zero prior) stay -inf; a row needs one finite entry.
  """
  log_w = jnp.asarray(log_weights_xP, jnp.float32)
  num_partitions = log_w.shape[-1]
  if top_k is not None and (
      not isinstance(top_k, (int, np.integer)) or top_k < 1
  ):
    raise ValueError(f"top_k={top_k!r}; allowed: None or an int >= 1")
  if top_k is not None and top_k < num_partitions:
    _, idx = jax.lax.top_k(log_w, top_k)
    keep = jax.nn.one_hot(idx, num_partitions, dtype=jnp.bool_).any(axis=-2)
    log_w = jnp.where(keep, log_w, -jnp.inf)
  return jax.nn.log_softmax(log_w, axis=-1)


def posterior_log_weights(posterior_xP, top_k: int | None = None):
  """Log mixture weights from posterior probabilities (c-BTM weighting)."""
  posterior = jnp.asarray(posterior_xP, jnp.float32)
  return normalize_log_weights(jnp.log(posterior), top_k)


def _segment_starts(segment_ids_BxL, shape):
  """True where a new sequence begins (position 0 or a change of id)."""
  if segment_ids_BxL is None:
    return jnp.zeros(shape, jnp.bool_).at[:, 0].set(True)
  seg = jnp.asarray(segment_ids_BxL)
  prev = jnp.pad(seg, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  return seg != prev


@jax.jit
def prefix_log_likelihood(
    token_logprobs_PxBxL, mask_BxL=None, segment_ids_BxL=None
):
  """sum_{s<t, same sequence} log p_p(x_s), [P, B, L] (0 at sequence starts).

  Masked positions (padding) add nothing. A segmented scan, not a global
  cumsum minus an offset, keeps float32 sums exact per packed sequence.
  """
  lp = jnp.asarray(token_logprobs_PxBxL, jnp.float32)
  shape = lp.shape[1:]
  if mask_BxL is not None:
    lp = jnp.where(jnp.asarray(mask_BxL, jnp.bool_)[None], lp, 0.0)
  starts_BxL = _segment_starts(segment_ids_BxL, shape)

  def combine(a, b):
    (sum_a, start_a), (sum_b, start_b) = a, b
    return jnp.where(start_b, sum_b, sum_a + sum_b), start_a | start_b

  starts = jnp.broadcast_to(starts_BxL[None], lp.shape)
  inclusive, _ = jax.lax.associative_scan(combine, (lp, starts), axis=-1)
  shifted = jnp.pad(inclusive, ((0, 0), (0, 0), (1, 0)))[..., :-1]
  return jnp.where(starts, 0.0, shifted)


def prefix_log_weights(
    token_logprobs_PxBxL,
    log_prior=None,
    mask_BxL=None,
    segment_ids_BxL=None,
    top_k: int | None = None,
):
  """BTM weights log P(p | x_<t) per position, [B, L, P].

  Args:
    token_logprobs_PxBxL: log p_p(x_t | x_<t) of the observed tokens.
    log_prior: [B, P] or [B, L, P] log prior (e.g. log classifier posterior);
      None = uniform.
    mask_BxL: 1 where a token is real; padding does not update the weights.
    segment_ids_BxL: packed sequences; weights restart at each sequence.
    top_k: keep the k most probable partitions per position.
  """
  lp = jnp.asarray(token_logprobs_PxBxL, jnp.float32)
  num_p, b, length = lp.shape
  log_w_BxLxP = jnp.moveaxis(
      prefix_log_likelihood(lp, mask_BxL, segment_ids_BxL), 0, -1
  )
  if log_prior is not None:
    log_prior = _per_token(
        jnp.asarray(log_prior, jnp.float32), (b, length), "log_prior", "P"
    )
    if log_prior.shape[-1] != num_p:
      raise ValueError(
          f"log_prior has {log_prior.shape[-1]} partitions, "
          f"token_logprobs {num_p}"
      )
    log_w_BxLxP = log_w_BxLxP + log_prior
  return normalize_log_weights(log_w_BxLxP, top_k)


def _check_weights(log_weights, num_p, b, length):
  log_w = _per_token(
      jnp.asarray(log_weights, jnp.float32), (b, length), "log_weights", "P"
  )
  if log_w.shape != (b, length, num_p):
    raise ValueError(
        f"log_weights has shape {log_w.shape}; expected "
        f"{(b, length, num_p)} or {(b, num_p)}"
    )
  return log_w


def mixture_token_log_likelihood(token_logprobs_PxBxL, log_weights):
  """log sum_p w_p,t p_p(x_t), [B, L], from log weights [B, P] / [B, L, P]."""
  lp = jnp.asarray(token_logprobs_PxBxL, jnp.float32)
  log_w = _check_weights(log_weights, *lp.shape)
  return jax.nn.logsumexp(jnp.moveaxis(log_w, -1, 0) + lp, axis=0)


def mixture_log_probs(logprobs_PxBxLxV, log_weights):
  """Mixture next-token distribution in log space, [B, L, V]."""
  lp = jnp.asarray(logprobs_PxBxLxV, jnp.float32)
  log_w = _check_weights(log_weights, *lp.shape[:3])
  return jax.nn.logsumexp(jnp.moveaxis(log_w, -1, 0)[..., None] + lp, axis=0)


def ensemble_log_weights(
    token_logprobs_PxBxL,
    *,
    weighting="posterior",
    posterior=None,
    top_k=None,
    mask_BxL=None,
    segment_ids_BxL=None,
):
  """Per-token ensemble log weights [B, L, P] for either weighting.

  "posterior" needs `posterior` ([B, P] or [B, L, P]); "prefix" uses it as
  the prior if given (uniform otherwise).
  """
  lp = jnp.asarray(token_logprobs_PxBxL, jnp.float32)
  if weighting == "posterior":
    if posterior is None:
      raise ValueError("weighting='posterior' needs a posterior")
    return _check_weights(posterior_log_weights(posterior, top_k), *lp.shape)
  if weighting == "prefix":
    log_prior = (
        None
        if posterior is None
        else jnp.log(jnp.asarray(posterior, jnp.float32))
    )
    return prefix_log_weights(lp, log_prior, mask_BxL, segment_ids_BxL, top_k)
  raise ValueError(f"Unknown weighting {weighting!r}; allowed: {WEIGHTINGS}")


def routed_partition(mode, *, language_ids=None, scheme=None, posterior=None):
  """The single partition per row / token of the 'oracle' or 'classifier'."""
  if mode == "oracle":
    if language_ids is None or scheme is None:
      raise ValueError("mode 'oracle' needs language_ids and scheme")
    return oracle_partitions(language_ids, scheme)
  if mode == "classifier":
    if posterior is None:
      raise ValueError("mode 'classifier' needs a posterior")
    return classifier_partitions(posterior)
  raise ValueError(
      f"mode {mode!r} routes to no single partition; allowed: "
      "'oracle', 'classifier'"
  )


def token_log_likelihood(
    mode,
    token_logprobs_PxBxL,
    *,
    language_ids=None,
    scheme=None,
    posterior=None,
    weighting="posterior",
    top_k=None,
    mask_BxL=None,
    segment_ids_BxL=None,
):
  """Target-token log-likelihood [B, L] under a tier-1 inference mode.

  Args:
    mode: one of MODES.
    token_logprobs_PxBxL: every partition's log-prob of the observed tokens
      (`gather_targets` of the full distributions).
    language_ids: oracle: language id per row [B] or token [B, L].
    scheme: oracle: the partition scheme.
    posterior: classifier / ensemble: P(partition | text), [B, P] or
      [B, L, P].
    weighting: ensemble: "posterior" or "prefix".
    top_k: ensemble: partitions kept per position (None = all).
    mask_BxL, segment_ids_BxL: ensemble "prefix": padding and packing.

  Returns:
    float32[B, L]; masked positions hold values to be ignored.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; allowed: {MODES}")
  lp = jnp.asarray(token_logprobs_PxBxL, jnp.float32)
  if lp.ndim != 3:
    raise ValueError(f"token_logprobs_PxBxL must be rank 3, got {lp.shape}")
  if mode == "ensemble":
    log_w = ensemble_log_weights(
        lp,
        weighting=weighting,
        posterior=posterior,
        top_k=top_k,
        mask_BxL=mask_BxL,
        segment_ids_BxL=segment_ids_BxL,
    )
    return mixture_token_log_likelihood(lp, log_w)
  part = routed_partition(
      mode, language_ids=language_ids, scheme=scheme, posterior=posterior
  )
  return select_partition(lp, part)


def sequence_log_likelihood(token_ll_BxL, mask_BxL, segment_ids_BxL=None):
  """Sums masked token log-likelihoods per row, or per packed sequence.

  Returns:
    float64[B] row sums; with `segment_ids_BxL`, float64[B, S + 1] where
    column s sums segment id s of the row (column 0, padding, stays 0).
  """
  ll_BxL = np.asarray(token_ll_BxL, np.float64) * np.asarray(mask_BxL)
  if segment_ids_BxL is None:
    return ll_BxL.sum(axis=-1)
  seg_BxL = np.asarray(segment_ids_BxL).astype(np.int64)
  out = np.zeros((seg_BxL.shape[0], seg_BxL.max() + 1))
  rows_BxL = np.broadcast_to(
      np.arange(seg_BxL.shape[0])[:, None], seg_BxL.shape
  )
  np.add.at(out, (rows_BxL, seg_BxL), np.where(seg_BxL > 0, ll_BxL, 0.0))
  return out
