import math

import pytest
import torch

from medplan.errors import MedplanError
from medplan.plan import LR_SCHEDULES, make_plan
from medplan.trainers import lr_tag
from medplan.trainers.schedule import build_scheduler, rex_factor, rex_lr


def test_rex_values_at_start_middle_end():
    assert rex_factor(0, 100) == 1.0
    assert rex_factor(50, 100) == pytest.approx(0.5 / 0.75)  # (1 - z) / (1 - z/2) at z = 0.5
    assert rex_factor(100, 100) == 0.0
    assert rex_lr(1e-4, 25, 100) == pytest.approx(1e-4 * 0.75 / 0.875)


def test_rex_decays_slower_than_linear_and_monotonically():
    values = [rex_factor(t, 40) for t in range(41)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert all(v >= 1 - t / 40 for t, v in enumerate(values))


def test_scheduler_steps_per_optimizer_step_and_survives_state_dict():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, "rex", total_steps=10)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([1e-3 * rex_factor(t, 10) for t in range(5)])
    # restored as a resumed run restores it (optimizer, then scheduler), it continues at step 5
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched2 = build_scheduler(opt2, "rex", total_steps=10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert math.isclose(opt2.param_groups[0]["lr"], 1e-3 * rex_factor(5, 10))
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) == pytest.approx(1e-3 * rex_factor(6, 10))


def test_unknown_schedule_is_refused_with_the_plan():
    with pytest.raises(MedplanError, match="'lr_schedule.name' must be one of rex, constant"):
        make_plan(lr_schedule={"name": "cosine"})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    for name in LR_SCHEDULES:  # every name a plan may hold has a scheduler
        build_scheduler(opt, name.upper(), 10)
    with pytest.raises(ValueError, match="cosine"):
        build_scheduler(opt, "cosine", 10)


def test_lr_tag_keeps_every_digit():
    assert [lr_tag(x) for x in (1e-4, 5e-5, 1e-5, 2.5e-5)] == ["1e-04", "5e-05", "1e-05", "2.5e-05"]
