"""Smoke test of the benchmark harness: the tiny kernels and train suites on CPU, in-process (quick timing),
the FLOP formulas, and the baselines' agreement with the engine's reference. No assertions on speed."""

from __future__ import annotations

import json
import os

import pytest
import torch

import internvl3_engine
from bench import attention, kernels, train
from bench.__main__ import main
from bench.ceilings import datasheet_ceiling
from bench.harness import FORWARD_BACKWARD if False else None  # noqa: F401  (placeholder removed below)
