"""Which gin config changes a resume refuses (`cli.resume_check`)."""

from tiered_routing.cli import resume_check

SAVED = """from tiered_routing.train import steps

# Macros:
# =====
BATCH_SIZE = 16
MIXTURE = ['tr.sample.hi_v1',
    'tr.sample.en_v1']
MODEL_DIR = '/old/place'
TRAIN_STEPS = 300

# Parameters for steps.TrainConfig:
steps.TrainConfig.log_every_steps = 25
steps.TrainConfig.seed = 0
tiered_routing.MeshConfig.data = 8
"""


def test_bindings_join_continuation_lines_and_skip_comments():
  got = resume_check.bindings(SAVED)
  assert got["MIXTURE"] == "['tr.sample.hi_v1', 'tr.sample.en_v1']"
  assert got["steps.TrainConfig.seed"] == "0"
  assert "from tiered_routing.train import steps" not in got
  assert len(got) == 7


def test_length_place_periods_and_mesh_may_change():
  current = (SAVED.replace("/old/place", "/new/place")
             .replace("= 300", "= 900")
             .replace("log_every_steps = 25", "log_every_steps = 5")
             .replace("data = 8", "data = 4")
             + "steps.TrainConfig.restore_step = None\n")  # A new field.
  assert resume_check.changed_settings(SAVED, current) == []


def test_what_the_run_learns_may_not_change():
  current = (SAVED.replace("BATCH_SIZE = 16", "BATCH_SIZE = 32")
             .replace("'tr.sample.en_v1'", "'tr.sample.de_v1'")
             .replace("seed = 0", "seed = 1"))
  assert resume_check.changed_settings(SAVED, current) == [
      ("BATCH_SIZE", "16", "32"),
      ("MIXTURE", "['tr.sample.hi_v1', 'tr.sample.en_v1']",
       "['tr.sample.hi_v1', 'tr.sample.de_v1']"),
      ("steps.TrainConfig.seed", "0", "1"),
  ]


def test_only_cadence_may_differ_between_two_runs_of_one_sweep():
  """A sweep's manifest is stricter than a train resume: the length of
  training, the place and a setting bound in one config only all count."""
  cadence = (SAVED.replace("log_every_steps = 25", "log_every_steps = 5")
             + "steps.TrainConfig.save_every_steps = 200\n")
  assert not resume_check.only_cadence_differs(SAVED, cadence)  # New binding.
  saved = SAVED + "steps.TrainConfig.save_every_steps = %TRAIN_STEPS\n"
  assert resume_check.only_cadence_differs(saved, cadence)
  assert resume_check.only_cadence_differs(saved, saved)
  for before, after in (("= 300", "= 900"), ("/old/place", "/new/place"),
                        ("seed = 0", "seed = 1"), ("data = 8", "data = 4")):
    assert not resume_check.only_cadence_differs(
        saved, cadence.replace(before, after)), after
