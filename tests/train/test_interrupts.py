"""SIGINT / SIGTERM set a flag while training; a second Ctrl-C stops now."""

import os
import signal

import pytest

from tiered_routing.train import interrupts


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_only_sets_the_flag_and_handlers_are_restored(signum):
  before = signal.getsignal(signum)
  with interrupts.StopRequests() as stop:
    assert stop.requested is None
    os.kill(os.getpid(), signum)
    assert stop.requested == signal.Signals(signum).name
  assert signal.getsignal(signum) is before


def test_a_second_ctrl_c_interrupts_at_once():
  with interrupts.StopRequests() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_training_interrupted_is_a_keyboard_interrupt():
  assert issubclass(interrupts.TrainingInterrupted, KeyboardInterrupt)
