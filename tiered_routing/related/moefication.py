"""MoEfication: a trained dense feed-forward layer split into experts.

Zhang et al. 2022 ("MoEfication: Transformer Feed-forward Layers are
Mixtures of Experts") observe that few hidden units of a trained FFN are
active per token and that co-activating units can be grouped. The recipe:

  1. Cluster the F hidden units into E groups of equal size F/E by balanced
     k-means on each unit's input weights (a column of wi, here together with
     its wi_gate column for gated units), L2-normalized (`balanced_kmeans`).
  2. Permute the hidden units so every cluster is contiguous; this does not
     change the function (`permute_hidden`). Expert e is then the slice
     wi[:, e*F/E:(e+1)*F/E] and wo[e*F/E:(e+1)*F/E] (`split_experts`), giving
     stacked expert weights [E, D, F/E] and [E, F/E, D]. The FFN output is
     exactly the sum of all experts' outputs (combine weight 1 each).
  3. Per token, compute only the top-k experts. The paper's oracle selects
     the experts with the largest sum of positive hidden activations
     ('positive'; for ReLU units that is all of the activation). Gated GELU
     units can be negative too, so 'abs' (sum of |h|) is offered as well. A
     learned router predicts those scores from the FFN input (the paper's
     "MLP selection"; here a ridge-regression linear map, `fit_router`).

This module works on one FFN's parameters; `moefied_decoder` applies it
to every dense FFN of a `TieredDecoder`.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from tiered_routing.model import layers

SCORES = ("positive", "abs")


@dataclasses.dataclass(frozen=True)
class MoeficationConfig:
  """How a dense FFN is split.

  Attributes:
    num_experts: E; must divide the hidden size F.
    kmeans_iterations: maximum balanced k-means iterations.
    seed: k-means initialization seed.
  """

  num_experts: int
  kmeans_iterations: int = 30
  seed: int = 0

  def __post_init__(self):
    for name in ("num_experts", "kmeans_iterations"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"MoeficationConfig.{name}={value!r} must be an " "int >= 1."
        )


def neuron_features(mlp: Mapping[str, Any]) -> np.ndarray:
  """[F, D] ([F, 2D] if gated): each hidden unit's input weights, unit norm."""
  cols = [np.asarray(mlp["wi"], np.float64)]
  if "wi_gate" in mlp:
    cols.append(np.asarray(mlp["wi_gate"], np.float64))
  feats = np.concatenate(cols, axis=0).T
  return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def balanced_assignment(dist_FxE: np.ndarray) -> np.ndarray:
  """Labels [F] minimizing total distance with exactly F/E points per cluster.

  Each cluster gets F/E slots and the points are matched to slots by the
  Hungarian algorithm (exact; as in balanced k-means, Malinen & Franti 2014).
  """
  f, n = dist_FxE.shape
  if f % n:
    raise ValueError(f"{f} points cannot form {n} clusters of equal size.")
  slots = np.repeat(np.arange(n), f // n)
  rows, cols = optimize.linear_sum_assignment(dist_FxE[:, slots])
  labels = np.empty(f, np.int64)
  labels[rows] = slots[cols]
  return labels


def balanced_kmeans(
    points_FxX, num_clusters: int, iterations: int = 30, seed: int = 0
) -> np.ndarray:
  """Balanced k-means labels [F]: every cluster has exactly F/E points."""
  points = np.asarray(points_FxX, np.float64)
  f = points.shape[0]
  if not 1 <= num_clusters <= f or f % num_clusters:
    raise ValueError(
        f"num_clusters={num_clusters} must divide the number of " f"points {f}."
    )
  rng = np.random.default_rng(seed)
  centroids = points[rng.choice(f, num_clusters, replace=False)]
  labels = None
  for _ in range(iterations):
    dist = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
    new = balanced_assignment(dist)
    if labels is not None and (new == labels).all():
      break
    labels = new
    centroids = np.stack(
        [points[labels == c].mean(0) for c in range(num_clusters)]
    )
  return labels


def cluster_permutation(labels_F) -> np.ndarray:
  """Hidden-unit order that makes clusters contiguous (0 first, stable)."""
  return np.argsort(np.asarray(labels_F), kind="stable")


def permute_hidden(mlp: Mapping[str, Any], perm_F) -> dict[str, Any]:
  """The same FFN with hidden unit j moved to position perm^-1(j)."""
  perm = np.asarray(perm_F)
  out = {
      **mlp,
      "wi": jnp.asarray(mlp["wi"])[:, perm],
      "wo": jnp.asarray(mlp["wo"])[perm],
  }
  if "wi_gate" in mlp:
    out["wi_gate"] = jnp.asarray(mlp["wi_gate"])[:, perm]
  return out


def split_experts(mlp: Mapping[str, Any], num_experts: int) -> dict:
  """Experts of a permuted FFN: wi, wi_gate [E, D, F/E] and wo [E, F/E, D]."""
  d, f = np.shape(mlp["wi"])
  if f % num_experts:
    raise ValueError(f"num_experts={num_experts} must divide d_ff={f}.")
  m = f // num_experts
  split_in = (
      lambda w: jnp.asarray(w).reshape(d, num_experts, m).transpose(1, 0, 2)
  )
  out = {
      "wi": split_in(mlp["wi"]),
      "wo": jnp.asarray(mlp["wo"]).reshape(num_experts, m, d),
  }
  if "wi_gate" in mlp:
    out["wi_gate"] = split_in(mlp["wi_gate"])
  return out


def expert_hidden(
    x_TxD: jax.Array, experts: Mapping[str, jax.Array], activation: str = "gelu"
) -> jax.Array:
  """Hidden activations h [T, E, F/E] of every expert (float32)."""
  x = x_TxD.astype(jnp.float32)
  act = layers.get_activation(activation)
  h = act(jnp.einsum("td,ndm->tnm", x, experts["wi"]))
  if "wi_gate" in experts:
    h = h * jnp.einsum("td,ndm->tnm", x, experts["wi_gate"])
  return h


def partition_scores(h_TxExF: jax.Array, score: str = "positive") -> jax.Array:
  """[T, E] expert scores: sum of positive (or absolute) activations."""
  if score not in SCORES:
    raise ValueError(f"score={score!r} is invalid; allowed: {SCORES}.")
  part = jnp.maximum(h_TxExF, 0.0) if score == "positive" else jnp.abs(h_TxExF)
  return part.sum(-1)


def top_k_mask(scores_TxE: jax.Array, top_k: int) -> jax.Array:
  """bool [T, E]: each token's top_k experts."""
  n = scores_TxE.shape[-1]
  if not 1 <= top_k <= n:
    raise ValueError(f"top_k={top_k} must be in [1, {n}].")
  index = jax.lax.top_k(scores_TxE, top_k)[1]
  return (
      jnp.zeros(scores_TxE.shape, bool)
      .at[jnp.arange(scores_TxE.shape[0])[:, None], index]
      .set(True)
  )


def moe_ffn(
    x_TxD: jax.Array,
    experts: Mapping[str, jax.Array],
    top_k: int,
    *,
    activation: str = "gelu",
    score: str = "positive",
    router: Optional[Mapping[str, jax.Array]] = None,
) -> jax.Array:
  """y [T, D] = sum over the top-k experts of their outputs (weight 1).

  Experts are chosen by the oracle scores of `partition_scores`, or by a
  router's predicted scores x @ kernel + bias (`fit_router`) if given.
  """
  h = expert_hidden(x_TxD, experts, activation)
  if router is None:
    scores = partition_scores(h, score)
  else:
    scores = x_TxD.astype(jnp.float32) @ router["kernel"] + router["bias"]
  h = jnp.where(top_k_mask(scores, top_k)[..., None], h, 0.0)
  return jnp.einsum("tnm,nmd->td", h, experts["wo"])


def fit_router(x_TxD, targets_TxE, l2: float = 1e-3) -> dict[str, np.ndarray]:
  """Ridge regression x -> expert scores: {'kernel' [D, E], 'bias' [E]}.

  `l2` is relative to the mean diagonal of the centred Gram matrix.
  """
  x = np.asarray(x_TxD, np.float64)
  y = np.asarray(targets_TxE, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
    raise ValueError(
        f"x {x.shape} and targets {y.shape} must be [T, D] and "
        "[T, E] with the same T."
    )
  mean_x, mean_y = x.mean(0), y.mean(0)
  xc, yc = x - mean_x, y - mean_y
  gram = xc.T @ xc
  reg = l2 * max(np.trace(gram) / gram.shape[0], 1e-12)
  kernel = np.linalg.solve(gram + reg * np.eye(gram.shape[0]), xc.T @ yc)
  return {
      "kernel": kernel.astype(np.float32),
      "bias": (mean_y - mean_x @ kernel).astype(np.float32),
  }


def moefy_mlp(
    mlp: Mapping[str, Any], config: MoeficationConfig
) -> tuple[dict, np.ndarray]:
  """(permuted FFN with contiguous clusters, cluster label of each unit)."""
  labels = balanced_kmeans(
      neuron_features(mlp),
      config.num_experts,
      config.kmeans_iterations,
      config.seed,
  )
  return permute_hidden(mlp, cluster_permutation(labels)), labels
