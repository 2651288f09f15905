"""Permanent, versioned task and mixture names."""


def task_name(source: str, code: str) -> str:
  """e.g. tr.sample.hi_v1, tr.mc4.hi_v1, tr.mc4_json.hi_v1."""
  return f"tr.{source}.{code}_v1"


def all_languages_name(source: str, temperature: float | None = None) -> str:
  """tr.{source}.all_v1, or tr.{source}.all_t{T}_v1 for temperature T."""
  if temperature is None:
    return f"tr.{source}.all_v1"
  return f"tr.{source}.all_t{temperature:g}_v1"


def partition_name(source: str, scheme_name: str, partition: int) -> str:
  """e.g. tr.sample.family4.p2_v1."""
  return f"tr.{source}.{scheme_name}.p{partition}_v1"
